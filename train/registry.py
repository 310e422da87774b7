"""Every class and function the .gin files may bind, registered once (no decorators in hnet/ or models/)."""

import gin

from hnet.layers import StackConfig
from models.isotropic import IsotropicLM

gin.external_configurable(StackConfig, module="hnet")
gin.external_configurable(IsotropicLM, module="models")

from models.hnet import HNetConfig, HNetLM  # noqa: E402

gin.external_configurable(HNetConfig, module="models")
gin.external_configurable(HNetLM, module="models")

from models.mrt5 import MrT5CausalLM, MrT5Config  # noqa: E402
from models.mrt5_encdec import MrT5EncDec  # noqa: E402

gin.external_configurable(MrT5Config, module="models")
gin.external_configurable(MrT5CausalLM, module="models")
gin.external_configurable(MrT5EncDec, module="models")

from models.dtp import DTPConfig, DTPLM  # noqa: E402
from train.annotations import UnigramTargets  # noqa: E402

gin.external_configurable(DTPConfig, module="models")
gin.external_configurable(DTPLM, module="models")
gin.external_configurable(UnigramTargets, module="train")

from models.hat import HATLM  # noqa: E402
from models.lyt import LYTLM  # noqa: E402
from models.pooled import MeanPooledLM, SpaceByteLM  # noqa: E402

gin.external_configurable(HATLM, module="models")
gin.external_configurable(LYTLM, module="models")
gin.external_configurable(MeanPooledLM, module="models")
gin.external_configurable(SpaceByteLM, module="models")
