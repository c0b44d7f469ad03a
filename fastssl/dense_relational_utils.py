"""lightly's ``lightly.loss.dense_relational_utils`` path:
``from fastssl.dense_relational_utils import roi_resample_to_grid``."""
from .spectral.roi import roi_resample_to_grid

__all__ = ["roi_resample_to_grid"]
