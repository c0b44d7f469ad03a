"""The ``native`` backend: C++ (CPU, OpenMP) and CUDA ops from ``csrc/``, built on first use.

Nothing here runs at ``import fastssl``. The first time the native backend is considered
(``backend="native"``, or ``"auto"`` on a call it could serve) :func:`unavailable_reasons`
loads the extension, once per process:

1. ``FASTSSL_NATIVE=0`` turns the backend off.
2. A library built ahead of time (``FASTSSL_BUILD_NATIVE=1 pip install .``, see ``setup.py``)
   next to this file is loaded as it is.
3. Otherwise ``torch.utils.cpp_extension.load`` compiles ``csrc/`` with ninja into
   ``$FASTSSL_NATIVE_CACHE`` (default ``~/.cache/fastssl/native``), in a subdirectory named by
   the torch version and a hash of the sources, flags and CPU, so a rebuild happens only when
   one of them changes. An exclusive ``fcntl`` lock on ``build.lock`` there serialises
   processes that build at the same time (DDP ranks); it is released by the kernel when its
   holder dies, unlike torch's own lock file, which is cleared while the lock is held.

Any failure (no compiler, no ninja, a compile error) becomes a reason: ``import fastssl``
still works, ``auto`` skips the backend and ``python -m fastssl.info`` prints the reason.
The CUDA kernels are compiled in only when torch has CUDA and ``nvcc`` is found.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from . import backends, clustering, distributed, ops, redundancy, reference

SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ("cpu/sinkhorn.cpp", "cpu/soft_cross_entropy.cpp", "cpu/redundancy.cpp")
CUDA_SOURCES = ("cuda/sinkhorn.cu", "cuda/binding.cpp")
EXTENSION_NAME = "fastssl_native"
# -fno-trapping-math: with it gcc turns the comparisons of fast_exp.h into selects and vectorises
# the loop (2-3x faster); nothing here reads floating-point exception flags.
# -mprefer-vector-width=512: gcc's -march=native picks 256-bit vectors on AVX-512 CPUs; 512-bit
# ones run the fast_exp passes ~1.2x faster here (the Sinkhorn too), and change nothing elsewhere.
# -ffp-contract=off: no fused multiply-add but those written out (fast_exp.h's mul_add), so that
# x · σ − L rounds as in torch (see fast_exp.h).
CXX_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fno-trapping-math", "-ffp-contract=off",
             "-fopenmp")
LD_FLAGS = ("-fopenmp",)
CUDA_FLAGS = ("-O3", "-std=c++17")
# How many lines of a failed build's output a reason quotes.
ERROR_TAIL_LINES = 12

Tensor = torch.Tensor


def cache_root() -> Path:
    """``$FASTSSL_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/fastssl/native`` (``~/.cache/...``)."""
    configured = os.environ.get("FASTSSL_NATIVE_CACHE")
    if configured:
        return Path(configured).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "fastssl" / "native"


def _cuda_home() -> Optional[str]:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME if torch.version.cuda else None


def _sources(with_cuda: bool) -> List[Path]:
    return [SOURCE_DIR / name for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]


def cpu_model() -> str:
    """The CPU's model name (-march=native code is only valid on the same kind of CPU)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_directory(with_cuda: bool) -> Path:
    """The cache subdirectory of this torch version, source tree, flags and CPU."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.rglob("*")):
        if path.suffix in (".cpp", ".cu", ".h", ".cuh"):
            digest.update(path.relative_to(SOURCE_DIR).as_posix().encode())
            digest.update(path.read_bytes())
    flags = CXX_FLAGS + LD_FLAGS + (CUDA_FLAGS if with_cuda else ())
    digest.update(repr((flags, with_cuda, cpu_model(), os.environ.get("CXX", "c++"))).encode())
    return cache_root() / f"torch{torch.__version__}-{'cuda' if with_cuda else 'cpu'}-{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory/build.lock`` (blocks while another process holds it)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _find_ninja() -> Optional[str]:
    """Put the ``ninja`` of this Python's environment on PATH if it is not there (a venv used
    without activating it); returns a reason when there is none."""
    from torch.utils import cpp_extension

    if cpp_extension.is_ninja_available():
        return None
    environment_bin = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(environment_bin, "ninja")):
        os.environ["PATH"] = environment_bin + os.pathsep + os.environ.get("PATH", "")
        return None
    return "ninja is not installed (`pip install ninja`, or `pip install fastssl[native]`)"


def _prebuilt_library() -> Optional[Path]:
    """The library ``setup.py`` built ahead of time next to this file, if any."""
    candidates = sorted(Path(__file__).resolve().parent.glob(f"_{EXTENSION_NAME}*.so"))
    return candidates[0] if candidates else None


def _build_and_load(with_cuda: bool) -> None:
    from torch.utils import cpp_extension

    directory = build_directory(with_cuda)
    with build_lock(directory):
        # torch's own lock file: left behind by a build that was killed, it would make every
        # later build wait forever; holding build.lock, no other process is building.
        (directory / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(path) for path in _sources(with_cuda)],
            extra_cflags=list(CXX_FLAGS),
            extra_ldflags=list(LD_FLAGS),
            extra_cuda_cflags=list(CUDA_FLAGS),
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )


def _failure(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (f"building the native extension failed ({type(error).__name__}): "
            + " | ".join(lines[-ERROR_TAIL_LINES:]))


@functools.lru_cache(maxsize=None)
def _load() -> Tuple[str, ...]:
    """The reasons the extension is unusable (empty: it is loaded); runs once."""
    if os.environ.get("FASTSSL_NATIVE", "1").strip() == "0":
        return ("disabled by FASTSSL_NATIVE=0",)
    prebuilt = _prebuilt_library()
    if prebuilt is not None:
        try:
            torch.ops.load_library(str(prebuilt))
        except Exception as error:  # a library built for another torch: anything may be raised
            return (f"loading the prebuilt {prebuilt.name} failed ({type(error).__name__}: {error})",)
        return ()
    missing = [str(path) for path in _sources(False) if not path.exists()]
    if missing:
        return (f"the C++ sources are not installed ({', '.join(missing)} missing); "
                "install fastssl from a source checkout or prebuild with FASTSSL_BUILD_NATIVE=1",)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (f"no C++ compiler: {compiler!r} is not on PATH (set CXX)",)
    ninja_reason = _find_ninja()
    if ninja_reason:
        return (ninja_reason,)
    try:
        _build_and_load(with_cuda=_cuda_home() is not None)
    except Exception as error:  # compiler errors are RuntimeError, but a broken toolchain may raise anything
        return (_failure(error),)
    return ()


def unavailable_reasons() -> List[str]:
    """Why the native backend cannot be used (empty when it can); builds or loads it once."""
    reasons = _load()
    if not reasons:
        _register(torch._C._dispatch_has_kernel_for_dispatch_key("fastssl::sinkhorn_native", "CUDA"))
    return list(reasons)


# ============================================================================================
# Ops: fake (shape) functions and the backend functions with the reference signatures
# ============================================================================================
def _device_reasons(tensors: Sequence[Tensor], with_cuda: bool) -> List[str]:
    devices = {t.device.type for t in tensors}
    allowed = {"cpu", "cuda"} if with_cuda else {"cpu"}
    if devices - allowed:
        return [f"the native extension runs on {' and '.join(sorted(allowed))} tensors "
                f"(built {'with' if with_cuda else 'without'} CUDA), got {sorted(devices)}"]
    return []


def _cpu_only_reasons(tensors: Sequence[Tensor]) -> List[str]:
    devices = {t.device.type for t in tensors} - {"cpu"}
    if devices:
        return [f"this native op has a CPU kernel only, got {sorted(devices)} tensors"]
    return []


@torch.no_grad()
def sinkhorn(
    scores: Tensor,
    iterations: int,
    epsilon: float,
    row_marginals: Optional[Tensor],
    col_marginals: Optional[Tensor],
    tolerance: float,
    gather_distributed: bool,
) -> Tensor:
    """Sinkhorn-Knopp codes of (B, K) scores; same arguments and result as ``reference.sinkhorn``.

    One ``fastssl::sinkhorn_native`` call runs every iteration. Across ranks the prototype
    sums need an all-reduce per iteration and 0 iterations need no iteration at all: those
    calls run the torch backend's passes (``fastssl.clustering.sinkhorn``).
    """
    world = distributed.world_size() if gather_distributed else 1
    if world > 1 or iterations == 0:
        return clustering.sinkhorn(scores, iterations, epsilon, row_marginals, col_marginals, tolerance,
                                   gather_distributed)
    log_r, log_c = reference.marginal_logs(scores, row_marginals, col_marginals, world)
    return torch.ops.fastssl.sinkhorn_native(scores, iterations, epsilon, log_r, log_c, tolerance)


def _sinkhorn_fake(scores, iterations, epsilon, log_row_marginals, log_col_marginals, tolerance):
    return scores.new_empty(scores.shape)


def _barlow_twins_forward(z_a: Tensor, z_b: Tensor, lambda_param: float,
                          algorithm: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """``redundancy.barlow_twins_forward``: the Gram path in one ``fastssl::barlow_twins_gram_forward``
    call (the normalisation, diagonal and statistics fused around the GEMMs); the direct path
    (N ≥ D under ``"auto"``) is the torch backend's, whose D×D GEMMs are ~80% of its time."""
    if not redundancy.use_gram(z_a.shape[0], z_a.shape[1], algorithm):
        return redundancy.barlow_twins_forward(z_a, z_b, lambda_param, algorithm)
    return torch.ops.fastssl.barlow_twins_gram_forward(z_a, z_b, lambda_param)


def _barlow_twins_backward(grad: Tensor, stats: Tensor, products: Tensor, z_a: Tensor, z_b: Tensor,
                           lambda_param: float, algorithm: str = "auto") -> Tuple[Tensor, Tensor]:
    if not redundancy.use_gram(z_a.shape[0], z_a.shape[1], algorithm):
        return redundancy.barlow_twins_backward(grad, stats, products, z_a, z_b, lambda_param, algorithm)
    return torch.ops.fastssl.barlow_twins_gram_backward(grad, stats, products, z_a, z_b, lambda_param)


def _barlow_twins_gram_forward_fake(z_a, z_b, lambda_param):
    return redundancy.barlow_twins_forward_fake(z_a, z_b, lambda_param, "gram")


def _barlow_twins_gram_backward_fake(grad, stats, products, z_a, z_b, lambda_param):
    return torch.empty_like(z_a), torch.empty_like(z_b)


@functools.lru_cache(maxsize=None)
def _register(with_cuda: bool) -> None:
    torch.library.register_fake("fastssl::sinkhorn_native")(_sinkhorn_fake)
    backends.register("sinkhorn", "native", sinkhorn,
                      supports=lambda tensors: _device_reasons(tensors, with_cuda))
    soft_cross_entropy_pairs = ops.register_pair_loss_op(
        torch.ops.fastssl.soft_cross_entropy_pairs_native.default,
        torch.ops.fastssl.soft_cross_entropy_pairs_native_backward.default)
    backends.register("soft_cross_entropy_pairs", "native", soft_cross_entropy_pairs, supports=_cpu_only_reasons)
    torch.library.register_fake("fastssl::barlow_twins_gram_forward")(_barlow_twins_gram_forward_fake)
    torch.library.register_fake("fastssl::barlow_twins_gram_backward")(_barlow_twins_gram_backward_fake)
    barlow_twins = ops.define_two_view_op("barlow_twins_native", 'float lambda_param, str algorithm="auto"',
                                          _barlow_twins_forward, redundancy.barlow_twins_forward_fake,
                                          _barlow_twins_backward)
    backends.register("barlow_twins", "native", barlow_twins, supports=_cpu_only_reasons)


# ============================================================================================
# python -m fastssl.native: build status, and the speed-up over the torch backend
# ============================================================================================
def _alternate(runs: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median milliseconds of each run, alternating them in this process so that all see the
    same machine load."""
    import statistics
    import time

    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def _row(label: str, times: Dict[str, float]) -> str:
    return f"| {label} | {times['torch']:.1f} | {times['native']:.1f} | {times['torch'] / times['native']:.2f}× |"


def _compare(batches: Sequence[int], prototypes: int, repeats: int) -> List[str]:
    """The torch and native Sinkhorn (3 iterations, ε = 0.05, cosine scores)."""
    lines = [f"| B × K | torch (ms) | native (ms) | speed-up |", "|---|---|---|---|"]
    for batch in batches:
        scores = torch.nn.functional.normalize(torch.randn(batch, 128), dim=1) @ \
            torch.nn.functional.normalize(torch.randn(prototypes, 128), dim=1).T
        times = _alternate({name: functools.partial(run, scores, 3, 0.05, None, None, 0.0, False)
                            for name, run in (("torch", clustering.sinkhorn), ("native", sinkhorn))}, repeats)
        lines.append(_row(f"{batch} × {prototypes}", times))
    return lines


def _compare_pairs(repeats: int) -> List[str]:
    """The torch and native soft-target cross-entropy of crop pairs, forward and backward (the
    student logits' gradient), on the benchmark suite's SwAV and DINO cases: SwAV's Sinkhorn
    codes of 2 crops against 2+6 crops of 256 × 3000 cosine scores (σ = 10), DINO's teacher at
    τ = 0.04 (2 crops) against 2+10 student crops of 64 × 65,536 (σ = 10)."""
    scores = torch.rand(8, 256, 3000) * 2 - 1
    swav = (torch.stack([clustering.sinkhorn(s, 3, 0.05, None, None, 0.0, False) for s in scores[:2]]), scores)
    dino = (torch.softmax(torch.randn(2, 64, 65536) / 0.04, dim=-1), torch.randn(12, 64, 65536))
    lines = ["| case | torch (ms) | native (ms) | speed-up |", "|---|---|---|---|"]
    for label, (targets, logits) in (("SwAV, 2 vs 8 × 256 × 3000", swav), ("DINO, 2 vs 12 × 64 × 65,536", dino)):
        logits.requires_grad_(True)
        runs = {name: functools.partial(_pair_loss_and_grad, backends.select("soft_cross_entropy_pairs", name,
                                                                             [targets, logits])[1], targets, logits)
                for name in ("torch", "native")}
        lines.append(_row(label, _alternate(runs, repeats)))
    return lines


def _pair_loss_and_grad(core: Callable, targets: Tensor, logits: Tensor) -> Tensor:
    return torch.autograd.grad(core(targets, logits, 10.0).sum(), logits)[0]


def _compare_barlow_twins(repeats: int) -> List[str]:
    """The torch and native Barlow Twins, forward and backward (both views' gradients), at the
    issue's N = 256, D = 8192 and a smaller N = 64, D = 2048."""
    lines = ["| N × D | torch (ms) | native (ms) | speed-up |", "|---|---|---|---|"]
    for n, d in ((64, 2048), (256, 8192)):
        views = [torch.randn(n, d, requires_grad=True) for _ in range(2)]
        runs = {name: functools.partial(_barlow_twins_grads, backends.select("barlow_twins", name, views)[1], *views)
                for name in ("torch", "native")}
        lines.append(_row(f"{n} × {d}", _alternate(runs, repeats)))
    return lines


def _barlow_twins_grads(core: Callable, z_a: Tensor, z_b: Tensor) -> Tuple[Tensor, ...]:
    return torch.autograd.grad(core(z_a, z_b, 5e-3, "auto"), (z_a, z_b))


def _main() -> None:
    import time

    start = time.perf_counter()
    reasons = unavailable_reasons()
    print(f"native extension: {'usable' if not reasons else 'unavailable: ' + '; '.join(reasons)} "
          f"(built or loaded in {time.perf_counter() - start:.1f} s; cache {cache_root()})")
    if not reasons:
        print(f"sinkhorn, {torch.get_num_threads()} threads, median of 15 alternating runs:")
        print("\n".join(_compare((256, 1024, 4096), 3000, repeats=15)))
        print(f"soft_cross_entropy_pairs, forward + backward, {torch.get_num_threads()} threads, median of 15 "
              "alternating runs:")
        print("\n".join(_compare_pairs(repeats=15)))
        print(f"barlow_twins, forward + backward, {torch.get_num_threads()} threads, median of 15 alternating runs:")
        print("\n".join(_compare_barlow_twins(repeats=15)))


if __name__ == "__main__":
    # Run fastssl.native's own copy: backends imports it, and this __main__ copy would register
    # the ops a second time.
    from fastssl import native

    native._main()
