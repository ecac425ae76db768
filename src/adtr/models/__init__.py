"""Neural network modules: frozen backbone, reconstruction transformer, ADTR."""

from adtr.models.adtr import ADTR, ADTROutput
from adtr.models.backbone import FrozenBackbone
from adtr.models.transformer import ReconstructionTransformer

__all__ = ["ADTR", "ADTROutput", "FrozenBackbone", "ReconstructionTransformer"]
