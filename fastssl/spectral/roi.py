"""``roi_resample_to_grid``, lightly 1.6's helper for the cross-view :class:`PatchKernelAlignmentLoss`,
without torchvision.

lightly wraps ``torchvision.ops.roi_align(aligned=True, spatial_scale=1, sampling_ratio=-1)``. Its
sample points form a separable grid per box (a row coordinate per output row, a column coordinate
per output column), and bilinear weights and the out-of-map zeroing factor into a row part times a
column part, so each box's output is ``R · F · Cᵀ`` with two small interpolation matrices
``R`` (out_h, H) and ``C`` (out_w, W): two matmuls instead of a gather per sample.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def _axis_interpolation(start: Tensor, end: Tensor, out_size: int, in_size: int) -> Tensor:
    """roi_align's averaged bilinear weights along one axis, for every box: (B, out_size, in_size).

    ``start``/``end``: (B,) box edges in pixel units (the aligned half-pixel offset applied here).
    Follows torchvision's arithmetic order, so the sample count per bin (``ceil(extent / out)``)
    and the sample positions are bit-identical to its kernel's."""
    start = start - 0.5
    extent = end - 0.5 - start
    bin_size = extent / out_size
    samples = torch.ceil(extent / out_size)                           # per box, as roi_align's grid
    max_samples = max(int(samples.max().item()), 0) if samples.numel() else 0
    boxes = start.shape[0]
    if max_samples == 0:
        return start.new_zeros(boxes, out_size, in_size)
    bins = torch.arange(out_size, device=start.device, dtype=start.dtype)
    steps = torch.arange(max_samples, device=start.device, dtype=start.dtype) + 0.5
    count = samples.clamp(min=1)[:, None, None]
    # (B, out_size, max_samples) sample coordinates: start + bin·size + (i + ½)·size / count
    coords = (start[:, None, None] + bins[None, :, None] * bin_size[:, None, None]
              + steps[None, None, :] * bin_size[:, None, None] / count)
    used = steps[None, None, :] < samples[:, None, None]              # boxes with fewer samples
    inside = (coords >= -1.0) & (coords <= in_size)                    # roi_align zeroes the rest
    coords = coords.clamp(min=0)
    low = coords.floor().long()
    at_edge = low >= in_size - 1                                       # clamp onto the last pixel
    low = torch.where(at_edge, torch.full_like(low, in_size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(coords), coords - low.to(coords.dtype))
    keep = (used & inside).to(coords.dtype) / count
    weights = start.new_zeros(boxes, out_size, in_size)
    weights.scatter_add_(2, low.flatten(2), ((1 - frac) * keep).flatten(2))
    weights.scatter_add_(2, high.flatten(2), (frac * keep).flatten(2))
    return weights


def roi_resample_to_grid(feature_map: Tensor, boxes: Tensor, out_h: int, out_w: int) -> Tensor:
    """Resamples each sample's box of a dense feature map onto a common ``out_h × out_w`` grid, as
    lightly 1.6's ``lightly.loss.roi_resample_to_grid`` (``roi_align`` with ``aligned=True``, one
    box per sample, adaptive samples per bin). Differentiable w.r.t. ``feature_map``; like
    ``roi_align``, no gradient reaches ``boxes``.

    Args:
        feature_map: (B, C, H, W). boxes: (B, 4) as (x0, y0, x1, y1) in feature-grid coordinates.
        out_h, out_w: the output grid.
    Returns:
        (B, out_h · out_w, C) in row-major token order, in ``feature_map``'s dtype.
    Raises:
        ValueError: as lightly, for a feature map that is not 4-d, boxes not (B, 4), or a batch
            size mismatch.
    """
    if feature_map.dim() != 4:
        raise ValueError(f"feature_map must have shape (B, C, H, W) but has shape {tuple(feature_map.shape)}.")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape (B, 4) but has shape {tuple(boxes.shape)}.")
    if boxes.shape[0] != feature_map.shape[0]:
        raise ValueError(f"boxes batch size {boxes.shape[0]} does not match feature_map "
                         f"batch size {feature_map.shape[0]}.")
    height, width = feature_map.shape[-2:]
    boxes = boxes.detach().to(feature_map.dtype)                       # lightly casts; roi_align: no box grad
    rows = _axis_interpolation(boxes[:, 1], boxes[:, 3], out_h, height)
    cols = _axis_interpolation(boxes[:, 0], boxes[:, 2], out_w, width)
    pooled = torch.einsum("bph,bchw,bqw->bpqc", rows, feature_map, cols)
    return pooled.reshape(feature_map.shape[0], out_h * out_w, feature_map.shape[1])

