"""Clustering and distillation: SwAV (with Sinkhorn-Knopp codes), Sinkhorn alone, DINO, iBOT, MSN / PMSN,
CAPI (16-32 images × 196 tokens, 49 predicted, 256-16,384 clusters).

Sizes (full set): SwAV with K=3000 prototypes and 2+6 crops (2 high-resolution, 6 low) of
64-1024 rows; Sinkhorn-Knopp on B×3000 scores, B up to 16,384 (4096 is SwAV's gathered batch);
DINO with 2 teacher and 2+10 student crops of 16-128 rows at 65,536 output dims. iBOT's patch
loss on M masked tokens of 14×14-token images (DINOv2: 65,536 prototypes), M = 256 (quick, at
8192 prototypes) up to M = 5000 (the issue's 5000 × 65,536: 1.3 GB per fp32 M×K tensor).

MSN / PMSN: 1 + 10 anchor views of B targets (MSN's 1 random-masked + 10 focal views), D = 256,
K = 1024 prototypes (MSN's ViT-S/16 setting), B ∈ {32, 256} (quick) and up to 1024 (full).

None of SwAV, Sinkhorn and DINO does a GEMM (prototype scores and head outputs are inputs): no
GEMM floor. MSN's floor is the anchors' logits (2·V·B·K·D) and their two gradients (twice that).
Scores are uniform in [−1, 1] (cosine similarities); "linear-domain" is SwAV's and lightly's
Sinkhorn algorithm (``peers.linear_domain_sinkhorn``), the issue's baseline.
"""
from __future__ import annotations

import functools
from typing import List

import torch

import fastssl

from . import core, peers

PROTOTYPES = 3000
DINO_DIM = 65536


def cosine_scores(shape, device, dtype, requires_grad: bool = True):
    """Uniform in [−1, 1]: the full range of SwAV's scores (normalised features · normalised
    prototypes); at ε = 0.05 a row spans up to 40 nats, as in training."""
    scores = torch.rand(*shape, device=device, dtype=torch.float32).mul_(2).sub_(1)
    return scores.to(dtype).requires_grad_(requires_grad)


def swav(batch: int, prototypes: int = PROTOTYPES, high: int = 2, low: int = 6) -> core.Case:
    def make(device, dtype) -> core.Inputs:
        crops = [cosine_scores((batch, prototypes), device, dtype) for _ in range(high + low)]
        return (crops[:high], crops[high:]), crops

    return core.Case(
        family="clustering", loss="swav", name=f"swav-b{batch}-k{prototypes}-{high}+{low}crops",
        sizes={"batch": batch, "prototypes": prototypes, "crops": high + low},
        make_inputs=make,
        make_loss=lambda backend: fastssl.SwaVLoss(backend=backend),
        peers={"lightly": peers.lightly("SwaVLoss")},
        series=((f"SwAV, K={prototypes}, {high}+{low} crops", "batch"),),
    )


def sinkhorn(batch: int, prototypes: int = PROTOTYPES) -> core.Case:
    def make(device, dtype) -> core.Inputs:
        return (cosine_scores((batch, prototypes), device, dtype, requires_grad=False),), []

    return core.Case(
        family="clustering", loss="sinkhorn_knopp", name=f"sinkhorn-b{batch}-k{prototypes}",
        sizes={"batch": batch, "prototypes": prototypes},
        make_inputs=make,
        make_loss=lambda backend: functools.partial(fastssl.functional.sinkhorn_knopp, backend=backend),
        peers={"lightly": peers.lightly_sinkhorn(), "linear-domain": peers.linear_domain_sinkhorn()},
        differentiable=False,
        series=((f"Sinkhorn-Knopp, K={prototypes}, 3 iterations", "batch"),),
    )


def dino(batch: int, dim: int = DINO_DIM, global_crops: int = 2, local_crops: int = 10) -> core.Case:
    """The teacher (an EMA copy) sees the global crops without gradient; the student sees all."""
    def make(device, dtype) -> core.Inputs:
        teacher = [core.randn((batch, dim), device, dtype, requires_grad=False) for _ in range(global_crops)]
        student = [core.randn((batch, dim), device, dtype) for _ in range(global_crops + local_crops)]
        return (teacher, student), student

    return core.Case(
        family="clustering", loss="dino", name=f"dino-b{batch}-d{dim}-{global_crops}+{local_crops}crops",
        sizes={"batch": batch, "dim": dim, "crops": global_crops + local_crops},
        make_inputs=make,
        make_loss=lambda backend: fastssl.DINOLoss(output_dim=dim, backend=backend),
        peers={"lightly": peers.lightly("DINOLoss", output_dim=dim)},
        series=((f"DINO, D={dim}, {global_crops}+{local_crops} crops", "batch"),),
    )


def capi(batch: int, clusters: int, tokens: int = 196, predicted: int = 49) -> core.Case:
    """CAPI: the teacher's cluster logits of every token (no gradient), the student's of the
    predicted ones (a quarter of a ViT's 14 × 14 patches), at their row-major teacher indices."""
    def make(device, dtype) -> core.Inputs:
        teacher = cosine_scores((batch, tokens, clusters), device, dtype, requires_grad=False)
        student = cosine_scores((batch, predicted, clusters), device, dtype)
        index = torch.stack([torch.randperm(tokens, device=device)[:predicted] for _ in range(batch)])
        return (teacher, student, index), [student]

    return core.Case(
        family="clustering", loss="capi", name=f"capi-b{batch}-k{clusters}-t{tokens}-p{predicted}",
        sizes={"batch": batch, "prototypes": clusters, "tokens": tokens},
        make_inputs=make,
        make_loss=lambda backend: fastssl.CAPILoss(backend=backend),
        peers={"lightly": peers.lightly("CAPILoss")},
        series=((f"CAPI, {tokens} tokens, {predicted} predicted", "prototypes"),),
    )


MSN_VIEWS = 11
MSN_DIM = 256
MSN_PROTOTYPES = 1024


def msn(batch: int, loss: str = "msn", views: int = MSN_VIEWS, dim: int = MSN_DIM,
        prototypes: int = MSN_PROTOTYPES) -> core.Case:
    """The target encoder (an EMA copy) gives the targets without gradient; anchors and
    prototypes are trained."""
    module = {"msn": "MSNLoss", "pmsn": "PMSNLoss"}[loss]

    def make(device, dtype) -> core.Inputs:
        anchors = core.randn((views * batch, dim), device, dtype)
        targets = core.randn((batch, dim), device, dtype, requires_grad=False)
        weight = core.randn((prototypes, dim), device, dtype)
        return (anchors, targets, weight), [anchors, weight]

    logits_flops = 2 * views * batch * prototypes * dim
    return core.Case(
        family="clustering", loss=loss, name=f"{loss}-b{batch}-v{views}-d{dim}-k{prototypes}",
        sizes={"batch": batch, "views": views, "dim": dim, "prototypes": prototypes},
        make_inputs=make,
        make_loss=lambda backend: getattr(fastssl, module)(backend=backend),
        peers={"lightly": peers.lightly(module)},
        gemm_flops={"fwd": logits_flops, "bwd": 2 * logits_flops},
        series=((f"{module}, {views} views, D={dim}, K={prototypes}", "batch"),),
    )


IBOT_TOKENS = 14 * 14  # a 224-pixel image in 16-pixel patches


def ibot(masked: int, dim: int = DINO_DIM) -> core.Case:
    """The teacher sees the masked tokens without gradient; the student's outputs take it."""
    images = -(-masked // (IBOT_TOKENS // 2))  # at most half of each image masked

    def make(device, dtype) -> core.Inputs:
        mask = torch.zeros(images * IBOT_TOKENS, dtype=torch.bool, device=device)
        mask[torch.randperm(images * IBOT_TOKENS, device=device)[:masked]] = True
        teacher = core.randn((masked, dim), device, dtype, requires_grad=False)
        student = core.randn((masked, dim), device, dtype)
        return (teacher, student, mask.view(images, 14, 14)), [student]

    return core.Case(
        family="clustering", loss="ibot", name=f"ibot-m{masked}-k{dim}", sizes={"masked": masked, "dim": dim},
        make_inputs=make,
        make_loss=lambda backend: fastssl.IBOTPatchLoss(output_dim=dim, backend=backend),
        peers={"lightly": peers.lightly("IBOTPatchLoss", output_dim=dim)},
        series=((f"iBOT patch loss, K={dim}", "masked"),),
    )


def at_size(rows: int, prototypes: int) -> List[core.Case]:
    """The size sweep's clustering cases (``bench.sweep``): SwAV and its Sinkhorn at ``rows``
    rows per crop and ``prototypes`` prototypes."""
    return [swav(rows, prototypes), sinkhorn(rows, prototypes)]


def distillation_at_size(rows: int, dim: int) -> List[core.Case]:
    """The size sweep's distillation cases (lightly's losses): DINO at ``rows`` rows per crop and
    iBOT at ``rows`` masked tokens, both at ``dim`` output dims; MSN / PMSN at ``rows`` targets in
    their own setting (D = 256, K = 1024: ``dim`` is DINO's output size, not theirs)."""
    return [dino(rows, dim), ibot(rows, dim), msn(rows), msn(rows, "pmsn")]


def cases(size_set: str) -> List[core.Case]:
    if size_set == "smoke":
        return [swav(6, 10, high=2, low=1), sinkhorn(6, 10), dino(3, 10, global_crops=2, local_crops=1),
                capi(2, 7, tokens=5, predicted=3), ibot(7, 10),
                msn(3, views=2, dim=5, prototypes=7), msn(3, "pmsn", views=2, dim=5, prototypes=7)]
    if size_set == "quick":
        return ([swav(b) for b in (32, 64)] + [sinkhorn(b) for b in (256, 1024)]
                + [dino(b) for b in (4, 8)] + [capi(16, k) for k in (256, 4096)] + [ibot(256, 8192), ibot(5000)]
                + [msn(b, loss) for loss in ("msn", "pmsn") for b in (32, 256)])
    return ([swav(b) for b in (64, 128, 256, 512, 1024)] + [sinkhorn(b) for b in (1024, 4096, 16384)]
            + [dino(b) for b in (16, 32, 64, 128)] + [capi(32, k) for k in (4096, 16384)]
            + [ibot(m) for m in (256, 1000, 5000)]
            + [msn(b, loss) for loss in ("msn", "pmsn") for b in (32, 256, 1024)])


def test_clustering(benchmark, bench_job):
    core.benchmark_job(benchmark, bench_job)
