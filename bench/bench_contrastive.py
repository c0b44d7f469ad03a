"""Contrastive losses: SimCLR's NT-Xent, MoCo's InfoNCE against a 65,536-row queue, CLIP, DCL/DCLW,
DetConB (region-level InfoNCE; BYOL's target branch receives no gradient), MACL, DirectCLR and the
CO2 regularizer (a KL between the two views' softmaxes over the other view's rows).

Sizes (full set): SimCLR batch 256-8192 at D=128 (the paper's projection) and D=768 (ViT-B
features); MoCo v2 batch 256-1024 against its 65,536-row queue at D=128; CLIP at D=768, batch
256-16384 per device.

GEMM floor: the logits S = Q Kᵀ (N×M from D) cost 2NMD FLOPs forward; the backward needs
dQ = G K and, when the keys receive a gradient, dK = Gᵀ Q: 2NMD each. SimCLR's keys are its
queries (R = 2B rows): S is symmetric, so the forward needs only half of it (R²D), and an
algorithm that keeps O(R) memory must make S again in the backward (R²D) before dZ = (G + Gᵀ) Z
(2R²D): 4R²D in all, the floor of fastssl's tiled algorithm (the general form would be 6R²D).
"""
from __future__ import annotations

import functools
from typing import List

import torch

import fastssl

from . import core, peers

SIMCLR_TEMPERATURE = 0.5  # lightly's default
MOCO_TEMPERATURE = 0.2  # MoCo v2
CLIP_LOGIT_SCALE = 100.0  # CLIP's learned scale saturates at its clamp, 100


def simclr(batch: int, dim: int) -> core.Case:
    rows = 2 * batch  # both views are queries and keys
    return core.Case(
        family="contrastive", loss="nt_xent", name=f"simclr-b{batch}-d{dim}",
        sizes={"batch": batch, "dim": dim},
        make_inputs=core.two_views(batch, dim),
        make_loss=lambda backend: fastssl.NTXentLoss(SIMCLR_TEMPERATURE, backend=backend),
        peers={"lightly": peers.lightly("NTXentLoss", temperature=SIMCLR_TEMPERATURE),
               "pytorch-metric-learning": peers.metric_learning_nt_xent(SIMCLR_TEMPERATURE)},
        gemm_flops={"fwd": rows * rows * dim, "bwd": 3 * rows * rows * dim},
        series=((f"SimCLR NT-Xent, D={dim}", "batch"),),
    )


def moco(batch: int, dim: int = 128, queue: int = 65536) -> core.Case:
    """MoCo: ``out0`` queries against their positive ``out1`` (the momentum encoder's, no gradient)
    and the queue, which every call updates (lightly's and fastssl's memory bank alike)."""
    return core.Case(
        family="contrastive", loss="nt_xent_memory_bank", name=f"moco-b{batch}-d{dim}-q{queue}",
        sizes={"batch": batch, "dim": dim, "queue": queue},
        make_inputs=core.two_views(batch, dim, second_requires_grad=False),
        make_loss=lambda backend: fastssl.NTXentLoss(MOCO_TEMPERATURE, memory_bank_size=(queue, dim),
                                                     backend=backend),
        peers={"lightly": peers.lightly("NTXentLoss", temperature=MOCO_TEMPERATURE,
                                        memory_bank_size=(queue, dim))},
        gemm_flops={"fwd": 2 * batch * queue * dim, "bwd": 2 * batch * queue * dim},
        series=((f"MoCo InfoNCE, queue {queue}, D={dim}", "batch"),),
    )


def clip(batch: int, dim: int = 768) -> core.Case:
    return core.Case(
        family="contrastive", loss="clip_loss", name=f"clip-b{batch}-d{dim}",
        sizes={"batch": batch, "dim": dim},
        make_inputs=core.two_views(batch, dim),
        make_loss=lambda backend: functools.partial(fastssl.functional.clip_loss, logit_scale=CLIP_LOGIT_SCALE,
                                                    backend=backend),
        gemm_flops={"fwd": 2 * batch * batch * dim, "bwd": 4 * batch * batch * dim},
        series=((f"CLIP, D={dim}", "batch"),),
    )


def dcl(batch: int, dim: int = 128, weighted: bool = False) -> core.Case:
    """DCL (DCLW with ``weighted``): SimCLR's logits with the positives out of the denominator."""
    rows, module = 2 * batch, ("DCLWLoss" if weighted else "DCLLoss")
    return core.Case(
        family="contrastive", loss="dclw" if weighted else "dcl", name=f"{module[:-4].lower()}-b{batch}-d{dim}",
        sizes={"batch": batch, "dim": dim},
        make_inputs=core.two_views(batch, dim),
        make_loss=lambda backend: getattr(fastssl, module)(backend=backend),
        peers={"lightly": peers.lightly(module)},
        gemm_flops={"fwd": rows * rows * dim, "bwd": 3 * rows * rows * dim},
        series=((f"{module[:-4]}, D={dim}", "batch"),),
    )


def _with_a_graph(build):
    """lightly's ``CO2Regularizer`` returns a copy of its value without gradient: its step is then a
    forward plus a zero-cost backward through ``0 · Σ inputs`` (fastssl's also computes the gradient)."""
    def wrapped():
        loss = build()
        return lambda out0, out1: loss(out0, out1) + 0 * (out0.sum() + out1.sum())

    return wrapped


def lightly_parity(loss: str, module: str, batch: int, dim: int = 128, lightly_module: str = "lightly.loss",
                   **kwargs) -> core.Case:
    """A two-view loss added for lightly parity, at lightly's defaults (``kwargs`` for both)."""
    rows = 2 * batch
    peer = peers.lightly(module, lightly_module, **kwargs)
    return core.Case(
        family="contrastive", loss=loss, name=f"{loss}-b{batch}-d{dim}", sizes={"batch": batch, "dim": dim},
        make_inputs=core.two_views(batch, dim),
        make_loss=lambda backend: getattr(fastssl, module)(backend=backend, **kwargs),
        peers={"lightly": _with_a_graph(peer) if module == "CO2Regularizer" else peer},
        gemm_flops={"fwd": rows * rows * dim, "bwd": 3 * rows * rows * dim},
        series=((f"{module}, D={dim}", "batch"),),
    )


def parity_cases(batch: int, dim: int = 128) -> List[core.Case]:
    return [lightly_parity("macl", "MACLLoss", batch, dim), lightly_parity("directclr", "DirectCLRLoss", batch, dim),
            lightly_parity("co2", "CO2Regularizer", batch, dim, lightly_module="lightly.loss.regularizer")]


def detcon(batch: int, regions: int = 16, dim: int = 128, masks: int = 16) -> core.Case:
    """DetConB on (batch, regions, dim) pooled regions of two views, region indices drawn from
    ``masks`` per image (repeats allowed); the targets are BYOL's, without gradient. Rows per
    view: batch·regions, against 2·batch·regions keys."""
    rows = 2 * batch * regions

    def make(device, dtype):
        preds = [core.randn((batch, regions, dim), device, dtype) for _ in range(2)]
        targets = [core.randn((batch, regions, dim), device, dtype, False) for _ in range(2)]
        index = [torch.randint(0, masks, (batch, regions), device=device) for _ in range(2)]
        return (*preds, *targets, *index), preds

    return core.Case(
        family="contrastive", loss="detcon", name=f"detconb-b{batch}-m{regions}-d{dim}",
        sizes={"batch": batch, "regions": regions, "dim": dim},
        make_inputs=make,
        make_loss=lambda backend: fastssl.DetConBLoss(gather_distributed=False, backend=backend),
        peers={"lightly": peers.lightly("DetConBLoss", gather_distributed=False)},
        gemm_flops={"fwd": 2 * rows * rows * dim, "bwd": 4 * rows * rows * dim},  # the backward recomputes S
        series=((f"DetConB, {regions} regions, D={dim}", "batch"),),
    )


def cases(size_set: str) -> List[core.Case]:
    if size_set == "smoke":
        return [simclr(6, 10), moco(6, 10, queue=24), clip(6, 10), dcl(6, 10), dcl(6, 10, weighted=True),
                detcon(3, 4, 10, masks=3)] + parity_cases(6)
    if size_set == "quick":
        # DCL and DetConB at the sizes: 256 and 8192 rows (DetCon: 16 regions per image), D = 128
        return ([simclr(b, 128) for b in (128, 256, 512)] + [simclr(b, 768) for b in (128, 256)]
                + [moco(b, queue=16384) for b in (64, 128)] + [clip(b) for b in (128, 256)]
                + [dcl(b, weighted=w) for b in (256, 8192) for w in (False, True)] + [detcon(b) for b in (16, 512)]
                + parity_cases(256) + parity_cases(8192))
    return ([simclr(b, d) for d in (128, 768) for b in (256, 512, 1024, 2048, 4096, 8192)]
            + [moco(b) for b in (256, 512, 1024)] + [clip(b) for b in (256, 1024, 4096, 16384)]
            + [dcl(b, weighted=w) for b in (256, 1024, 8192) for w in (False, True)]
            + [detcon(b) for b in (16, 64, 512)] + parity_cases(256) + parity_cases(8192))


def test_contrastive(benchmark, bench_job):
    core.benchmark_job(benchmark, bench_job)
