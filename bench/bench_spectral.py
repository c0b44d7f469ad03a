"""Spectral losses: TiCo, MMCR, FroSSL, EMP-SSL and the hypersphere loss on (N, D) embeddings;
patch kernel alignment on (B, T, D) patch tokens (N = B·T rows; the teacher takes no gradient).

Sizes: N = 256 at D ∈ {128, 8192} (the issue's small and large covariance sizes; TiCo's and
EMP-SSL's projectors are 8192 / 4096 wide), plus N ∈ {64, 1024} at D = 2048 in the full set.

GEMM floor (the cheaper exact algorithm), per view: TiCo needs its D×D state, so C = ẐᵀẐ and ẐC'
(4ND²), backward elementwise; MMCR the centroids' smaller Gram (2·min(N, D)²·max(N, D)) and its
gradient product (as much again); FroSSL and EMP-SSL the smaller Gram of each view (2·min²·max)
and one product of that size backward; the hypersphere loss the N×N Gram of each view (2N²D)
and, backward, a recompute and one more product (4N²D); patch kernel alignment the per-image
T×T kernels of student and teacher (2·2BT²D, or the D×D cross-products when D < T) and one
product backward.
"""
from __future__ import annotations

from typing import List

import fastssl

from . import core, peers

SMALL_AND_LARGE = ((256, 128), (256, 8192))
MORE = ((64, 2048), (1024, 2048))
MMCR_VIEWS = 2  # k views per network: z = [online, momentum] has 2k = 4 rows per sample


def _two_view_list(loss):
    """Losses on a list of views, called with the case's two views."""
    return lambda a, b: loss([a, b])


def _smaller_gram_flops(n: int, dim: int) -> float:
    return 2 * min(n, dim) ** 2 * max(n, dim)


def _case(loss: str, module: str, title: str, n: int, dim: int, gemm_flops: dict, wrap=None,
          make_inputs=None, lightly_module: str = "lightly.loss") -> core.Case:
    wrap = wrap or (lambda f: f)
    return core.Case(
        family="spectral", loss=loss, name=f"{loss}-n{n}-d{dim}", sizes={"batch": n, "dim": dim},
        make_inputs=make_inputs or core.two_views(n, dim),
        make_loss=lambda backend: wrap(getattr(fastssl, module)(backend=backend)),
        peers={"lightly": lambda: wrap(peers.lightly(module, lightly_module)())},
        gemm_flops=gemm_flops,
        series=((f"{title}, N={n}", "dim"),),
    )


def _mmcr_views(n: int, dim: int):
    make = core.two_views(n * MMCR_VIEWS, dim)

    def inputs(device, dtype):
        (online, momentum), _ = make(device, dtype)
        online, momentum = (x.detach().reshape(n, MMCR_VIEWS, dim).requires_grad_(True) for x in (online, momentum))
        return (online, momentum), [online, momentum]

    return inputs


def dinov3_gram_code():
    """DINOv3's ``GramLoss.forward`` (defaults: normalised, per image, negatives removed) typed
    from its code: the plain torch peer of ``GramAnchoringLoss``."""
    import torch
    import torch.nn.functional as F

    def gram_loss(output_feats, target_feats):
        student, teacher = F.normalize(output_feats.float(), dim=-1), F.normalize(target_feats.float(), dim=-1)
        target_sim = torch.matmul(teacher, teacher.transpose(-1, -2))
        student_sim = torch.matmul(student, student.transpose(-1, -2))
        target_sim[target_sim < 0] = 0.0
        student_sim[student_sim < 0] = 0.0
        return F.mse_loss(student_sim, target_sim)

    return gram_loss


def gram_anchoring(images: int, tokens: int, dim: int) -> core.Case:
    """Per-image Grams of ``tokens`` patches; GEMM floor 2·2BN²D forward (student and teacher
    Grams), 2BN²D backward (one product)."""
    make = core.two_views(images * tokens, dim, second_requires_grad=False)

    def inputs(device, dtype):
        (student, teacher), _ = make(device, dtype)
        student = student.detach().reshape(images, tokens, dim).requires_grad_(True)
        return (student, teacher.reshape(images, tokens, dim)), [student]

    return core.Case(
        family="spectral", loss="gram_anchoring", name=f"gram_anchoring-b{images}-n{tokens}-d{dim}",
        sizes={"batch": images * tokens, "dim": dim}, make_inputs=inputs,
        make_loss=lambda backend: fastssl.GramAnchoringLoss(backend=backend),
        peers={"dinov3-code": dinov3_gram_code},
        gemm_flops={"fwd": 4 * images * tokens ** 2 * dim, "bwd": 2 * images * tokens ** 2 * dim},
        series=((f"Gram anchoring, {images} images × {tokens} tokens", "dim"),),
    )


GRAM_SIZES = ((2, 128, 128), (2, 128, 8192))  # the covariance suite's 256 rows, as 2 images
GRAM_MORE = ((8, 1024, 1024),)  # DINOv3's high-resolution phase: 32 × 32 patches per image


PATCH_IMAGES = 2  # patch kernel alignment: N rows = 2 images × N/2 tokens


def _patch_tokens(n: int, dim: int):
    make = core.two_views(n, dim, second_requires_grad=False)

    def inputs(device, dtype):
        (student, teacher), _ = make(device, dtype)
        student = student.detach().reshape(PATCH_IMAGES, n // PATCH_IMAGES, dim).requires_grad_(True)
        return (student, teacher.reshape(PATCH_IMAGES, n // PATCH_IMAGES, dim)), [student]

    return inputs


def at_size(n: int, d: int) -> List[core.Case]:
    """The N×D losses (every one with a lightly counterpart) at one size."""
    gram = _smaller_gram_flops(n, d)
    mmcr_gram = _smaller_gram_flops(n, d) + n * _smaller_gram_flops(2 * MMCR_VIEWS, d)
    return [
        _case("tico", "TiCoLoss", "TiCo", n, d, {"fwd": 4 * n * d * d, "bwd": 0}),
        _case("mmcr", "MMCRLoss", "MMCR", n, d, {"fwd": mmcr_gram, "bwd": mmcr_gram}, make_inputs=_mmcr_views(n, d)),
        _case("frossl", "FroSSLLoss", "FroSSL", n, d, {"fwd": 2 * gram, "bwd": 2 * gram}, wrap=_two_view_list),
        _case("emp_ssl", "EMPSSLLoss", "EMP-SSL", n, d, {"fwd": 2 * gram, "bwd": 2 * gram}, wrap=_two_view_list),
        _case("hypersphere", "HypersphereLoss", "Hypersphere", n, d,
              {"fwd": 4 * n * n * d, "bwd": 8 * n * n * d}, lightly_module="lightly.loss.hypersphere_loss"),
        _case("patch_kernel_alignment", "PatchKernelAlignmentLoss", "Patch kernel alignment", n, d,
              {"fwd": 4 * n * (n // PATCH_IMAGES) * d, "bwd": 2 * n * (n // PATCH_IMAGES) * d},
              make_inputs=_patch_tokens(n, d)),
    ]


def cases(size_set: str) -> List[core.Case]:
    if size_set == "smoke":
        sizes = ((6, 10),)
    elif size_set == "quick":
        sizes = SMALL_AND_LARGE
    else:
        sizes = SMALL_AND_LARGE + MORE
    result = [case for n, d in sizes for case in at_size(n, d)]
    if size_set == "smoke":
        return result + [gram_anchoring(2, 5, 6)]
    return result + [gram_anchoring(*size) for size in (GRAM_SIZES if size_set == "quick" else GRAM_SIZES + GRAM_MORE)]


def test_spectral(benchmark, bench_job):
    core.benchmark_job(benchmark, bench_job)
