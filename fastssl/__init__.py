"""fastssl: fast, memory-lean drop-in losses for self-supervised learning.

    >>> from fastssl import NTXentLoss          # was: from lightly.loss import NTXentLoss
    >>> loss = NTXentLoss(temperature=0.5)(z0, z1)

Each loss family lives in one package (``fastssl.contrastive``, ``.redundancy``, ``.spectral``, ``.clustering``,
``.distillation``, ``.cosine``, ``.sliced``, ``.whitening``, ``.regularizers``): its modules and functions, its ``torch.library`` ops, its
reference and one file per backend. ``fastssl.functional``, ``fastssl.losses`` and
``fastssl.reference`` gather them; ``fastssl.runtime.registry`` (also ``fastssl.backends``) chooses
between the reference, torch, triton and native implementations; ``python -m fastssl.info``
reports them and ``python -m fastssl.build`` builds the native extension.
"""
from . import backends, distributed, functional, losses, reference  # noqa: F401
from .runtime import registry as _registry
from .runtime.registry import BackendUnavailableError
from .functional import (
    barlow_twins,
    clip_loss,
    co2,
    dcl,
    detcon,
    dino,
    dino_center,
    emp_ssl,
    frossl,
    hypersphere,
    info_nce,
    kmeans_assign,
    kmeans_update,
    koleo,
    macl,
    mmcr,
    negative_mises_fisher_weights,
    patch_kernel_alignment,
    negative_cosine_similarity,
    nt_xent,
    sinkhorn,
    sinkhorn_knopp,
    swav,
    tico,
    vicreg,
    sigreg,
    lejepa,
    lejepa_invariance_loss,
    lewm,
    latent_distance,
    latent_prediction_loss,
    visreg,
    visreg_components,
    visreg_center_loss,
    visreg_scale_loss,
    visreg_shape_loss,
)
from .functional import dse, norm_mse_loss, whiten, wmse
from .losses import (
    BarlowTwinsLoss,
    CO2Regularizer,
    DCLLoss,
    DCLWLoss,
    DetConBLoss,
    DetConSLoss,
    DirectCLRLoss,
    DINOLoss,
    EMPSSLLoss,
    FroSSLLoss,
    HypersphereLoss,
    KoLeoLoss,
    MACLLoss,
    MMCRLoss,
    PatchKernelAlignmentLoss,
    MemoryBankModule,
    NegativeCosineSimilarity,
    NTXentLoss,
    SwaVLoss,
    TiCoLoss,
    VICRegLoss,
    SIGReg,
    LeJEPALoss,
    LeWMLoss,
    VISRegLoss,
    VISRegLossComponents,
)
from .losses import DSERegularizer, Whitening2d, WMSELoss
from .distillation import Center
from .momentum import (
    CosineWarmupScheduler,
    cosine_schedule,
    cosine_warmup_schedule,
    linear_warmup_schedule,
    update_momentum,
)
from .functional import vicregl
from .losses import VICRegLLoss
from .functional import capi, capi_sinkhorn_knopp, gram_anchoring_loss
from .losses import CAPILoss, GramAnchoringLoss
from .losses import MSNLoss, PMSNCustomLoss, PMSNLoss
from .functional import msn, pmsn, pmsn_custom
from .functional import linear_distillation_loss, masked_lm_loss
from .losses import MaskedLMLoss
from .functional import codebook_diversity_loss, hubert_loss, mae_loss, sample_negatives, wav2vec2_contrastive_loss
from .losses import HuBERTLoss, MAELoss, Wav2Vec2ContrastiveLoss
from .functional import ibot_patch, ibot_plus_plus_patch
from .losses import IBOTPatchLoss, IBOTPlusPlusPatchLoss
from .functional import roi_resample_to_grid

__version__ = "0.1.0"

__all__ = [
    "NTXentLoss", "MemoryBankModule", "BarlowTwinsLoss", "VICRegLoss", "SwaVLoss",
    "NegativeCosineSimilarity", "DINOLoss", "KoLeoLoss", "koleo", "info_nce", "nt_xent", "clip_loss", "barlow_twins",
    "vicreg", "sinkhorn_knopp", "sinkhorn", "swav", "dino", "dino_center",
    "negative_cosine_similarity", "kmeans_assign", "kmeans_update", "update_momentum", "cosine_schedule",
    "cosine_warmup_schedule", "linear_warmup_schedule", "CosineWarmupScheduler",
    "Center", "BackendUnavailableError",
    "TiCoLoss", "MMCRLoss", "FroSSLLoss", "EMPSSLLoss", "HypersphereLoss", "tico", "mmcr", "frossl", "emp_ssl",
    "hypersphere", "DCLLoss", "DCLWLoss", "dcl", "negative_mises_fisher_weights",
    "DirectCLRLoss", "MACLLoss", "macl", "CO2Regularizer", "co2",
    "PatchKernelAlignmentLoss", "patch_kernel_alignment",
    "SIGReg", "LeJEPALoss", "LeWMLoss", "VISRegLoss", "VISRegLossComponents", "sigreg", "lejepa",
    "lejepa_invariance_loss", "lewm", "latent_distance", "latent_prediction_loss", "visreg", "visreg_components",
    "visreg_center_loss", "visreg_scale_loss", "visreg_shape_loss",
    "DetConBLoss", "DetConSLoss", "detcon",
    "VICRegLLoss", "vicregl",
    "DSERegularizer", "dse", "Whitening2d", "WMSELoss", "whiten", "wmse", "norm_mse_loss",
    "CAPILoss", "capi", "capi_sinkhorn_knopp", "GramAnchoringLoss", "gram_anchoring_loss",
    "MSNLoss", "PMSNLoss", "PMSNCustomLoss", "msn", "pmsn", "pmsn_custom",
    "linear_distillation_loss", "masked_lm_loss", "MaskedLMLoss",
    "MAELoss", "Wav2Vec2ContrastiveLoss", "HuBERTLoss", "mae_loss", "sample_negatives", "wav2vec2_contrastive_loss",
    "codebook_diversity_loss", "hubert_loss",
    "IBOTPatchLoss", "IBOTPlusPlusPatchLoss", "ibot_patch", "ibot_plus_plus_patch",
    "roi_resample_to_grid",
]

# Resolve the always-available backends now: torch.compile cannot trace the registry's imports.
_registry.preload("reference", "torch")
