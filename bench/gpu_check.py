"""Validate a CUDA card in one go, inside a time budget: ``python -m bench.gpu_check``.

On a lent card (offline; torch, triton, numpy and ninja already there), from the repository root,
one command that fits one 10-minute device call (``--budget-s 480`` is the default)::

    pip install -q --no-build-isolation --no-deps -e . && timeout 570 python -m bench.gpu_check; rc=$?; cp -r bench/results/cuda-* "$OUT"/; exit $rc

It writes to ``bench/results/<machine key>/`` (``--out``; the ``cp`` hands them to a device tool
that returns what is under ``$OUT``: leave it out elsewhere) and exits 1 if a check failed, timed
out or deadlocked; ``timeout``'s SIGTERM still writes the results. The native CUDA ops are not
built by it (their rows read "not built"): ``python -m fastssl.build`` first, in its own call,
adds them. The cases, in priority order (each a case name for ``--cases``):

1. ``sinkhorn_barrier``: the Triton Sinkhorn-Knopp in one cooperative launch with grid barriers
   between its phases (``kernels/clustering.py``), at 4096 × 3000 — never run on a card before,
   and it spins forever if the programs are not all resident. Run first, alone, killed after
   ``BARRIER_TIMEOUT_S``: a kill once it has launched is reported as ``deadlock``, and every
   later worker runs the Sinkhorn one launch per phase instead (``--per-phase-sinkhorn``). Also:
   its error against float64, its time (goal: < 60 µs) and its kernel launches per call (goal: 1).
2. ``ops:<op>``: every op of the registry (``fastssl.runtime.registry.MANIFEST``) × dtype (float32,
   float16, bfloat16, float64) × backend against the op's reference in float64 (values and
   gradients), on the samples of ``tests/runtime/test_ops.py`` (that test requires one for every
   registered op, so a new op is covered here too). Bound: twice the reference's own error in the
   same dtype, or n·eps(dtype) (n: elements of the largest input) where the reference is exact.
3. ``launch_counts``: kernel launches (torch.profiler's device-side events) per training step of
   each family's main loss at a representative size, fastssl beside the family's plain PyTorch
   code and lightly (where it imports): issue 18's per-call overhead on a card.
4. ``large:<case>``: the large cases of issue 17 — Barlow Twins N=256 D=8192 (float32, bfloat16)
   and float64 N=64, Sinkhorn 4096×3000, DINO's 2 + 12 crops × 64 × 65,536 crop pairs, lightly's
   Barlow Twins and Sinkhorn: each backend timed (CUDA events) and checked against float64.
5. ``autotune``: NT-Xent with ``FASTSSL_TRITON_AUTOTUNE=1`` against the heuristic's tiles.
6. ``large:nt_xent_4m``: a 4M-row × 768 bfloat16 NT-Xent step (more than 2³¹ elements: int64
   indexing), the most expensive case (~5 minutes at 35% of bf16 peak). Where the budget leaves it
   out, run it alone in a second command: ``python -m bench.gpu_check --cases large:nt_xent_4m``.

Budget. Before each case starts, its cost is estimated (``estimate_s``) and the case is skipped —
the summary says so, with the numbers — when the estimate exceeds what is left of ``--budget-s``;
a running case is killed at the end of the budget, or past ``TIMEOUT_FACTOR`` × its estimate (at
least ``MIN_TIMEOUT_S``). The model, per case::

    seconds = compiles · COMPILE_S + rows · ROW_S + timings · TIMING_S + fixed
              + runs · (FLOPs / (EFFICIENCY_FLOPS · peak[dtype]) + bytes / (EFFICIENCY_BYTES · bandwidth))

with the card's nominal dense rates (``NOMINAL_RATES``, by device name; unknown cards get an A100
40 GB's, scaled by their SM count). On small shapes Triton's compiles dominate, so cases that
neither time nor share the card's throughput (``ops:*``, ``launch_counts``) run in ``--jobs``
worker processes at once; the timed cases run alone.

Processes. The command supervises worker processes (``--worker``) that run one case at a time;
every row is appended to ``gpu_check.jsonl`` as it arrives and ``gpu_check.{md,json}`` are
rewritten after each case, so a kill leaves every finished case on disk. A worker that hangs past
its case's timeout is killed and replaced; one that crashes (or whose CUDA context fails) is
replaced, and its case is reported as ``crashed``.

``--dry-run`` runs the same code on the CPU under ``TRITON_INTERPRET=1`` with tiny shapes (no
budget unless one is given: every case runs) and writes to a temporary folder (``--out`` to
choose), so the script is known to work before a card is lent; launch counts are aten ops there.
``--plan`` prints the cases with their estimates for this card (``--card NAME`` for another) and
what the budget keeps.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")

# (dry-run shape, card shape) of each large case
SIZES = {
    "nt_xent_4m": ((32, 8), (2 * 1024 * 1024, 768)),  # rows per view: 2 views = 4M rows
    "barlow_twins": ((16, 32), (256, 8192)),
    "barlow_twins_float64": ((8, 32), (64, 8192)),
    "sinkhorn": ((16, 24), (4096, 3000)),
    "dino_pairs": ((2, 3, 4, 64), (2, 14, 64, 65_536)),  # targets, students (2 + 12), batch, classes
    "autotune_nt_xent": ((32, 16), (8192, 128)),
    "launch_counts": ((16, 32), (1024, None)),  # rows per view, D (None: each family's usual D)
}
# The loss of each family whose launches per step are counted (``bench.sweep``'s case names);
# clustering also counts the Sinkhorn-Knopp on its own (its one-launch goal).
LAUNCH_COUNT_LOSSES = {"contrastive": ("nt_xent",), "redundancy": ("barlow_twins",), "spectral": ("tico",),
                       "byol": ("negative_cosine_similarity",), "clustering": ("swav", "sinkhorn_knopp"),
                       "whitening": ("wmse",), "distillation": ("dino",), "regularizers": ("koleo",)}

# ------------------------------------------------------------------------------------------------
# The cost model (see the module docstring)
# ------------------------------------------------------------------------------------------------
COMPILE_S = 2.0  # one Triton specialisation (kernel × dtypes × constexprs) on its first launch: Triton + ptxas
KERNELS_PER_TRITON_CALL = 3  # forward, its merge or split, backward
ROW_S = 0.05  # one checked (op, sample, dtype, backend): Python, the float64 reference, small launches
TIMING_S = 0.15  # one ``do_bench``: 25 ms of warm-up and 100 ms of repeats, its estimate, the sync
TIMED_RUNS = 8  # the step runs of a ``do_bench`` where one step is long (5 for its estimate, ≥ 1 + ≥ 1)
EFFICIENCY_FLOPS = 0.35  # of the nominal dense peak (issue 17's goal for NT-Xent is 0.55)
EFFICIENCY_BYTES = 0.5  # of the nominal memory bandwidth
WORKER_START_S = 20.0  # import torch and fastssl, the CUDA context, the Triton preload
BARRIER_TIMEOUT_S = 120.0  # compiling and running the one-launch Sinkhorn takes seconds; a spin never ends
TIMEOUT_FACTOR, MIN_TIMEOUT_S = 3.0, 60.0
DEFAULT_BUDGET_S = 480.0  # one 10-minute device call, less the install and a margin
DEFAULT_JOBS = 4  # workers for the untimed cases (16 CPU cores on a lent machine; compiles are single-threaded)


@dataclasses.dataclass(frozen=True)
class Rates:
    """A card's nominal dense rates: FLOP/s per input dtype (tensor cores for half inputs and
    float64; float32 without TF32) and memory bytes/s."""
    name: str
    flops: Dict[str, float]
    bytes_per_s: float
    multiprocessors: int


def _rates(name: str, half: float, single: float, double: float, bandwidth: float, sms: int) -> Rates:
    return Rates(name, {"bfloat16": half, "float16": half, "float32": single, "float64": double}, bandwidth, sms)


# (substring of the device name, rates): the first match; vendors' data sheets, dense (no sparsity)
NOMINAL_RATES = (
    ("H200", _rates("H200", 989e12, 67e12, 67e12, 4.8e12, 132)),
    ("H100 PCIe", _rates("H100 PCIe", 756e12, 51e12, 51e12, 2.0e12, 114)),
    ("H100", _rates("H100 SXM", 989e12, 67e12, 67e12, 3.35e12, 132)),
    ("A100", _rates("A100", 312e12, 19.5e12, 19.5e12, 1.555e12, 108)),
)
FALLBACK_RATES = NOMINAL_RATES[-1][1]


def card_rates(name: str, multiprocessors: Optional[int] = None) -> Rates:
    """The nominal rates of the card called ``name``; an unknown card gets an A100 40 GB's, scaled
    by its SM count (``multiprocessors``) where given."""
    for part, rates in NOMINAL_RATES:
        if part.lower() in name.lower():
            return rates
    scale = (multiprocessors or FALLBACK_RATES.multiprocessors) / FALLBACK_RATES.multiprocessors
    return _rates(f"{name} (as an A100 × {scale:.2f})", *(FALLBACK_RATES.flops[d] * scale for d in
                                                             ("bfloat16", "float32", "float64")),
                  FALLBACK_RATES.bytes_per_s * scale, multiprocessors or FALLBACK_RATES.multiprocessors)


@dataclasses.dataclass(frozen=True)
class Work:
    """What a case does on the card, for :func:`estimate_s`: ``runs`` steps of ``flops`` in
    ``dtype`` moving ``bytes``, ``compiles`` Triton specialisations, ``rows`` checked rows,
    ``timings`` do_bench calls, ``fixed`` seconds."""
    flops: float = 0.0
    dtype: str = "float32"
    bytes: float = 0.0
    runs: int = 1
    compiles: int = 0
    rows: int = 0
    timings: int = 0
    fixed: float = 0.0


def estimate_s(work: Work, rates: Rates) -> float:
    step_s = work.flops / (EFFICIENCY_FLOPS * rates.flops[work.dtype]) + work.bytes / (
        EFFICIENCY_BYTES * rates.bytes_per_s)
    return (work.compiles * COMPILE_S + work.rows * ROW_S + work.timings * TIMING_S + work.fixed
            + work.runs * step_s)


def _timed_work(step_flops: float, dtype: str, step_bytes: float, backends_timed: int, compiles: int) -> Work:
    """A large case: per backend one checked step and one do_bench (``TIMED_RUNS`` steps)."""
    return Work(flops=step_flops, dtype=dtype, bytes=step_bytes, runs=backends_timed * (1 + TIMED_RUNS),
                compiles=compiles, rows=backends_timed, timings=backends_timed)


def _floating(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _cast(args: Sequence, dtype, device) -> list:
    """The sample's arguments on ``device``, floating tensors in ``dtype`` (gradients kept)."""
    out = []
    for value in args:
        if _floating(value):
            out.append(value.detach().to(device, dtype).requires_grad_(value.requires_grad))
        elif hasattr(value, "to"):
            out.append(value.to(device))
        else:
            out.append(value)
    return out


def _outputs(result) -> list:
    return [t for t in (result if isinstance(result, (tuple, list)) else [result]) if _floating(t)]


def _cotangents(outputs: Sequence) -> list:
    """A fixed random weight (float64, the same for every call) per output: the gradients checked
    are those of Σ w·o. Plain Σ o is degenerate for ops whose outputs sum to a constant — the rows
    of a whitening are centred, so ∂Σy/∂x = 0 exactly and its float64 "truth" is rounding noise
    (≈ 1e-17), against which any backend's relative error is 1e8."""
    import torch

    generator = torch.Generator().manual_seed(2)
    return [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device) for o in outputs]


def _evaluate(fn: Callable, args: Sequence, differentiable: Optional[Sequence[bool]] = None):
    """(float outputs and the gradients (float64) of their weighted sum (``_cotangents``) for
    every input requiring one, which outputs were summed): those requiring a gradient, or the
    ``differentiable`` ones (the reference's: an output it detaches, a backend's op may not)."""
    import torch

    outputs = _outputs(fn(*args))
    differentiable = [o.requires_grad for o in outputs] if differentiable is None else differentiable
    leaves = [a for a in args if _floating(a) and a.requires_grad]
    summed = [o for o, use in zip(outputs, differentiable) if use and o.requires_grad]
    grads = []
    if leaves and summed:
        weighted = sum((o.double() * w).sum() for o, w in zip(summed, _cotangents(summed)))
        grads = torch.autograd.grad(weighted, leaves, allow_unused=True)
    return [o.detach() for o in outputs] + [g for g in grads if g is not None], differentiable


def _perturbed(args: Sequence, dtype) -> list:
    """The arguments (float64) with every floating input moved by one rounding of ``dtype``
    (relative ±eps/2, fixed signs): the reference's change is the error any implementation in
    ``dtype`` may make from rounding its inputs alone (the problem's conditioning)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    half_eps = torch.finfo(dtype).eps / 2
    out = []
    for value in args:
        if _floating(value):
            signs = torch.randint(0, 2, value.shape, generator=generator).to(value.device, torch.float64) * 2 - 1
            out.append((value.detach() * (1 + half_eps * signs)).requires_grad_(value.requires_grad))
        else:
            out.append(value)
    return out


def _relative_error(values: Sequence, exact: Sequence) -> float:
    worst = 0.0
    for value, truth in zip(values, exact):
        truth = truth.double()
        scale = truth.abs().max().item() if truth.numel() else 0.0
        diff = (value.double() - truth).abs().max().item() if truth.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


@dataclasses.dataclass(frozen=True)
class Context:
    """What a case runs with: the device, dry run or not, and ``progress(message)`` (recorded by
    the supervisor: where a killed case had got to)."""
    device: object
    dry: bool
    progress: Callable[[str], None]

    @property
    def pick(self) -> int:
        """The index of the shape to use in ``SIZES``' (dry run, card) pairs."""
        return 0 if self.dry else 1

    def randn(self, *shape, dtype=None, grad=True, seed=0):
        import torch

        generator = torch.Generator(self.device).manual_seed(seed)
        return torch.randn(*shape, generator=generator, device=self.device,
                           dtype=dtype or torch.float32).requires_grad_(grad)


def _error_bound(reference: Callable, args: Sequence, dtype, device) -> tuple:
    """(float64 outputs and gradients of ``reference``, which outputs are differentiable, the
    bound for an implementation in ``dtype``): twice the reference's own error in ``dtype`` (its
    inputs rounded to ``dtype``, or run in it where it has the kernels), at least n·eps(dtype)."""
    import torch

    exact, differentiable = _evaluate(reference, _cast(args, torch.float64, device))
    own_error = _relative_error(_evaluate(reference, _perturbed(_cast(args, torch.float64, device), dtype),
                                          differentiable)[0], exact)
    try:
        own_error = max(own_error, _relative_error(
            _evaluate(reference, _cast(args, dtype, device), differentiable)[0], exact))
    except Exception:  # noqa: BLE001 - the reference may lack a kernel in this dtype on this device
        pass
    elements = max((a.numel() for a in args if _floating(a)), default=1)
    return exact, differentiable, max(2 * own_error, elements * torch.finfo(dtype).eps)


@functools.lru_cache(maxsize=None)
def _indexed_op_samples() -> tuple:
    """((index, op, sample) …): the tests' sample per registered op, float64 on the CPU."""
    import torch

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from runtime.test_ops import _op_samples  # noqa: E402 - the tests' sample per registered op

    return tuple((index, op, sample) for index, (op, sample) in enumerate(_op_samples(torch.float64)))


def check_op(ctx: Context, op: str) -> List[Dict[str, object]]:
    """Section ``ops``: one row per (sample, dtype, backend) of ``op``."""
    import torch

    from fastssl import backends

    rows = []
    reference = backends.implementation(op, "reference").fn
    for index, _, sample in (entry for entry in _indexed_op_samples() if entry[1] == op):
        for dtype_name in DTYPE_NAMES:
            dtype = getattr(torch, dtype_name)
            args = _cast(sample, dtype, ctx.device)
            exact, differentiable, bound = _error_bound(reference, args, dtype, ctx.device)
            for backend in backends.MANIFEST[op]:
                row = {"section": "ops", "op": op, "sample": index, "dtype": dtype_name, "backend": backend,
                       "bound": bound}
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                reasons = backends.unavailable_reasons(op, backend, tensors)
                if reasons:
                    row.update(status="unavailable", reason="; ".join(reasons))
                else:
                    try:
                        error = _relative_error(_evaluate(backends.implementation(op, backend).fn,
                                                          _cast(args, dtype, ctx.device), differentiable)[0], exact)
                    except Exception as failure:  # noqa: BLE001 - any failure is a finding
                        row.update(status="failed", reason=_failure(failure))
                    else:
                        row.update(error=error, status="ok" if error <= bound else "failed",
                                   reason="" if error <= bound else f"error {error:.3g} > bound {bound:.3g}")
                rows.append(row)
        ctx.progress(f"sample {index} done")
    return rows


def _failure(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def _once_ms(step: Callable[[], object], device) -> tuple:
    """(milliseconds of one run of ``step``, its result), the device synchronised around it."""
    import torch

    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    result = step()
    synchronize()
    return (time.perf_counter() - start) * 1e3, result


def _time_ms(step: Callable[[], object], device, leaves: Sequence = ()) -> float:
    """Median milliseconds of ``step``: CUDA events through ``triton.testing.do_bench``; one
    wall-clock run on the CPU (dry run: the number is no timing)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(step, warmup=25, rep=100, grad_to_none=list(leaves))
    return _once_ms(step, device)[0]


def _peak_bytes(device) -> Optional[int]:
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _backend_rows(ctx: Context, case: str, op: str, make_args: Callable[[object], list], dtypes: Sequence[str]
                  ) -> List[Dict[str, object]]:
    """One row per (dtype, backend) of ``op``: its time (forward + backward) and its error against
    the float64 reference on the same inputs."""
    import torch

    from fastssl import backends

    rows = []
    for dtype_name in dtypes:
        args = make_args(getattr(torch, dtype_name))
        exact, differentiable = _evaluate(backends.implementation(op, "reference").fn,
                                          _cast(args, torch.float64, ctx.device))
        for backend in backends.MANIFEST[op]:
            row = {"section": "large", "case": case, "op": op, "dtype": dtype_name, "backend": backend}
            reasons = backends.unavailable_reasons(op, backend, [a for a in args if isinstance(a, torch.Tensor)])
            if reasons:
                row.update(status="unavailable", reason="; ".join(reasons))
                rows.append(row)
                continue
            fn = backends.implementation(op, backend).fn
            try:
                error = _relative_error(_evaluate(fn, args, differentiable)[0], exact)
                step = (lambda: _evaluate(fn, args, differentiable)) if any(differentiable) else (lambda: fn(*args))
                milliseconds = _time_ms(step, ctx.device, [a for a in args if _floating(a)])
            except Exception as failure:  # noqa: BLE001 - out of memory, a launch failure: a finding
                row.update(status="failed", reason=_failure(failure))
            else:
                row.update(status="ok", error=error, median_ms=milliseconds)
            rows.append(row)
        ctx.progress(f"{dtype_name} done")
    return rows


def _sinkhorn_args(ctx: Context, dtype) -> list:
    """Sinkhorn-Knopp's op arguments: scores (B, K), 3 iterations, ε = 0.05, uniform marginals,
    no tolerance, one process."""
    batch, prototypes = SIZES["sinkhorn"][ctx.pick]
    return [ctx.randn(batch, prototypes, dtype=dtype, grad=False), 3, 0.05, None, None, 0.0, False]


def sinkhorn_barrier(ctx: Context) -> List[Dict[str, object]]:
    """The one-launch Triton Sinkhorn (cooperative grid, grid barriers between phases): does it
    finish, is it right, how fast, how many launches. Its progress messages say where a kill found
    it: once it has launched, a kill reads as a deadlock of the barrier."""
    import torch

    from bench import op_counts
    from fastssl import backends
    from fastssl.kernels import clustering, occupancy

    args = _sinkhorn_args(ctx, torch.float32)
    scores = args[0]
    tiles = math.prod(math.ceil(size / block) for size, block in
                      zip(scores.shape, clustering.phase_blocks(torch.float32, *scores.shape)))
    resident = clustering.RESIDENT_PROGRAMS_PER_SM * occupancy.multiprocessors(ctx.device)
    row = {"section": "barrier", "case": "sinkhorn_barrier", "op": "sinkhorn", "dtype": "float32", "backend": "triton",
           "shape": list(scores.shape), "cooperative": clustering.persistent(scores), "tiles": tiles,
           "programs": min(tiles, resident) if clustering.persistent(scores) else tiles}
    reasons = backends.unavailable_reasons("sinkhorn", "triton", [scores])
    if reasons:
        return [dict(row, status="unavailable", reason="; ".join(reasons))]
    fn = backends.implementation("sinkhorn", "triton").fn
    ctx.progress("launching (the first launch compiles)")
    codes = fn(*args)
    ctx.progress("launched: waiting for the grid barriers")
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    ctx.progress("finished")
    exact, _, bound = _error_bound(backends.implementation("sinkhorn", "reference").fn, args, torch.float32,
                                   ctx.device)
    error = _relative_error([codes], exact)
    launches = op_counts.launches(fn, tuple(args), (), ctx.device, forward_only=True)
    row.update(error=error, bound=bound, median_ms=_time_ms(lambda: fn(*args), ctx.device),
               launches_per_call=sum(launches.values()), launches=dict(launches),
               counted=op_counts.unit(ctx.device), status="ok" if error <= bound else "failed",
               reason="" if error <= bound else f"error {error:.3g} > bound {bound:.3g}")
    if not row["cooperative"]:
        row["note"] = "one launch per phase here: the cooperative launch runs on a card only"
    return [row]


def launch_counts(ctx: Context, losses: Optional[Dict[str, Sequence[str]]] = None) -> List[Dict[str, object]]:
    """Section ``launch_counts``: per training step (forward + backward; the Sinkhorn's forward)
    of each family's main loss (``LAUNCH_COUNT_LOSSES``), kernel launches on a card — aten ops on
    the CPU — for fastssl (``backend="auto"``), the family's plain PyTorch code and lightly."""
    from bench import op_counts, sweep

    rows_per_view, dim = SIZES["launch_counts"][ctx.pick]
    rows = []
    for family, names in (losses or LAUNCH_COUNT_LOSSES).items():
        for case in sweep.sweep_cases(family, rows_per_view, dim, names):
            counted = op_counts.count_case(case, sweep.providers(case), ctx.device)
            ours = counted["skipped"].get(sweep.FASTSSL)
            rows.append({"section": "launch_counts", "case": case.name, "family": family, "loss": case.loss,
                         "rows": rows_per_view, "dim": sweep.case_dim(case), "counted": op_counts.unit(ctx.device),
                         **counted, "status": "failed" if ours else "ok", "reason": ours or ""})
            ctx.progress(f"{case.name} counted")
    return rows


def _barlow_args(ctx: Context, size: str) -> Callable[[object], list]:
    batch, dim = SIZES[size][ctx.pick]
    return lambda dtype: [ctx.randn(batch, dim, dtype=dtype), ctx.randn(batch, dim, dtype=dtype, seed=1), 5e-3]


def _dino_args(ctx: Context) -> Callable[[object], list]:
    import torch

    targets, students, batch, classes = SIZES["dino_pairs"][ctx.pick]
    return lambda dtype: [torch.softmax(ctx.randn(targets, batch, classes, grad=False) * 10, -1).to(dtype),
                          ctx.randn(students, batch, classes, dtype=dtype, seed=1), 10.0]


def nt_xent_4m(ctx: Context) -> List[Dict[str, object]]:
    """One 4M-row × 768 bfloat16 NT-Xent step (``backend="auto"``): finite, near log(2N − 1) (random
    views), its time and peak memory."""
    import torch

    import fastssl.functional as fn

    rows_per_view, dim = SIZES["nt_xent_4m"][ctx.pick]
    a, b = ctx.randn(rows_per_view, dim, dtype=torch.bfloat16), ctx.randn(rows_per_view, dim, dtype=torch.bfloat16,
                                                                         seed=1)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    row = {"section": "large", "case": "nt_xent_4m", "op": "info_nce_self", "dtype": "bfloat16", "backend": "auto",
           "shape": [2 * rows_per_view, dim], "int64_indexing": 2 * rows_per_view * dim >= 2**31}

    def step():
        loss = fn.nt_xent(a, b)
        loss.backward()
        return loss.detach()

    try:
        milliseconds, loss = _once_ms(step, ctx.device)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(a.grad).all()) and bool(torch.isfinite(b.grad).all())
        # random views: every logit is near 0, so the loss is near log(2N − 1)
        near = abs(loss.item() - math.log(2 * rows_per_view - 1)) < 1.0
        row.update(status="ok" if finite and near else "failed", median_ms=milliseconds, loss=loss.item(),
                   peak_memory_bytes=_peak_bytes(ctx.device), reason="" if finite and near else "non-finite or off loss")
    except Exception as failure:  # noqa: BLE001
        row.update(status="failed", reason=_failure(failure))
    return [row]


def lightly_rows(ctx: Context) -> List[Dict[str, object]]:
    """lightly's Barlow Twins and SwAV Sinkhorn at the large cases' shapes (unavailable where
    lightly does not import)."""
    from bench import peers

    try:
        peers.lightly_module()
    except ImportError as missing:
        return [{"section": "large", "case": "lightly", "backend": "lightly", "status": "unavailable",
                 "reason": f"lightly is not importable ({missing})"}]
    z_a, z_b, _ = _barlow_args(ctx, "barlow_twins")(None)
    barlow = peers.lightly("BarlowTwinsLoss")()
    rows = [{"section": "large", "case": "barlow_twins", "op": "barlow_twins", "dtype": "float32",
             "backend": "lightly", "status": "ok",
             "median_ms": _time_ms(lambda: barlow(z_a, z_b).backward(), ctx.device, [z_a, z_b])}]
    scores = _sinkhorn_args(ctx, None)[0]
    sinkhorn = peers.lightly_sinkhorn(iterations=3, epsilon=0.05)()
    rows.append({"section": "large", "case": "sinkhorn", "op": "sinkhorn", "dtype": "float32", "backend": "lightly",
                 "status": "ok", "median_ms": _time_ms(lambda: sinkhorn(scores), ctx.device)})
    return rows


def autotune_pass(ctx: Context) -> List[Dict[str, object]]:
    """Section ``autotune``: NT-Xent (half inputs on the triton backend) with the heuristic's tiles, then with
    ``FASTSSL_TRITON_AUTOTUNE=1`` (each candidate timed once per shape)."""
    import torch

    import fastssl.functional as fn
    from fastssl import backends

    rows_per_view, dim = SIZES["autotune_nt_xent"][ctx.pick]
    dtype = torch.float32 if ctx.dry else torch.float16  # the interpreter: no half arithmetic worth the time
    a, b = (ctx.randn(rows_per_view, dim, dtype=dtype, seed=seed) for seed in (0, 1))
    rows = []
    for autotune in ("0", "1"):
        row = {"section": "autotune", "case": "autotune_nt_xent", "dtype": str(dtype).split(".")[1],
               "backend": "triton", "autotune": autotune == "1"}
        reasons = backends.unavailable_reasons("info_nce_self", "triton", [a, b])
        if reasons:
            row.update(status="unavailable", reason="; ".join(reasons))
            rows.append(row)
            continue
        with _environment("FASTSSL_TRITON_AUTOTUNE", autotune), _cpu_candidate_timer(ctx.device):
            try:
                def step():
                    fn.nt_xent(a, b, backend="triton").backward()

                step()  # the tuning run (timed once per candidate), outside the measurement
                row.update(status="ok", median_ms=_time_ms(step, ctx.device, [a, b]))
            except Exception as failure:  # noqa: BLE001
                row.update(status="failed", reason=_failure(failure))
        rows.append(row)
        ctx.progress(f"autotune={autotune} done")
    return rows


@contextlib.contextmanager
def _cpu_candidate_timer(device):
    """On the CPU (dry run) the autotuner's ``triton.testing.do_bench`` has no CUDA events: one
    wall-clock run per candidate instead, so the tuning path itself runs."""
    if device.type == "cuda":
        yield
        return
    from triton import testing

    saved = testing.do_bench
    testing.do_bench = lambda fn, *args, **kwargs: _time_ms(fn, device)
    try:
        yield
    finally:
        testing.do_bench = saved


@contextlib.contextmanager
def _environment(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name)
        else:
            os.environ[name] = saved


@dataclasses.dataclass(frozen=True)
class CheckCase:
    """One unit of the check: ``run(ctx)`` returns its rows. ``parallel``: untimed, so it may share
    the card with other workers; ``timeout_s``: a fixed timeout (else from the estimate)."""
    name: str
    section: str
    run: Callable[[Context], List[Dict[str, object]]]
    work: Work
    parallel: bool = False
    timeout_s: Optional[float] = None


def _ops_work(op: str) -> Work:
    from fastssl import backends

    samples = sum(entry[1] == op for entry in _indexed_op_samples())
    triton_calls = samples * len(DTYPE_NAMES) if "triton" in backends.MANIFEST[op] else 0
    return Work(rows=samples * len(DTYPE_NAMES) * len(backends.MANIFEST[op]),
                compiles=triton_calls * KERNELS_PER_TRITON_CALL)


def check_cases() -> List[CheckCase]:
    """Every case at the card's shapes, in priority order (see the module docstring)."""
    from fastssl import backends

    def backends_of(op: str, dtypes: int = 1) -> int:
        return len(backends.MANIFEST[op]) * dtypes

    batch, dim = SIZES["barlow_twins"][1]
    # the Gram path: N·D² per GEMM, three GEMMs a step; the D² matrix read and written a few times
    barlow = _timed_work(6 * batch * dim**2, "float32", 4 * (6 * batch * dim + 4 * dim**2), backends_of("barlow_twins", 2),
                         2 * KERNELS_PER_TRITON_CALL)
    batch64, dim64 = SIZES["barlow_twins_float64"][1]
    scores_bytes = 4 * math.prod(SIZES["sinkhorn"][1])
    sinkhorn_bytes = (2 * 3 + 1) * scores_bytes  # a pass over the scores per phase of 3 iterations
    targets, students, dino_batch, classes = SIZES["dino_pairs"][1]
    rows_per_view, nt_dim = SIZES["nt_xent_4m"][1]
    tune_rows, tune_dim = SIZES["autotune_nt_xent"][1]
    # a fused NT-Xent step: the logits' GEMM forward, recomputed backward, and dQ, dK: 4 × 2·(2N)²·D
    tune_flops = 4 * 2 * (2 * tune_rows) ** 2 * tune_dim
    cases = [CheckCase("sinkhorn_barrier", "barrier", sinkhorn_barrier,
                       Work(bytes=sinkhorn_bytes, runs=TIMED_RUNS + 3, compiles=1, rows=1, timings=1, fixed=5.0),
                       timeout_s=BARRIER_TIMEOUT_S)]
    ops = dict.fromkeys(entry[1] for entry in _indexed_op_samples())
    cases += [CheckCase(f"ops:{op}", "ops", functools.partial(check_op, op=op), _ops_work(op), parallel=True)
              for op in ops]
    counted = sum(len(names) for names in LAUNCH_COUNT_LOSSES.values())
    providers = 3  # fastssl, plain PyTorch, lightly: a warm-up and a profiled step each
    cases.append(CheckCase("launch_counts", "launch_counts", launch_counts,
                           Work(runs=2 * providers * counted, compiles=counted * KERNELS_PER_TRITON_CALL,
                                rows=counted, fixed=10.0), parallel=True))
    cases += [
        CheckCase("large:barlow_twins", "large",
                  lambda ctx: _backend_rows(ctx, "barlow_twins", "barlow_twins", _barlow_args(ctx, "barlow_twins"),
                                            ("float32", "bfloat16")), barlow),
        CheckCase("large:barlow_twins_float64", "large",
                  lambda ctx: _backend_rows(ctx, "barlow_twins_float64", "barlow_twins",
                                            _barlow_args(ctx, "barlow_twins_float64"), ("float64",)),
                  _timed_work(6 * batch64 * dim64**2, "float64", 8 * 4 * dim64**2, backends_of("barlow_twins"),
                              KERNELS_PER_TRITON_CALL)),
        CheckCase("large:sinkhorn", "large",
                  lambda ctx: _backend_rows(ctx, "sinkhorn", "sinkhorn", functools.partial(_sinkhorn_args, ctx),
                                            ("float32", "bfloat16")),
                  _timed_work(0, "float32", sinkhorn_bytes, backends_of("sinkhorn", 2), 2)),
        CheckCase("large:dino_pairs", "large",
                  lambda ctx: _backend_rows(ctx, "dino_pairs", "soft_cross_entropy_pairs", _dino_args(ctx),
                                            ("float32", "bfloat16")),
                  _timed_work(0, "float32", 6 * 4 * (targets + students) * dino_batch * classes,
                              backends_of("soft_cross_entropy_pairs", 2), 2 * KERNELS_PER_TRITON_CALL)),
        CheckCase("large:lightly", "large", lightly_rows, _timed_work(barlow.flops, "float32", barlow.bytes, 2, 0)),
        CheckCase("autotune", "autotune", autotune_pass,
                  Work(flops=tune_flops, dtype="float16", runs=2 * (2 + TIMED_RUNS) + 3, timings=2, rows=2,
                       compiles=(1 + 3) * KERNELS_PER_TRITON_CALL)),  # the heuristic's tiles and 3 candidates
        CheckCase("large:nt_xent_4m", "large", nt_xent_4m,
                  Work(flops=4 * 2 * (2 * rows_per_view) ** 2 * nt_dim, dtype="bfloat16", compiles=KERNELS_PER_TRITON_CALL,
                       rows=1)),
    ]
    return cases


def select(cases: Sequence[CheckCase], names: Sequence[str]) -> List[CheckCase]:
    """The cases named (a name, or a prefix before ":" such as ``ops``), in priority order."""
    if not names:
        return list(cases)
    chosen = [case for case in cases if any(case.name == name or case.name.startswith(name + ":") for name in names)]
    unknown = [name for name in names if not any(case.name == name or case.name.startswith(name + ":")
                                                 for case in cases)]
    if unknown:
        raise ValueError(f"no case named {unknown}; the cases: {[case.name for case in cases]}")
    return chosen


def plan(cases: Sequence[CheckCase], rates: Rates, budget_s: Optional[float], jobs: int) -> List[Dict[str, object]]:
    """A preview of the supervisor's choices: each case's estimate, when it would start (the
    untimed cases spread over ``jobs`` workers) and whether it fits what is left of the budget."""
    clock, preview = WORKER_START_S, []
    for case in cases:
        estimate = estimate_s(case.work, rates)
        fits = budget_s is None or clock + estimate <= budget_s
        preview.append({"case": case.name, "estimate_s": estimate, "start_s": clock, "fits": fits})
        if fits:
            clock += estimate / jobs if case.parallel else estimate
    return preview


# ------------------------------------------------------------------------------------------------
# Workers and their supervisor
# ------------------------------------------------------------------------------------------------
FAILING = ("failed", "timeout", "deadlock", "crashed")
WORKER_START_TIMEOUT_S = 120.0
POISONED_EXIT = 3  # a worker whose CUDA context failed after a case


def worker(args) -> int:
    """``--worker``: run the cases named on stdin, one a line, appending JSON events to
    ``--events``: ready, then per case start, progress…, row…, end."""
    events = open(args.events, "a", buffering=1)

    def emit(**event) -> None:
        events.write(json.dumps(event, default=str) + "\n")

    import torch

    from fastssl import backends

    device = torch.device("cpu" if args.dry_run else "cuda")
    backends.preload("triton")
    if args.per_phase_sinkhorn:  # the cooperative launch deadlocked: one launch per phase, as the interpreter runs
        from fastssl.kernels import clustering

        clustering.persistent = lambda scores: False
    cases = {case.name: case for case in check_cases()}
    emit(event="ready", pid=os.getpid())
    for line in sys.stdin:
        case = cases[line.strip()]
        emit(event="start", case=case.name)
        started = time.perf_counter()
        ctx = Context(device, args.dry_run, lambda message: emit(event="progress", case=case.name, message=message))
        try:
            rows = case.run(ctx)
        except Exception as failure:  # noqa: BLE001 - the case's finding
            rows = [{"section": case.section, "case": case.name, "status": "failed", "reason": _failure(failure)}]
        for row in rows:
            emit(event="row", case=case.name, row=row)
        emit(event="end", case=case.name, seconds=time.perf_counter() - started)
        if device.type == "cuda":
            try:
                torch.cuda.synchronize(device)
            except Exception as failure:  # noqa: BLE001 - a sticky CUDA error fails every later case here
                emit(event="poisoned", case=case.name, reason=_failure(failure))
                return POISONED_EXIT
    return 0


class _Worker:
    """A worker process and the tail of its events file."""

    def __init__(self, argv: Sequence[str], events: Path, env: Dict[str, str]):
        events.touch()
        self.events_path, self.offset, self.partial = events, 0, b""
        self.process = subprocess.Popen([*argv, "--events", str(events)], stdin=subprocess.PIPE, text=True,
                                        cwd=REPO_ROOT, env=env, start_new_session=True)
        self.created, self.ready = time.monotonic(), False
        self.case: Optional[CheckCase] = None
        self.started, self.progress = 0.0, ""

    def events(self) -> List[dict]:
        with open(self.events_path, "rb") as stream:
            stream.seek(self.offset)
            data = stream.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def assign(self, case: CheckCase) -> None:
        self.case, self.started, self.progress = case, time.monotonic(), ""
        with contextlib.suppress(BrokenPipeError):  # it died meanwhile: the next poll reports the case as crashed
            self.process.stdin.write(case.name + "\n")
            self.process.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.process.stdin.close()

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the worker and anything it started
        self.process.wait()


def supervise(cases: Sequence[CheckCase], start_worker: Callable[[bool], _Worker], rates: Rates,
              budget_s: Optional[float], jobs: int, on_row: Callable[[dict], None], on_case: Callable[[dict], None],
              log: Callable[[str], None] = print, poll_s: float = 0.2) -> None:
    """Run ``cases`` in order on workers from ``start_worker(per_phase_sinkhorn)``: the parallel
    ones on up to ``jobs`` at once, the others alone. Before a case starts, skip it if its estimate
    exceeds what is left of ``budget_s``; kill a worker whose case runs past its timeout or the
    budget. ``on_row`` gets every row (the supervisor's own too: skipped, timeout, deadlock,
    crashed), ``on_case`` each case's outcome."""
    begin = time.monotonic()
    budget_end = math.inf if budget_s is None else begin + budget_s
    pending, workers = list(cases), []
    per_phase_sinkhorn = False

    def outcome(case: CheckCase, status: str, seconds: Optional[float], reason: str = "") -> None:
        if status != "done":
            on_row({"section": case.section, "case": case.name, "status": status, "reason": reason})
        on_case({"case": case.name, "status": status, "estimate_s": estimate_s(case.work, rates), "seconds": seconds,
                 "reason": reason})
        log(f"{case.name}: {status}{f' ({reason})' if reason else ''}")

    def deadline(worker: _Worker) -> float:
        case = worker.case
        timeout = case.timeout_s or (max(MIN_TIMEOUT_S, TIMEOUT_FACTOR * estimate_s(case.work, rates))
                                     if budget_s is not None else math.inf)
        return min(worker.started + timeout, budget_end)

    try:
        while pending or any(w.case for w in workers):
            for worker in list(workers):
                for event in worker.events():
                    kind = event["event"]
                    if kind == "ready":
                        worker.ready = True
                    elif kind == "progress":
                        worker.progress = event["message"]
                        log(f"{event['case']}: {event['message']}")
                    elif kind == "row":
                        on_row(event["row"])
                    elif kind == "end":
                        outcome(worker.case, "done", event["seconds"])
                        worker.case = None
                    elif kind == "poisoned":  # the worker exits; its next case goes to a fresh one
                        log(f"{event['case']}: the worker's CUDA context failed after it ({event['reason']})")
                exited = worker.process.poll()
                now = time.monotonic()
                if exited is not None or (not worker.ready and now - worker.created > WORKER_START_TIMEOUT_S):
                    worker.kill()
                    workers.remove(worker)
                    if worker.case is not None:
                        outcome(worker.case, "crashed", now - worker.started,
                                f"the worker exited with {exited} (last progress: {worker.progress or 'none'})")
                    elif not worker.ready:  # nothing can run: say so for every case left
                        for case in pending:
                            outcome(case, "skipped", None, f"no worker started (exit status {exited})")
                        pending = []
                elif worker.case is not None and now > deadline(worker):
                    worker.kill()
                    workers.remove(worker)
                    # past its first launch, nothing in the barrier case but the kernel's grid barriers can spin for
                    # minutes (the launches of its timing and launch count are the same kernel)
                    status = "deadlock" if worker.case.name == "sinkhorn_barrier" and worker.progress else "timeout"
                    limit = "the budget ended" if now >= budget_end else f"over its {deadline(worker) - worker.started:.0f} s"
                    outcome(worker.case, status, now - worker.started,
                            f"killed: {limit} (last progress: {worker.progress or 'none'})")
                    per_phase_sinkhorn = per_phase_sinkhorn or status == "deadlock"
            while pending:
                case = pending[0]
                busy = [w for w in workers if w.case is not None]
                idle = [w for w in workers if w.ready and w.case is None]
                if busy and (not case.parallel or not busy[0].case.parallel):
                    break  # a timed case runs alone
                left = budget_end - time.monotonic()
                if estimate_s(case.work, rates) > left:
                    pending.pop(0)
                    outcome(case, "skipped", None,
                            f"estimated {estimate_s(case.work, rates):.0f} s > {left:.0f} s left of the budget")
                    continue
                if not idle:
                    if len(workers) < (jobs if case.parallel else 1):
                        workers.append(start_worker(per_phase_sinkhorn))
                    break
                if not case.parallel:
                    for extra in [w for w in workers if w is not idle[0]]:  # free the card for the timing
                        extra.close()
                        extra.process.wait()
                        workers.remove(extra)
                idle[0].assign(pending.pop(0))
            time.sleep(poll_s)
        for worker in workers:
            worker.close()
        for worker in workers:
            worker.process.wait()
    finally:  # an exception, a SIGTERM (``main``): no worker outlives its supervisor
        for worker in workers:
            worker.kill()


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    from bench import op_counts, sweep

    info = result["machine"]
    rows = result["rows"]
    budget = "none" if result["budget_s"] is None else f"{result['budget_s']:.0f} s"
    lines = [f"# GPU check on {info['device_name']}", "",
             f"{'Dry run (CPU, TRITON_INTERPRET=1, tiny shapes): times are no measurement. ' if result['dry_run'] else ''}"
             f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, commit {info['commit']}, "
             f"{info['date_utc']} UTC; {result['seconds']:.0f} s.", "",
             "## Cases and the budget", "",
             f"Budget: {budget}; "
             f"estimates for {result['rates']['name']}'s nominal rates (``bench.gpu_check``'s cost model).", "",
             "| case | estimate s | took s | status | note |", "|---|---:|---:|---|---|"]
    for case in result["cases"]:
        took = f"{case['seconds']:.1f}" if case["seconds"] is not None else ""
        lines.append(f"| {case['case']} | {case['estimate_s']:.1f} | {took} | {case['status']} | {case['reason']} |")
    lines.append("")
    barrier = [r for r in rows if r["section"] == "barrier"]
    if barrier:
        lines += ["## One-launch Triton Sinkhorn (grid barriers)", ""]
        for r in barrier:
            facts = [f"{key} {r[key]}" for key in ("shape", "cooperative", "tiles", "programs", "launches_per_call",
                                                    "median_ms", "error", "bound") if key in r]
            lines.append(f"- **{r['status']}** {r.get('reason', '')} {r.get('note', '')}; " + ", ".join(facts))
        lines.append("")
    ops = [r for r in rows if r["section"] == "ops"]
    counts = {status: sum(r["status"] == status for r in ops) for status in ("ok", "unavailable") + FAILING}
    lines += ["## Every op × dtype × backend against float64", "",
              ", ".join(f"{n} {status}" for status, n in counts.items()) + " (the reasons are in gpu_check.json).", ""]
    failed = [r for r in ops if r["status"] in FAILING]
    if failed:
        lines += ["| op | sample | dtype | backend | reason |", "|---|---|---|---|---|"]
        lines += [f"| {r.get('op', r['case'])} | {r.get('sample', '')} | {r.get('dtype', '')} | {r.get('backend', '')} | "
                  f"{r['reason']} |" for r in failed]
        lines.append("")
    counted = [r for r in rows if r["section"] == "launch_counts" and "ops" in r]
    if counted:
        lines += [f"## {counted[0]['counted'].capitalize()} per training step", "",
                  "One step (forward + backward; the Sinkhorn-Knopp's forward) after a warm-up step: fastssl "
                  '(backend="auto"), the family\'s plain PyTorch code (backend="reference") and lightly 1.6.', "",
                  *op_counts.table_lines(counted, counted[0]["counted"], (sweep.FASTSSL, sweep.PLAIN, sweep.LIGHTLY)), ""]
    lines += ["## Large cases and the autotune pass", "",
              "| case | dtype | backend | status | ms | × torch | error vs float64 | note |", "|---|---|---|---|---|---|---|---|"]
    others = [r for r in rows if r["section"] in ("large", "autotune")]
    torch_ms = {(r.get("case"), r.get("dtype")): r.get("median_ms") for r in others if r.get("backend") == "torch"}
    for r in others:
        base = torch_ms.get((r.get("case"), r.get("dtype")))
        ratio = f"{base / r['median_ms']:.2f}" if base and r.get("median_ms") else ""
        milliseconds = f"{r['median_ms']:.3f}" if r.get("median_ms") is not None else ""
        error = f"{r['error']:.2e}" if r.get("error") is not None else ""
        note = r.get("reason") or (f"autotune={r['autotune']}" if "autotune" in r else "")
        if r.get("peak_memory_bytes"):
            note += f" peak {r['peak_memory_bytes'] / 2**30:.1f} GiB"
        lines.append(f"| {r.get('case')} | {r.get('dtype', '')} | {r.get('backend', '')} | {r['status']} | "
                     f"{milliseconds} | {ratio} | {error} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, TRITON_INTERPRET=1, tiny shapes, results in a temporary folder")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results/<machine>/)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"seconds for the whole check (default {DEFAULT_BUDGET_S:.0f} on a card, none in a dry run)")
    parser.add_argument("--jobs", type=int, default=None,
                        help=f"workers for the untimed cases (default {DEFAULT_JOBS} on a card, 1 in a dry run)")
    parser.add_argument("--cases", nargs="+", default=(), help="only these cases (names, or prefixes such as ops)")
    parser.add_argument("--plan", action="store_true", help="print the cases, their estimates and the budget's cut")
    parser.add_argument("--card", help="estimate for this card name (default: this machine's; H100 off a card)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--events", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--per-phase-sinkhorn", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    if args.worker:
        return worker(args)
    import torch

    from bench import machine

    on_card = torch.cuda.is_available() and not args.dry_run
    if not (on_card or args.dry_run or args.plan):
        parser.error("no CUDA device: run on a card, or --dry-run / --plan here")
    device = torch.device("cuda" if on_card else "cpu")
    if args.card:
        rates = card_rates(args.card)
    elif on_card:
        rates = card_rates(torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device).multi_processor_count)
    else:
        rates = card_rates("H100")  # what a dry run prepares for
    budget_s = args.budget_s if args.budget_s is not None else (DEFAULT_BUDGET_S if on_card or args.plan else None)
    jobs = args.jobs or (DEFAULT_JOBS if on_card or args.plan else 1)
    try:
        cases = select(check_cases(), args.cases)
    except ValueError as unknown:
        parser.error(str(unknown))
    if args.plan:
        print(f"estimates for {rates.name}, budget {budget_s} s, {jobs} workers for the untimed cases")
        for entry in plan(cases, rates, budget_s, jobs):
            print(f"{entry['case']:36s} {entry['estimate_s']:8.1f} s  from {entry['start_s']:6.1f} s  "
                  f"{'runs' if entry['fits'] else 'skipped: over the budget'}")
        return 0

    info = machine.machine_info(device)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run
                       else REPO_ROOT / "bench" / "results" / info["key"])
    events_dir = out / "gpu_check-workers"
    events_dir.mkdir(parents=True, exist_ok=True)
    for stale in events_dir.glob("worker-*.jsonl"):
        stale.unlink()
    rows_file = (out / "gpu_check.jsonl").open("w", buffering=1)
    start = time.perf_counter()
    result = {"machine": info, "dry_run": args.dry_run, "budget_s": budget_s, "jobs": jobs,
              "rates": dataclasses.asdict(rates), "cases": [], "rows": []}

    def write() -> None:
        result["seconds"] = time.perf_counter() - start
        (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "gpu_check.md").write_text(markdown(result))

    def on_row(row: dict) -> None:
        result["rows"].append(row)
        rows_file.write(json.dumps(row, default=str) + "\n")

    def on_case(case: dict) -> None:
        result["cases"].append(case)
        write()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

    started = []

    def start_worker(per_phase_sinkhorn: bool) -> _Worker:
        argv = [sys.executable, "-m", "bench.gpu_check", "--worker"] + ["--dry-run"] * args.dry_run \
            + ["--per-phase-sinkhorn"] * per_phase_sinkhorn
        started.append(_Worker(argv, events_dir / f"worker-{len(started)}.jsonl", dict(os.environ)))
        return started[-1]

    log(f"{len(cases)} cases, budget {budget_s} s, estimates for {rates.name}; results in {out}")
    # `timeout`'s SIGTERM: the workers are killed and the results still get written
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        supervise(cases, start_worker, rates, budget_s, jobs, on_row, on_case, log)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        write()
        rows_file.close()
    failed = [r for r in result["rows"] if r["status"] in FAILING]
    skipped = [c for c in result["cases"] if c["status"] == "skipped"]
    print(f"{len(result['rows'])} checks, {len(failed)} failed, timed out or crashed; "
          f"{len(skipped)} case(s) skipped{': ' if skipped else ''}"
          + "; ".join(f"{c['case']} ({c['reason']})" for c in skipped) + f"; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
