"""lightly's ``lightly.loss.visreg_loss`` path: ``from fastssl.visreg_loss import visreg_shape_loss, ...``."""
from .sliced import VISRegLoss, VISRegLossComponents, visreg_center_loss, visreg_scale_loss, visreg_shape_loss

__all__ = ["VISRegLoss", "VISRegLossComponents", "visreg_center_loss", "visreg_scale_loss", "visreg_shape_loss"]
