"""Every class and function the .gin files may bind, registered once (no decorators in hnet/ or models/)."""

import gin

from hnet.layers import StackConfig
from models.isotropic import IsotropicLM

gin.external_configurable(StackConfig, module="hnet")
gin.external_configurable(IsotropicLM, module="models")
