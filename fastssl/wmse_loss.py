"""lightly's ``lightly.loss.wmse_loss`` path: ``from fastssl.wmse_loss import WMSELoss, Whitening2d, norm_mse_loss``."""
from .whitening import Whitening2d, WMSELoss, norm_mse_loss

__all__ = ["Whitening2d", "WMSELoss", "norm_mse_loss"]
