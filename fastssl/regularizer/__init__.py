"""lightly's ``lightly.loss.regularizer`` path: ``from fastssl.regularizer import CO2Regularizer, DSERegularizer``."""
from ..regularizers import CO2Regularizer, DSERegularizer

__all__ = ["CO2Regularizer", "DSERegularizer"]
