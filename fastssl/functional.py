"""Functional forms of every fastssl loss, named like ``torch.nn.functional`` (re-exported from the
family packages, ``fastssl.<family>``, where they live).

Conventions shared by every function:

* Inputs may be float16, bfloat16, float32 or float64. Arithmetic runs in float32 (float64 for
  float64 inputs); the loss comes back as a 0-dim float32 tensor (float64 for float64 inputs)
  and gradients come back in the input dtype.
* ``backend``: ``"auto"`` (default; the ``FASTSSL_BACKEND`` environment variable replaces it),
  ``"reference"``, ``"torch"``, ``"triton"`` or ``"native"`` — see ``fastssl.runtime.registry``.
* Bad input raises ``TypeError`` / ``ValueError`` naming the argument and the shapes (where
  lightly ``assert``s, ``fastssl.runtime.validation.InputError``: a ``ValueError`` that
  ``except AssertionError`` also catches). Non-finite
  inputs (NaN/Inf) are not checked (that would cost a device sync per call): they propagate
  into the loss. Finite inputs never give a non-finite loss.
* ``gather_distributed=True`` inside an initialised ``torch.distributed`` process group makes
  each rank's loss and gradients those of lightly's convention: the mean over ranks of the
  returned losses equals the single-process loss on the concatenated batch, and each rank's
  input gradient is W × the single-process gradient of its rows, which DDP's gradient averaging
  turns back into the single-process gradient (see ``fastssl.runtime.distributed``). All ranks must
  hold the same batch size.
"""
from .clustering import kmeans_assign, kmeans_update, sinkhorn, sinkhorn_knopp, swav
from .contrastive import clip_loss, dcl, detcon, info_nce, macl, negative_mises_fisher_weights, nt_xent
from .cosine import negative_cosine_similarity
from .distillation import dino, dino_center
from .redundancy import barlow_twins, vicreg
from .regularizers import co2, koleo
from .spectral import emp_ssl, frossl, hypersphere, mmcr, patch_kernel_alignment, tico
from .redundancy import vicregl
from .regularizers import dse
from .whitening import norm_mse_loss, whiten, wmse
from .distillation import capi, capi_sinkhorn_knopp
from .spectral import gram_anchoring_loss
from .masked import codebook_diversity_loss, hubert_loss, mae_loss, sample_negatives, wav2vec2_contrastive_loss
from .sliced import (latent_distance, latent_prediction_loss, lejepa, lejepa_invariance_loss, lewm, sigreg,
                     visreg, visreg_center_loss, visreg_components, visreg_scale_loss, visreg_shape_loss)
from .distillation import msn, msn_targets, msn_terms, pmsn, pmsn_custom
from .distillation.linear_distillation import linear_distillation_loss
from .masked import masked_lm_loss
from .distillation import ibot_patch, ibot_plus_plus_patch
from .spectral.roi import roi_resample_to_grid

__all__ = [
    "info_nce", "nt_xent", "clip_loss", "barlow_twins", "vicreg", "sinkhorn_knopp", "sinkhorn",
    "swav", "dino", "dino_center", "kmeans_assign", "kmeans_update", "negative_cosine_similarity", "koleo",
    "tico", "mmcr", "frossl", "emp_ssl", "hypersphere", "dcl", "negative_mises_fisher_weights", "macl", "co2", "patch_kernel_alignment",
    "sigreg", "lejepa", "lejepa_invariance_loss", "lewm", "latent_distance", "latent_prediction_loss", "visreg",
    "visreg_components", "visreg_center_loss", "visreg_scale_loss", "visreg_shape_loss",
    "detcon",
    "vicregl",
    "dse", "whiten", "wmse", "norm_mse_loss",
    "capi", "capi_sinkhorn_knopp", "gram_anchoring_loss",
    "msn", "msn_targets", "msn_terms", "pmsn", "pmsn_custom",
    "linear_distillation_loss", "masked_lm_loss",
    "mae_loss", "sample_negatives", "wav2vec2_contrastive_loss", "codebook_diversity_loss", "hubert_loss",
    "ibot_patch", "ibot_plus_plus_patch",
    "roi_resample_to_grid",
]
