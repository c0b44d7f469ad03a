"""lightly's ``lightly.loss.lewm_loss`` path: ``from fastssl.lewm_loss import LeWMLoss, latent_prediction_loss``."""
from .sliced import LeWMLoss, latent_prediction_loss

__all__ = ["LeWMLoss", "latent_prediction_loss"]
