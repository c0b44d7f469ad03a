"""Cases, providers and measurements shared by ``bench_<family>.py``, the report and the smoke test.

A *case* is one loss at one configuration. A *provider* is a fastssl backend (a ``backend=``
value: reference, torch, triton, native) or a peer library's loss at the same inputs. A *mode* is
what is timed:

* ``fwd``: the forward as training runs it (inputs require grad, the graph is built);
* ``bwd``: the backward of one forward, retained and reused for every run;
* ``fwd+bwd``: forward and backward, the loss's share of a training step.

Every (case, provider, mode) gives one :class:`Row`, also when it cannot run: its ``status``
(ok, unavailable, skipped, oom, failed) and ``reason`` say why, so nothing is left out silently.
Whether a backend can serve a case is asked of fastssl itself: the call raises
``BackendUnavailableError`` listing every reason of ``fastssl.backends.unavailable_reasons``.
"""
from __future__ import annotations

import gc
import importlib
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from fastssl import backends

from . import machine

MODES = ("fwd", "bwd", "fwd+bwd")
FASTSSL_PROVIDERS = backends.BACKENDS
FAMILIES = ("contrastive", "redundancy", "spectral", "clustering", "byol", "whitening", "regularizers", "sliced",
            "distillation", "masked")
SIZE_SETS = ("smoke", "quick", "full")
STATUSES = ("ok", "unavailable", "skipped", "oom", "failed")

# (args, leaves): the loss's positional arguments, and the tensors that receive gradients.
Inputs = Tuple[tuple, List[torch.Tensor]]


@dataclass(eq=False)
class Case:
    """One loss at one configuration.

    Attributes:
        family, loss, name: e.g. ("contrastive", "nt_xent", "simclr-b256-d128"); ``name`` is
            unique within its family and size set.
        sizes: the configuration, e.g. {"batch": 256, "dim": 128}; curves plot against these.
        make_inputs(device, dtype) -> Inputs: random inputs (the caller seeds torch).
        make_loss(backend) -> callable(*args) -> 0-dim loss: fastssl with ``backend=``.
        peers: {library: factory() -> callable(*args)}: the same loss elsewhere; the factory
            imports the library and raises ImportError when it is missing.
        gemm_flops: {"fwd": F, "bwd": F}: FLOPs of the GEMMs an exact algorithm must do, or None
            where the loss does no GEMM.
        differentiable: False for losses without gradient (Sinkhorn): only ``fwd`` is timed.
        series: the scaling curves this case is a point of: ((title, size key of the x axis), ...).
    """

    family: str
    loss: str
    name: str
    sizes: Mapping[str, int]
    make_inputs: Callable[[torch.device, torch.dtype], Inputs]
    make_loss: Callable[[str], Callable]
    peers: Mapping[str, Callable[[], Callable]] = field(default_factory=dict)
    gemm_flops: Optional[Mapping[str, float]] = None
    differentiable: bool = True
    series: Tuple[Tuple[str, str], ...] = ()

    @property
    def modes(self) -> Tuple[str, ...]:
        return MODES if self.differentiable else ("fwd",)

    @property
    def providers(self) -> Tuple[str, ...]:
        return FASTSSL_PROVIDERS + tuple(self.peers)

    def flops(self, mode: str) -> Optional[float]:
        if self.gemm_flops is None:
            return None
        return sum(self.gemm_flops[part] for part in mode.split("+"))


@dataclass(frozen=True)
class Settings:
    """How long to measure.

    CPU: ``warmup_runs`` untimed runs, then timed runs until ``max_runs``, or until ``budget_s``
    is spent once ``min_runs`` are done, on ``cpu_clock``: "wall" (``time.perf_counter``) or
    "process" (``time.process_time``: CPU seconds of every thread of this process, which other
    processes on a shared machine do not inflate; with one torch thread it is the work itself).
    CUDA: ``triton.testing.do_bench`` with ``cuda_warmup_ms`` / ``cuda_rep_ms``.
    ``allow_interpreter``: time Triton kernels under ``TRITON_INTERPRET=1`` (only the smoke test
    does: interpreter times mean nothing).
    """

    warmup_runs: int = 1
    min_runs: int = 3
    max_runs: int = 10
    budget_s: float = 2.0
    cuda_warmup_ms: float = 25.0
    cuda_rep_ms: float = 100.0
    cpu_clock: str = "wall"
    allow_interpreter: bool = False


SETTINGS = {
    "smoke": Settings(warmup_runs=0, min_runs=1, max_runs=1, budget_s=0.0, cuda_warmup_ms=1.0, cuda_rep_ms=1.0),
    "quick": Settings(min_runs=3, max_runs=5, budget_s=0.3),
    "full": Settings(min_runs=5, max_runs=20, budget_s=3.0, cuda_rep_ms=200.0),
}


@dataclass(frozen=True)
class Timing:
    median_ms: float
    q25_ms: float
    q75_ms: float
    runs: Optional[int]  # None: do_bench chose the count
    timer: str


@dataclass(frozen=True)
class MemoryResult:
    """Peak bytes a mode needed above what was allocated before it, or why there is no number."""

    status: str
    peak_bytes: Optional[int] = None
    reason: str = ""
    method: str = ""


@dataclass
class Row:
    """One (case, provider, mode) result; ``asdict`` of it is a line of the CSV / JSON."""

    family: str
    loss: str
    case: str
    sizes: Dict[str, int]
    series: List[List[str]]
    device: str
    dtype: str
    provider: str
    provider_kind: str  # "fastssl" or "peer"
    mode: str
    status: str
    reason: str = ""
    median_ms: Optional[float] = None
    q25_ms: Optional[float] = None
    q75_ms: Optional[float] = None
    runs: Optional[int] = None
    timer: str = ""
    peak_memory_bytes: Optional[int] = None
    memory_method: str = ""
    gemm_gflop: Optional[float] = None
    gemm_floor_ms: Optional[float] = None


class CannotRun(Exception):
    """A provider cannot run (a mode of) a case: a row status other than "ok", and why."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
def randn(shape: Sequence[int], device: torch.device, dtype: torch.dtype, requires_grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(requires_grad)


def two_views(batch: int, dim: int, second_requires_grad: bool = True) -> Callable:
    """``make_inputs`` of a loss on two (batch, dim) views; the second may be a detached target."""
    def make(device: torch.device, dtype: torch.dtype) -> Inputs:
        out0 = randn((batch, dim), device, dtype)
        out1 = randn((batch, dim), device, dtype, second_requires_grad)
        return (out0, out1), [t for t in (out0, out1) if t.requires_grad]

    return make


def family_cases(family: str, size_set: str) -> List[Case]:
    """The cases of ``bench/bench_<family>.py`` in a size set ("smoke", "quick" or "full")."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if size_set not in SIZE_SETS:
        raise ValueError(f"size_set must be one of {SIZE_SETS}, got {size_set!r}")
    return importlib.import_module(f"bench.bench_{family}").cases(size_set)


def find_case(family: str, name: str, size_set: str) -> Case:
    for case in family_cases(family, size_set):
        if case.name == name:
            return case
    raise ValueError(f"no {family} case named {name!r} in the {size_set!r} set")


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype) -> Inputs:
    """The case's inputs, the same for every provider and every run of the suite (seed 0)."""
    torch.manual_seed(0)
    return case.make_inputs(device, dtype)


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------
def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:400] if text else ''}"


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def classify(error: BaseException, provider: str) -> CannotRun:
    """The row status of an exception raised while building or running a provider."""
    if isinstance(error, CannotRun):
        return error
    if isinstance(error, backends.BackendUnavailableError):
        return CannotRun("unavailable", str(error))
    if isinstance(error, ImportError):
        return CannotRun("unavailable", f"{provider} cannot be imported ({_short(error)})")
    if is_out_of_memory(error):
        return CannotRun("oom", f"out of memory ({_short(error)})")
    return CannotRun("failed", _short(error))


def provider_kind(provider: str) -> str:
    return "fastssl" if provider in FASTSSL_PROVIDERS else "peer"


def build_loss(case: Case, provider: str, device: torch.device, settings: Settings) -> Callable:
    """The provider's loss callable for ``case`` on ``device`` (raises CannotRun or ImportError)."""
    if (provider == "triton" and device.type == "cpu" and backends.triton_interpreted()
            and not settings.allow_interpreter):
        raise CannotRun("unavailable", "TRITON_INTERPRET=1 runs Triton kernels in the interpreter, "
                        "about 1000x slower than a GPU: not timed")
    fn = case.make_loss(provider) if provider in FASTSSL_PROVIDERS else case.peers[provider]()
    return fn.to(device) if isinstance(fn, torch.nn.Module) else fn


def clear_grads(leaves: Sequence[torch.Tensor]) -> None:
    for tensor in leaves:
        tensor.grad = None


def mode_step(fn: Callable, args: tuple, mode: str) -> Callable[[], object]:
    """What one timed run of ``mode`` executes."""
    if mode == "fwd":
        return lambda: fn(*args)
    if mode == "fwd+bwd":
        return lambda: fn(*args).backward()
    loss = fn(*args)  # bwd: one forward whose graph every run reuses
    return lambda: loss.backward(retain_graph=True)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def _quartiles_ms(seconds: Sequence[float]) -> Tuple[float, float, float]:
    median, q25, q75 = np.percentile(np.asarray(seconds) * 1e3, [50, 25, 75])
    return float(median), float(q25), float(q75)


def time_step(step: Callable[[], object], leaves: Sequence[torch.Tensor], device: torch.device,
              settings: Settings) -> Timing:
    """Median and quartiles of ``step``'s time; gradients of ``leaves`` cleared before each run.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs, warm-up excluded);
    where Triton is missing, wall time around ``torch.cuda.synchronize``. CPU: repeated runs on
    ``settings.cpu_clock`` after ``settings.warmup_runs`` untimed ones.
    """
    cuda = device.type == "cuda"
    if cuda and not backends.triton_import_reasons():
        from triton.testing import do_bench

        median, q25, q75 = do_bench(step, warmup=settings.cuda_warmup_ms, rep=settings.cuda_rep_ms,
                                    grad_to_none=list(leaves), quantiles=[0.5, 0.25, 0.75])
        return Timing(median, q25, q75, None, "triton.testing.do_bench (CUDA events)")
    synchronize = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    clock = time.process_time if settings.cpu_clock == "process" and not cuda else time.perf_counter
    for _ in range(settings.warmup_runs):
        clear_grads(leaves)
        step()
    seconds: List[float] = []
    while len(seconds) < settings.max_runs and (len(seconds) < settings.min_runs
                                                 or sum(seconds) < settings.budget_s):
        clear_grads(leaves)
        synchronize()
        start = clock()
        step()
        synchronize()
        seconds.append(clock() - start)
    return Timing(*_quartiles_ms(seconds), len(seconds),
                  f"time.{clock.__name__}" + (" around torch.cuda.synchronize" if cuda else ""))


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, settings: Settings) -> float:
    """This machine's dense matmul rate at ``dtype``, measured now (the GEMM floor's divisor)."""
    n = 8192 if device.type == "cuda" else 1024
    torch.manual_seed(0)
    a, b = randn((n, n), device, dtype, False), randn((n, n), device, dtype, False)
    timing = time_step(lambda: a @ b, [], device, replace(settings, min_runs=max(settings.min_runs, 3)))
    return 2.0 * n ** 3 / (timing.median_ms * 1e-3)


class CudaPeak:
    """Peak of torch's CUDA allocator above the bytes allocated at ``reset()``."""

    method = "torch.cuda.max_memory_allocated"

    def __init__(self, device: torch.device):
        self.device, self.base = device, 0

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def growth(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - self.base


def peak_memory(fn: Callable, args: tuple, leaves: Sequence[torch.Tensor], mode: str, counter) -> int:
    """Bytes ``mode`` needs above what is held before it (the inputs; for bwd, also the graph).

    The run is done twice and only the second is counted, so workspaces and caches created on
    first use are not charged to the loss. The garbage collector is off meanwhile: freeing an
    earlier run's cyclic garbage inside the counted run would hide part of its peak.
    ``counter``: ``reset()``, and ``growth()`` in bytes since.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for counted in (False, True):
            clear_grads(leaves)
            loss = fn(*args) if mode == "bwd" else None
            if counted:
                counter.reset()
            if mode == "bwd":
                loss.backward()
            else:
                out = fn(*args)
                if mode == "fwd+bwd":
                    out.backward()
                del out
            del loss
        return counter.growth()
    finally:
        clear_grads(leaves)
        if gc_was_enabled:
            gc.enable()


def fits_in_memory(memory: Mapping[str, MemoryResult], device: torch.device) -> Optional[str]:
    """Why timing a provider would exhaust memory (its measured peak vs what is free), or None."""
    peaks = [m.peak_bytes for m in memory.values() if m.peak_bytes is not None]
    available = machine.available_memory_bytes(device)
    if peaks and max(peaks) > 0.9 * available:
        return (f"measured peak {max(peaks) / 2**30:.1f} GiB exceeds 90% of the "
                f"{available / 2**30:.1f} GiB free on {device.type}: not timed")
    return None


def default_timer(device: torch.device, settings: Settings) -> Callable[[Callable, Sequence[torch.Tensor]], Timing]:
    return lambda step, leaves: time_step(step, leaves, device, settings)


def measure(case: Case, provider: str, modes: Sequence[str], device: torch.device, dtype: torch.dtype,
            settings: Settings, inputs: Inputs, timer: Callable[[Callable, Sequence[torch.Tensor]], Timing],
            memory: Optional[Mapping[str, MemoryResult]] = None, matmul_rate: Optional[float] = None,
            ) -> List[Row]:
    """Time ``modes`` of one provider on ``inputs``: one row per mode.

    ``memory``: CPU peaks measured beforehand in a fresh process ({mode: MemoryResult}); a
    provider whose peak would not fit in the free memory, or a mode whose measurement ran out of
    memory, is not timed. On CUDA the peak is measured here. ``matmul_rate``: FLOP/s for the
    GEMM floor.
    """
    args, leaves = inputs
    memory = memory or {}

    def row(mode: str, status: str, reason: str = "", **values) -> Row:
        flops = case.flops(mode)
        floor = flops / matmul_rate * 1e3 if flops is not None and matmul_rate else None
        return Row(case.family, case.loss, case.name, dict(case.sizes), [list(s) for s in case.series],
                   str(device), str(dtype).replace("torch.", ""), provider, provider_kind(provider), mode,
                   status, reason, gemm_gflop=None if flops is None else flops / 1e9, gemm_floor_ms=floor,
                   **values)

    try:
        too_big = fits_in_memory(memory, device)
        if too_big:
            raise CannotRun("skipped", too_big)
        fn = build_loss(case, provider, device, settings)
        fn(*args)  # first call: availability, lazy initialisation
    except Exception as error:  # an unavailable backend, a missing peer, a failing one: a row each
        failure = classify(error, provider)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what an out-of-memory provider left must not crowd the next
        return [row(mode, failure.status, failure.reason) for mode in modes]
    rows = []
    for mode in modes:
        measured = memory.get(mode)
        if measured is not None and measured.status == "oom":
            rows.append(row(mode, "oom", measured.reason))
            continue
        try:
            step = mode_step(fn, args, mode)
            timing = timer(step, leaves)
            del step
            if device.type == "cuda":
                measured = MemoryResult("ok", peak_memory(fn, args, leaves, mode, CudaPeak(device)),
                                        method=CudaPeak.method)
            values = dict(median_ms=timing.median_ms, q25_ms=timing.q25_ms, q75_ms=timing.q75_ms,
                          runs=timing.runs, timer=timing.timer)
            if measured is not None and measured.status == "ok":
                rows.append(row(mode, "ok", peak_memory_bytes=measured.peak_bytes,
                                memory_method=measured.method, **values))
            else:
                why = "no measurement" if measured is None else f"{measured.status}: {measured.reason}"
                rows.append(row(mode, "ok", f"memory not measured ({why})", **values))
        except Exception as error:
            failure = classify(error, provider)
            rows.append(row(mode, failure.status, failure.reason))
        finally:
            clear_grads(leaves)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def as_dicts(rows: Sequence[Row]) -> List[dict]:
    return [asdict(r) for r in rows]


# --------------------------------------------------------------------------------------------
# pytest-benchmark (``pytest bench/ --benchmark-only``)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Job:
    """One pytest-benchmark test: a (case, provider, mode) on a device."""

    case: Case
    provider: str
    mode: str
    device: torch.device
    dtype: torch.dtype
    size_set: str
    settings: Settings

    @property
    def id(self) -> str:
        return f"{self.case.name}-{self.provider}-{self.mode}"


def jobs(cases: Sequence[Case], device: torch.device, dtype: torch.dtype, size_set: str) -> List[Job]:
    return [Job(case, provider, mode, device, dtype, size_set, SETTINGS[size_set])
            for case in cases for provider in case.providers for mode in case.modes]


_CPU_MEMORY: Dict[Tuple[str, str], dict] = {}
_MATMUL_RATE: Dict[Tuple[str, str], float] = {}


def _pedantic_timer(benchmark, device: torch.device, settings: Settings):
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def timer(step: Callable, leaves: Sequence[torch.Tensor]) -> Timing:
        def setup():
            clear_grads(leaves)
            synchronize()

        def target():
            step()
            synchronize()

        benchmark.pedantic(target, setup=setup, rounds=settings.max_runs, warmup_rounds=settings.warmup_runs)
        if not benchmark.enabled:
            return Timing(float("nan"), float("nan"), float("nan"), 1, "not timed (--benchmark-disable)")
        stats = benchmark.stats.stats
        synchronised = ", CUDA-synchronised" if device.type == "cuda" else ""
        return Timing(stats.median * 1e3, stats.q1 * 1e3, stats.q3 * 1e3, stats.rounds,
                      f"pytest-benchmark (time.perf_counter{synchronised})")

    return timer


def benchmark_job(benchmark, job: Job) -> None:
    """Run one job under pytest-benchmark; the row's fields (peak memory, GEMM floor, …) go to
    ``benchmark.extra_info``. A provider that cannot run is skipped with its reason; a peer that
    fails, or any provider out of memory, is an xfail with the error; a fastssl failure fails."""
    import pytest

    memory = None
    case = job.case
    if job.device.type == "cpu":
        if (case.family, case.name) not in _CPU_MEMORY:
            from .memory import cpu_peak_memory

            _CPU_MEMORY[case.family, case.name] = cpu_peak_memory([case], job.size_set, job.dtype, job.settings)
        memory = _CPU_MEMORY[case.family, case.name].get((case.family, case.name, job.provider))
    rate_key = (str(job.device), str(job.dtype))
    if case.gemm_flops is not None and rate_key not in _MATMUL_RATE:
        _MATMUL_RATE[rate_key] = matmul_flops_per_s(job.device, job.dtype, job.settings)
    [row] = measure(case, job.provider, [job.mode], job.device, job.dtype, job.settings,
                    make_inputs(case, job.device, job.dtype), _pedantic_timer(benchmark, job.device, job.settings),
                    memory, _MATMUL_RATE.get(rate_key))
    benchmark.extra_info.update({k: v for k, v in asdict(row).items() if v not in (None, "")})
    if row.status in ("unavailable", "skipped"):
        pytest.skip(f"{row.status}: {row.reason}")
    if row.status == "oom" or (row.status == "failed" and row.provider_kind == "peer"):
        pytest.xfail(f"{row.provider} {row.status}: {row.reason}")
    if row.status == "failed":
        pytest.fail(row.reason)
