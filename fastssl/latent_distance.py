"""lightly's ``lightly.loss.latent_distance`` path: ``from fastssl.latent_distance import latent_distance``."""
from .sliced import DISTANCES, latent_distance

__all__ = ["DISTANCES", "latent_distance"]
