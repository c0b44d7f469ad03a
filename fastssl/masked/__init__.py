"""The masked-prediction family: MAE's normalised-pixel loss (facebookresearch/mae), wav2vec 2.0's
contrastive and codebook diversity losses and HuBERT's masked cluster prediction (fairseq), with
the official code's values and draw order. lightly has none of them (its MAE example uses
``nn.MSELoss``); the masked-LM cross-entropy lives on the fused linear cross-entropy core.

Public API: :func:`mae_loss`, :class:`MAELoss`, :func:`sample_negatives`, :func:`masked_lm_loss`, :class:`MaskedLMLoss`,
:func:`wav2vec2_contrastive_loss`, :func:`codebook_diversity_loss`, :class:`Wav2Vec2ContrastiveLoss`,
:func:`hubert_loss`, :class:`HuBERTLoss`. Core ops: ``mae``, ``wav2vec2_contrastive``, ``hubert``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..runtime import registry
from ..runtime.dtypes import compute_dtype
from ..runtime.validation import (
    InputError,
    check_float_tensor,
    check_int_at_least,
    check_non_negative,
    check_positive,
    check_same_device,
)

Tensor = torch.Tensor


def _check_mask(name: str, mask, shape) -> Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise InputError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    return mask


def mae_loss(pred: Tensor, target: Tensor, mask: Tensor, *, patch_size: Optional[int] = None,
             norm_pix_loss: bool = True, backend: str = "auto") -> Tensor:
    r"""MAE's reconstruction loss (He et al., 2022; facebookresearch/mae ``forward_loss``): the
    target patchified (``nchpwq -> nhwpqc``), with ``norm_pix_loss`` each patch normalised by its
    mean and unbiased variance, :math:`\hat t = (t - \mu)/\sqrt{\sigma^2 + 10^{-6}}`, and

    .. math:: L = \frac{\sum_{n,l} m_{nl} \cdot \mathrm{mean}_j (\mathrm{pred}_{nlj} - \hat t_{nlj})^2}{\sum_{n,l} m_{nl}}

    in one pass with its gradient in closed form.

    Args:
        pred: (N, L, P) the decoder's patches, P = patch_size²·C.
        target: the images (N, C, H, W) with ``patch_size`` (H and W multiples of it, L = HW/p²),
            or patches (N, L, P) without it. The target is data: it gets no gradient.
        mask: (N, L), 1 (True) for a masked patch (the official weights: any float works).
        patch_size: p, for images. norm_pix_loss: the official default (True).
    Returns: 0-dim float32 loss (float64 for float64 inputs); NaN when the mask is all 0, as the
    official ``sum / mask.sum()``.
    """
    check_float_tensor("pred", pred, ndim=3)
    check_float_tensor("target", target)
    batch, patches, patch_values = pred.shape
    if patch_size is None:
        if target.shape != pred.shape:
            raise InputError(f"target must be patches of pred's shape {tuple(pred.shape)} (or images with "
                             f"patch_size), got {tuple(target.shape)}")
        pred_view, target_view, patch_dims = pred, target, 1
    else:
        p = check_int_at_least("patch_size", patch_size, 1)
        if target.dim() != 4 or target.shape[2] % p or target.shape[3] % p:
            raise InputError(f"target must be images (N, C, H, W) with H and W multiples of patch_size {p}, "
                             f"got {tuple(target.shape)}")
        channels, h, w = target.shape[1], target.shape[2] // p, target.shape[3] // p
        if (target.shape[0], h * w, p * p * channels) != (batch, patches, patch_values):
            raise InputError(f"pred must be (N, HW/p², p²C) = {(target.shape[0], h * w, p * p * channels)} for "
                             f"images {tuple(target.shape)} and patch_size {p}, got {tuple(pred.shape)}")
        # the patchified images as a strided view (N, h, w, p, p, C): no copy
        target_view = target.reshape(batch, channels, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
        pred_view, patch_dims = pred.reshape(batch, h, w, p, p, channels), 3
    _check_mask("mask", mask, (batch, patches))
    check_same_device(("pred", "target", "mask"), (pred, target, mask))
    if norm_pix_loss and patch_values < 2:
        raise ValueError(f"norm_pix_loss needs at least 2 values per patch (an unbiased variance), got pred "
                         f"{tuple(pred.shape)}")
    mask_view = mask.reshape(pred_view.shape[:pred_view.dim() - patch_dims])
    _, core = registry.select("mae", backend, (pred, target))
    return core(pred_view, target_view.detach(), mask_view, patch_dims, bool(norm_pix_loss))


class MAELoss(nn.Module):
    """MAE's loss: ``MAELoss(patch_size=None, norm_pix_loss=True)``; ``forward(pred, target, mask)``
    with target images (and ``patch_size``) or patches; see :func:`fastssl.functional.mae_loss`."""

    def __init__(self, patch_size: Optional[int] = None, norm_pix_loss: bool = True, *, backend: str = "auto"):
        super().__init__()
        if patch_size is not None:
            check_int_at_least("patch_size", patch_size, 1)
        self.patch_size, self.norm_pix_loss, self.backend = patch_size, norm_pix_loss, backend

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        return mae_loss(pred, target, mask, patch_size=self.patch_size, norm_pix_loss=self.norm_pix_loss,
                        backend=self.backend)


def sample_negatives(batch_size: int, num_frames: int, num_negatives: int = 100, *,
                     generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """fairseq wav2vec 2.0's ``sample_negatives`` (``cross_sample_negatives=0``) as indices: for each
    of the ``num_frames`` frames of each utterance, ``num_negatives`` other frames of the same
    utterance, uniform and with replacement, never the frame itself. One
    ``torch.randint(0, T − 1, (B, K·T))`` on the CPU generator (the global one, or ``generator``)
    exactly as fairseq draws it, then ``index >= t`` shifted by one.

    Returns: (B, T, K) int64 frame indices within each utterance, on ``device``."""
    check_int_at_least("batch_size", batch_size, 1)
    check_int_at_least("num_negatives", num_negatives, 1)
    if check_int_at_least("num_frames", num_frames, 1) < 2:
        raise InputError(f"sampling distractors needs at least 2 frames per utterance, got {num_frames}")
    own = torch.arange(num_frames)[:, None].expand(-1, num_negatives).flatten()
    indices = torch.randint(low=0, high=num_frames - 1, size=(batch_size, num_negatives * num_frames),
                            generator=generator)
    indices += (indices >= own).long()
    return indices.view(batch_size, num_frames, num_negatives).to(device)


def codebook_diversity_loss(codevector_logits: Tensor) -> Tensor:
    r"""wav2vec 2.0's diversity loss (fairseq ``GumbelVectorQuantizer``'s ``prob_perplexity`` and
    ``get_extra_losses``): with p̄_g the softmax of the quantizer's logits averaged over the frames,

    .. math:: L_d = \frac{GV - \sum_g \exp(-\sum_v \bar p_{gv} \log(\bar p_{gv} + 10^{-7}))}{GV}

    Args: codevector_logits: (..., G, V), the quantizer's logits of every quantized frame.
    Returns: 0-dim float32 (float64 for float64 logits)."""
    check_float_tensor("codevector_logits", codevector_logits, min_ndim=2)
    groups, entries = codevector_logits.shape[-2:]
    logits = codevector_logits.reshape(-1, groups, entries).to(compute_dtype(codevector_logits))
    average = torch.softmax(logits, dim=-1).mean(dim=0)
    perplexity = torch.exp(-torch.sum(average * torch.log(average + 1e-7), dim=-1)).sum()
    return (groups * entries - perplexity) / (groups * entries)


def wav2vec2_contrastive_loss(x: Tensor, y: Tensor, *, num_negatives: int = 100, logit_temp: float = 0.1,
                              negative_indices: Optional[Tensor] = None, codevector_logits: Optional[Tensor] = None,
                              diversity_weight: float = 0.1, generator: Optional[torch.Generator] = None,
                              backend: str = "auto") -> Tensor:
    r"""wav2vec 2.0's pre-training loss (Baevski et al., 2020; fairseq ``Wav2Vec2Model`` with the
    ``wav2vec`` criterion, ``infonce``): per masked frame t, the cross-entropy of its positive y_t
    against K distractors drawn from the same utterance (:func:`sample_negatives`), over cosine
    logits cos(x_t, ·)/``logit_temp`` (a distractor equal to y_t is left out, fairseq's
    ``neg_is_pos``), averaged over the B·T frames, plus ``diversity_weight`` times
    :func:`codebook_diversity_loss` of ``codevector_logits`` when given (fairseq's loss_weights[0]).
    The (K + 1)·B·T·C tensor of distractors is never formed.

    Args:
        x: (B, T, C) the context network's projected outputs at the masked frames; y: (B, T, C)
            their quantized (projected) targets, T ≥ 2.
        negative_indices: (B, T, K) int frame indices within each utterance; None: drawn by
            :func:`sample_negatives` (``num_negatives``, ``generator``).
        codevector_logits: (..., G, V) or None.
    Returns: 0-dim float32 loss (float64 for float64 inputs).
    """
    check_float_tensor("x", x, ndim=3)
    check_float_tensor("y", y, ndim=3)
    if x.shape != y.shape:
        raise InputError(f"x and y must have the same shape (B, T, C), got {tuple(x.shape)} and {tuple(y.shape)}")
    check_same_device(("x", "y"), (x, y))
    batch, frames, _ = x.shape
    temperature = check_positive("logit_temp", logit_temp)
    if negative_indices is None:
        negative_indices = sample_negatives(batch, frames, num_negatives, generator=generator, device=x.device)
    else:
        if not isinstance(negative_indices, torch.Tensor) or negative_indices.dtype.is_floating_point or \
                negative_indices.dtype == torch.bool:
            raise TypeError("negative_indices must be an integer tensor")
        if negative_indices.dim() != 3 or negative_indices.shape[:2] != (batch, frames):
            raise InputError(f"negative_indices must be (B, T, K) = ({batch}, {frames}, K), got "
                             f"{tuple(negative_indices.shape)}")
        if not torch.compiler.is_compiling() and negative_indices.numel() and not bool(
                ((negative_indices >= 0) & (negative_indices < frames)).all()):
            raise ValueError(f"negative_indices must be frame indices in [0, {frames})")
        negative_indices = negative_indices.long()
    _, core = registry.select("wav2vec2_contrastive", backend, (x, y))
    loss = core(x, y, negative_indices.to(x.device), temperature)
    if codevector_logits is not None:
        loss = loss + check_non_negative("diversity_weight", diversity_weight) * codebook_diversity_loss(
            codevector_logits)
    return loss


class Wav2Vec2ContrastiveLoss(nn.Module):
    """wav2vec 2.0's loss: ``Wav2Vec2ContrastiveLoss(num_negatives=100, logit_temp=0.1,
    diversity_weight=0.1)`` (fairseq's defaults); ``forward(x, y, codevector_logits=None,
    negative_indices=None)``; see :func:`fastssl.functional.wav2vec2_contrastive_loss`."""

    def __init__(self, num_negatives: int = 100, logit_temp: float = 0.1, diversity_weight: float = 0.1, *,
                 backend: str = "auto"):
        super().__init__()
        self.num_negatives = check_int_at_least("num_negatives", num_negatives, 1)
        self.logit_temp = check_positive("logit_temp", logit_temp)
        self.diversity_weight = check_non_negative("diversity_weight", diversity_weight)
        self.backend = backend

    def forward(self, x: Tensor, y: Tensor, codevector_logits: Optional[Tensor] = None,
                negative_indices: Optional[Tensor] = None) -> Tensor:
        return wav2vec2_contrastive_loss(x, y, num_negatives=self.num_negatives, logit_temp=self.logit_temp,
                                         negative_indices=negative_indices, codevector_logits=codevector_logits,
                                         diversity_weight=self.diversity_weight, backend=self.backend)


def hubert_loss(features: Tensor, targets: Tensor, code_embeddings: Tensor, mask: Tensor, *,
                padding_mask: Optional[Tensor] = None, logit_temp: float = 0.1, pred_masked_weight: float = 1.0,
                pred_nomask_weight: float = 0.0, backend: str = "auto") -> Tensor:
    r"""HuBERT's masked cluster prediction (Hsu et al., 2021; fairseq ``HubertModel.compute_nce`` and
    the ``hubert`` criterion) for one label set: per frame, the cross-entropy of its cluster among
    the V codes over cosine logits cos(f_t, e_v)/``logit_temp`` (a code exactly equal to the
    target's embedding is left out, fairseq's ``neg_is_pos``),

    .. math:: L = \frac{w_m \sum_{t \in M} \ell_t + w_u \sum_{t \notin M} \ell_t}{[w_m > 0]|M| + [w_u > 0]|U|}

    over the frames that are not padding, by row blocks of logits (never fairseq's (V + 1)·N·D
    broadcast product).

    Args:
        features: (..., D) the projected frames (``final_proj`` of the encoder's output).
        targets: (...) int cluster of each frame, in [0, V). code_embeddings: (V, D) (fairseq's
            ``label_embs_concat`` for this label set). mask: (...) bool, True where masked.
        padding_mask: (...) bool, True for padding, or None.
        pred_masked_weight, pred_nomask_weight: fairseq's (1.0 and 0.0), ≥ 0, not both 0.
    Returns: 0-dim float32 loss (float64 for float64 inputs); NaN when the weighted frames are
    none, as fairseq's division by a zero sample size.
    """
    check_float_tensor("features", features, min_ndim=1)
    check_float_tensor("code_embeddings", code_embeddings, ndim=2)
    if code_embeddings.shape[1] != features.shape[-1]:
        raise InputError(f"code_embeddings must be (V, D) with D = {features.shape[-1]} as features "
                         f"{tuple(features.shape)}, got {tuple(code_embeddings.shape)}")
    frames = features.shape[:-1]
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {getattr(targets, 'dtype', type(targets).__name__)}")
    if targets.shape != frames:
        raise InputError(f"targets must have shape {tuple(frames)} (features without D), got {tuple(targets.shape)}")
    for name, value in (("mask", mask), ("padding_mask", padding_mask)):
        if value is not None:
            _check_mask(name, value, frames)
            if value.dtype != torch.bool:
                raise TypeError(f"{name} must be a bool tensor, got {value.dtype}")
    check_same_device(("features", "targets", "code_embeddings", "mask"), (features, targets, code_embeddings, mask))
    if not torch.compiler.is_compiling() and not bool(((targets >= 0) & (targets < code_embeddings.shape[0])).all()):
        raise ValueError(f"targets must be cluster indices in [0, {code_embeddings.shape[0]})")
    temperature = check_positive("logit_temp", logit_temp)
    masked_weight = check_non_negative("pred_masked_weight", pred_masked_weight)
    nomask_weight = check_non_negative("pred_nomask_weight", pred_nomask_weight)
    if masked_weight == 0 and nomask_weight == 0:
        raise ValueError("pred_masked_weight and pred_nomask_weight are both 0: there is no loss")
    dtype = compute_dtype(features, code_embeddings)
    valid = torch.ones_like(mask) if padding_mask is None else ~padding_mask
    masked, unmasked = (mask & valid).to(dtype), (~mask & valid).to(dtype)
    sample_size = (masked.sum() if masked_weight > 0 else 0.0) + (unmasked.sum() if nomask_weight > 0 else 0.0)
    weights = (masked_weight * masked + nomask_weight * unmasked) / sample_size
    _, core = registry.select("hubert", backend, (features, code_embeddings))
    return core(features.reshape(-1, features.shape[-1]), code_embeddings, targets.reshape(-1), weights.reshape(-1),
                temperature)


class HuBERTLoss(nn.Module):
    """HuBERT's loss: ``HuBERTLoss(logit_temp=0.1, pred_masked_weight=1.0, pred_nomask_weight=0.0)``
    (fairseq's defaults); ``forward(features, targets, code_embeddings, mask, padding_mask=None)``;
    see :func:`fastssl.functional.hubert_loss`."""

    def __init__(self, logit_temp: float = 0.1, pred_masked_weight: float = 1.0, pred_nomask_weight: float = 0.0, *,
                 backend: str = "auto"):
        super().__init__()
        self.logit_temp = check_positive("logit_temp", logit_temp)
        self.pred_masked_weight = check_non_negative("pred_masked_weight", pred_masked_weight)
        self.pred_nomask_weight = check_non_negative("pred_nomask_weight", pred_nomask_weight)
        self.backend = backend

    def forward(self, features: Tensor, targets: Tensor, code_embeddings: Tensor, mask: Tensor,
                padding_mask: Optional[Tensor] = None) -> Tensor:
        return hubert_loss(features, targets, code_embeddings, mask, padding_mask=padding_mask,
                           logit_temp=self.logit_temp, pred_masked_weight=self.pred_masked_weight,
                           pred_nomask_weight=self.pred_nomask_weight, backend=self.backend)


# BERT's masked-LM cross-entropy, on the distillation family's fused linear cross-entropy core
from .masked_lm import MaskedLMLoss, masked_lm_loss  # noqa: E402

__all__ = ["mae_loss", "MAELoss", "sample_negatives", "wav2vec2_contrastive_loss", "codebook_diversity_loss",
           "Wav2Vec2ContrastiveLoss", "hubert_loss", "HuBERTLoss", "MaskedLMLoss", "masked_lm_loss"]
