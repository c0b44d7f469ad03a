"""lightly's ``lightly.loss.regularizer`` path: ``from fastssl.regularizer import CO2Regularizer``."""
from ..regularizers import CO2Regularizer

__all__ = ["CO2Regularizer"]
