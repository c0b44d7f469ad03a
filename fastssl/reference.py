"""The plain-PyTorch specification of every fastssl loss.

These functions are the spec: obvious, differentiable, and computed in float32 (float64 inputs
stay float64, so ``gradcheck`` works). Every faster backend is tested against them. They
materialise every intermediate (N×M logits, D×D correlations), so they are the slowest and
largest backend; they are also the one that always works.

The *core* functions here (``info_nce``, ``barlow_twins``, ``vicreg_variance_covariance``,
``sinkhorn``, ``soft_cross_entropy_pairs``, ``negative_cosine_similarity``) take already
validated, flattened tensors; the family packages compose them into the public losses, the same
for every backend. Each family keeps its own spec (``fastssl.<family>.reference``); this module
re-exports them all.
"""
from .clustering.reference import kmeans_assign, marginal_logs, sinkhorn
from .contrastive.reference import info_nce, info_nce_masked, info_nce_self, info_nce_self_decoupled, l2_normalize
from .cosine.reference import negative_cosine_similarity
from .distillation.reference import linear_soft_cross_entropy_pairs, soft_cross_entropy_pairs
from .redundancy.reference import barlow_twins, barlow_twins_from_correlation, batch_normalize, vicreg_variance_covariance
from .regularizers.reference import co2, koleo
from .spectral.reference import emp_ssl, frossl, hypersphere_uniformity, mmcr, patch_kernel_alignment, tico
from .regularizers.reference import dse
from .whitening.reference import whitening, wmse
from .sliced.reference import sigreg_sums, visreg_shape
from .runtime.dtypes import compute_dtype, max_exp_span
from .redundancy.reference import mutual_nearest_neighbors
from .spectral.reference import gram_anchoring
from .distillation.reference import msn_anchor_terms
from .distillation.reference import linear_cross_entropy, linear_distillation
from .masked.reference import hubert, mae, wav2vec2_contrastive

__all__ = [
    "compute_dtype", "max_exp_span", "l2_normalize", "info_nce", "info_nce_self", "info_nce_self_decoupled", "info_nce_masked", "batch_normalize",
    "barlow_twins_from_correlation", "barlow_twins", "vicreg_variance_covariance", "marginal_logs", "sinkhorn",
    "soft_cross_entropy_pairs", "linear_soft_cross_entropy_pairs", "kmeans_assign", "negative_cosine_similarity", "koleo",
    "tico", "mmcr", "frossl", "emp_ssl", "hypersphere_uniformity", "co2", "patch_kernel_alignment",
    "mutual_nearest_neighbors",
    "dse", "whitening", "wmse",
    "sigreg_sums", "visreg_shape",
    "gram_anchoring",
    "msn_anchor_terms",
    "linear_distillation", "linear_cross_entropy",
    "mae", "wav2vec2_contrastive", "hubert",
]
