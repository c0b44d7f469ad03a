"""The fused last layer + soft-target cross-entropy core (``linear_distillation_loss``: iBOT's and
DINOv2/v3's head losses) and BERT's masked-LM loss on its hard-label form (``masked_lm_loss``),
against the unfused torch code (peer ``unfused``: the logits, softmax, log-softmax).

Sizes: N = 256 and iBOT's 5,000 masked patches at K = 65,536 prototypes, D = 256 (full set:
also DINOv3's 262,144); masked LM at BERT's V = 30,522, D = 768 on 8 × 128 and 32 × 128 tokens,
15% of them masked (the unfused code, as BERT's, computes the logits of every position).

GEMM floor: distillation, the student's and the teacher's logits forward (2·2NKD) and the
student's two gradient products backward (2·2NKD; the teacher takes no gradient); masked LM, the
logits of the masked rows forward (2MVD) and two products backward (4MVD).

Peers ``floor`` and ``floor-teacher`` time those GEMMs alone as a training step (the three
student GEMMs; with the teacher's logits, four), for ``bench.versus --peer floor``.

``python -m bench.bench_distillation --goal N K D`` measures the issue's goal once (peak RSS growth
of one fwd+bwd step in a fresh process, and its time against the three student GEMMs' floor).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import List

import torch
import torch.nn.functional as F

import fastssl

from . import core

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
MASKED_FRACTION = 0.15


def unfused_distillation(student, teacher, weight, teacher_weight, center):
    """The torch code fastssl replaces: (N, K) teacher targets and student log-probabilities."""
    with torch.no_grad():
        targets = F.softmax((teacher @ teacher_weight.T - center) / TEACHER_TEMP, dim=-1)
    return -(targets * F.log_softmax(student @ weight.T / STUDENT_TEMP, dim=-1)).sum(dim=-1).mean()


class _StudentGemms(torch.autograd.Function):
    """The GEMM floor as a training step: the student's logits forward, their two gradient
    products backward (the logits standing in for their gradient); the loss value is 0."""

    @staticmethod
    def forward(ctx, student, weight):
        logits = student @ weight.T
        ctx.save_for_backward(student, weight, logits)
        return logits.new_zeros(())

    @staticmethod
    def backward(ctx, _grad):
        student, weight, logits = ctx.saved_tensors
        return logits @ weight, logits.T @ student


def student_gemms(student, teacher, weight, teacher_weight, center):
    """Peer ``floor``: the three student GEMMs, nothing else."""
    return _StudentGemms.apply(student, weight)


def student_and_teacher_gemms(student, teacher, weight, teacher_weight, center):
    """Peer ``floor-teacher``: the three student GEMMs and the teacher's logits (no gradient),
    the four any exact step with the teacher's features does (the unfused code's too)."""
    with torch.no_grad():
        teacher @ teacher_weight.T
    return _StudentGemms.apply(student, weight)


def _distillation_inputs(rows: int, prototypes: int, dim: int):
    def make(device, dtype):
        student = core.randn((rows, dim), device, dtype)
        weight = core.randn((prototypes, dim), device, dtype)
        with torch.no_grad():
            weight /= dim ** 0.5  # logits of unit scale, as a normalised DINO head's
        teacher, teacher_weight = student.detach() + 0.1, weight.detach().clone()
        center = core.randn((prototypes,), device, dtype, False) * 0.1
        return (student, teacher, weight, teacher_weight, center), [student, weight]

    return make


def _fused_distillation(backend: str):
    def loss(student, teacher, weight, teacher_weight, center):
        return fastssl.linear_distillation_loss(student, teacher, weight, teacher_weight=teacher_weight,
                                                student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP, center=center,
                                                backend=backend)

    return loss


def distillation(rows: int, prototypes: int, dim: int = 256) -> core.Case:
    return core.Case(
        family="distillation", loss="linear_distillation", name=f"linear-distillation-n{rows}-k{prototypes}-d{dim}",
        sizes={"batch": rows, "prototypes": prototypes, "dim": dim},
        make_inputs=_distillation_inputs(rows, prototypes, dim), make_loss=_fused_distillation,
        peers={"unfused": lambda: unfused_distillation, "floor": lambda: student_gemms,
               "floor-teacher": lambda: student_and_teacher_gemms},
        gemm_flops={"fwd": 4 * rows * prototypes * dim, "bwd": 4 * rows * prototypes * dim},
        series=((f"Fused linear distillation, K={prototypes}, D={dim}", "batch"),),
    )


def _masked_lm_inputs(batch: int, tokens: int, vocab: int, dim: int):
    def make(device, dtype):
        hidden = core.randn((batch, tokens, dim), device, dtype)
        weight = core.randn((vocab, dim), device, dtype)
        bias = core.randn((vocab,), device, dtype)
        labels = torch.randint(0, vocab, (batch, tokens), device=device)
        labels[torch.rand(batch, tokens, device=device) >= MASKED_FRACTION] = -100
        return (hidden, weight, labels, bias), [hidden, weight, bias]

    return make


def unfused_masked_lm(hidden, weight, labels, bias):
    """BERT's code: the logits of every position, then cross-entropy with ignore_index."""
    return F.cross_entropy((hidden @ weight.T + bias).flatten(0, 1), labels.flatten(), ignore_index=-100)


def masked_lm(batch: int, tokens: int = 128, vocab: int = 30522, dim: int = 768) -> core.Case:
    masked = MASKED_FRACTION * batch * tokens
    return core.Case(
        family="distillation", loss="masked_lm", name=f"masked-lm-b{batch}-t{tokens}-v{vocab}-d{dim}",
        sizes={"batch": batch, "tokens": tokens, "vocab": vocab, "dim": dim},
        make_inputs=_masked_lm_inputs(batch, tokens, vocab, dim),
        make_loss=lambda backend: fastssl.MaskedLMLoss(backend=backend),
        peers={"unfused": lambda: unfused_masked_lm},
        gemm_flops={"fwd": 2 * masked * vocab * dim, "bwd": 4 * masked * vocab * dim},
        series=((f"Masked LM, V={vocab}, D={dim}", "batch"),),
    )


def cases(size_set: str) -> List[core.Case]:
    if size_set == "smoke":
        return [distillation(6, 37, 5), masked_lm(2, 8, 37, 5)]
    result = [distillation(256, 65536), distillation(5000, 65536), masked_lm(8), masked_lm(32)]
    if size_set == "full":
        result.append(distillation(5000, 262144))
    return result


def test_distillation(benchmark, bench_job):
    core.benchmark_job(benchmark, bench_job)


# --------------------------------------------------------------------------------------------
# The goal, measured once: peak memory and time of one step against the GEMM floor
# --------------------------------------------------------------------------------------------
def _goal_worker(rows: int, prototypes: int, dim: int, provider: str) -> dict:
    """One provider in this (fresh) process: peak RSS growth of fwd+bwd and the step's time."""
    from .memory import RssPeak

    torch.manual_seed(0)
    args, leaves = _distillation_inputs(rows, prototypes, dim)(torch.device("cpu"), torch.float32)
    fn = unfused_distillation if provider == "unfused" else _fused_distillation(provider)
    start = time.perf_counter()
    peak = core.peak_memory(fn, args, leaves, "fwd+bwd", RssPeak())  # two steps, the second counted
    step_s = (time.perf_counter() - start) / 2
    return {"provider": provider, "peak_bytes": peak, "step_s": step_s}


def _three_gemms_s(rows: int, prototypes: int, dim: int) -> float:
    """The floor: the student's logits and the two gradient products (no teacher GEMM), best of 2."""
    student, weight = torch.randn(rows, dim), torch.randn(prototypes, dim)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        grad_logits = student @ weight.T
        grad_logits @ weight, grad_logits.T @ student
        best = min(best, time.perf_counter() - start)
        del grad_logits
    return best


def goal(rows: int, prototypes: int, dim: int, providers) -> None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed tensors leave RSS (see bench.memory)
    results = []
    for provider in providers:
        out = subprocess.run([sys.executable, "-m", "bench.bench_distillation", "--goal-worker", str(rows),
                              str(prototypes), str(dim), provider], capture_output=True, text=True, env=env)
        results.append(json.loads(out.stdout.splitlines()[-1]) if out.returncode == 0
                       else {"provider": provider, "error": out.stderr.strip().splitlines()[-1:]})
    floor = _three_gemms_s(rows, prototypes, dim)
    print(f"N={rows} K={prototypes} D={dim}, {torch.get_num_threads()} threads; three student GEMMs: {floor:.2f} s")
    for r in results:
        if "error" in r:
            print(f"  {r['provider']}: failed: {r['error']}")
        else:
            print(f"  {r['provider']}: peak {r['peak_bytes'] / 2**20:.0f} MiB, step {r['step_s']:.2f} s "
                  f"({r['step_s'] / floor:.2f}x the three GEMMs)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--goal", nargs=3, type=int, metavar=("N", "K", "D"))
    parser.add_argument("--providers", nargs="+", default=["torch", "unfused"])
    parser.add_argument("--goal-worker", nargs=4)
    options = parser.parse_args()
    if options.goal_worker:
        n, k, d, name = options.goal_worker
        print(json.dumps(_goal_worker(int(n), int(k), int(d), name)))
    elif options.goal:
        goal(*options.goal, options.providers)
    else:
        parser.error("--goal N K D")
