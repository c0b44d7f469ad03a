"""lightly's ``lightly.loss.hypersphere_loss`` path: ``from fastssl.hypersphere_loss import HypersphereLoss``."""
from .spectral import HypersphereLoss

__all__ = ["HypersphereLoss"]
