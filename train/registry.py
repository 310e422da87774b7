"""Every class and function the .gin files may bind, registered once (no decorators in hnet/ or models/)."""

import gin

from hnet.layers import StackConfig
from models.isotropic import IsotropicLM

gin.external_configurable(StackConfig, module="hnet")
gin.external_configurable(IsotropicLM, module="models")

from models.hnet import HNetConfig, HNetLM  # noqa: E402

gin.external_configurable(HNetConfig, module="models")
gin.external_configurable(HNetLM, module="models")
