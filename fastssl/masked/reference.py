"""The plain-PyTorch spec of the masked-prediction family's core ops, written as the official code
computes them (MAE: facebookresearch/mae ``forward_loss``; wav2vec 2.0 and HuBERT: fairseq's
``compute_preds`` / ``compute_nce`` and their criteria), differentiable, in float32 (float64 inputs
stay float64, so ``gradcheck`` works). Every backend is tested against them, and they against
float64 formulas in the tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..runtime.dtypes import compute_dtype

Tensor = torch.Tensor

NORM_PIX_EPS = 1e-6  # MAE's ``(var + 1.e-6) ** .5``


def mae(pred: Tensor, target: Tensor, mask: Tensor, patch_dims: int, normalize: bool) -> Tensor:
    """MAE's ``forward_loss`` on patches: ``pred`` and ``target`` (N, *grid, *patch) with the last
    ``patch_dims`` dims one patch (the patchified view of the images, or (N, L, P) patches), mask
    (N, *grid) (1: masked, the loss's weight). Patchified as the official code does (a copy to
    (N, L, P)), per-patch targets normalised with the mean and the unbiased variance,

        loss = Σ mask · mean_patch (pred − target)² / Σ mask"""
    dtype = compute_dtype(pred, target)
    batch = pred.shape[0]
    p, t = pred.to(dtype).reshape(batch, mask[0].numel(), -1), target.to(dtype).reshape(batch, mask[0].numel(), -1)
    if normalize:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)
        t = (t - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = ((p - t) ** 2).mean(dim=-1)
    weights = mask.to(dtype).reshape(batch, -1)
    return (loss * weights).sum() / weights.sum()


def wav2vec2_contrastive(x: Tensor, y: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """wav2vec 2.0's contrastive term as fairseq computes it: x (B, T, C) the context network's
    projected outputs at the masked frames, y (B, T, C) their quantized targets, negatives (B, T, K)
    the indices of each frame's distractors within its utterance. The distractors are gathered
    into a (K, B, T, C) tensor, the logits are cosine similarities over ``temperature`` with the
    positive first, a distractor equal to the positive gets −inf, and the loss is the mean over the
    B·T frames of the cross-entropy with target 0."""
    dtype = compute_dtype(x, y)
    x, y = x.to(dtype), y.to(dtype)
    batch, frames, channels = y.shape
    offsets = (torch.arange(batch, device=y.device) * frames)[:, None, None]
    negs = y.reshape(-1, channels)[(negatives + offsets).reshape(-1)]
    negs = negs.view(batch, frames, negatives.shape[-1], channels).permute(2, 0, 1, 3)
    neg_is_pos = (y == negs).all(-1)
    targets = torch.cat([y.unsqueeze(0), negs], dim=0)
    logits = torch.cosine_similarity(x, targets, dim=-1) / temperature
    logits = torch.cat([logits[:1], logits[1:].masked_fill(neg_is_pos, float("-inf"))])
    logits = logits.transpose(0, 2).reshape(-1, logits.shape[0])
    return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long), reduction="sum") / \
        logits.shape[0]


def hubert(features: Tensor, codes: Tensor, targets: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """HuBERT's masked cluster prediction as fairseq computes it for one label set: features (N, D)
    the projected frames, codes (V, D) the label embeddings, targets (N,) each frame's cluster,
    weights (N,) each frame's weight (the criterion's pred_masked_weight or pred_nomask_weight over
    its sample size). The positive is the target's embedding, the candidates are all V codes,
    those equal to the positive (the target's own among them) get −inf; the logits are cosine
    similarities over ``temperature``; returns Σ_i weights_i · cross-entropy_i with target 0."""
    dtype = compute_dtype(features, codes)
    x, embeddings = features.to(dtype), codes.to(dtype)
    pos = torch.index_select(embeddings, 0, targets.long())
    negs = embeddings.unsqueeze(1).expand(-1, x.shape[0], -1)
    neg_is_pos = (pos == negs).all(-1)
    candidates = torch.cat([pos.unsqueeze(0), negs], dim=0)
    logits = torch.cosine_similarity(x, candidates, dim=-1) / temperature
    logits = torch.cat([logits[:1], logits[1:].masked_fill(neg_is_pos, float("-inf"))]).transpose(0, 1)
    per_frame = F.cross_entropy(logits, targets.new_zeros(x.shape[0], dtype=torch.long), reduction="none")
    return (per_frame * weights.to(dtype)).sum()
