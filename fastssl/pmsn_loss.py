"""lightly's ``lightly.loss.pmsn_loss`` path: ``from fastssl.pmsn_loss import PMSNLoss, PMSNCustomLoss``."""
from .distillation import PMSNCustomLoss, PMSNLoss

__all__ = ["PMSNLoss", "PMSNCustomLoss"]
