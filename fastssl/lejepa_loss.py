"""lightly's ``lightly.loss.lejepa_loss`` path: ``from fastssl.lejepa_loss import SIGReg, lejepa_invariance_loss``."""
from .sliced import LeJEPALoss, SIGReg, lejepa_invariance_loss

__all__ = ["LeJEPALoss", "SIGReg", "lejepa_invariance_loss"]
