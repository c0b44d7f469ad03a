"""The native backend's build: C++ (CPU, OpenMP) and CUDA ops from ``csrc/``, in two parts.

No loss call ever compiles. A loss asks :func:`status`, which only *loads*, once per process:

1. ``FASTSSL_NATIVE=0`` turns the backend off.
2. A library built ahead of time (``FASTSSL_BUILD_NATIVE=1 pip install --no-build-isolation .``,
   see ``setup.py``) next to the package is loaded as it is.
3. A library built earlier by :func:`build` for this torch version, source tree, flags and CPU
   (``$FASTSSL_NATIVE_CACHE``, default ``~/.cache/fastssl/native``) is loaded.
4. Otherwise the part is "not built" — ``auto`` takes the torch backend — unless
   ``FASTSSL_NATIVE=build`` asked to build on first need.

:func:`build` (``python -m fastssl.build``) compiles each part with ninja, printing what it builds
and how long it took. The parts are independent: the ``cpu`` part (``csrc/<family>/*_cpu.cpp``)
defines every op and its CPU kernels; the ``cuda`` part (``csrc/<family>/*.cu`` and
``*_cuda.cpp``, only where torch has CUDA and ``nvcc`` is found) adds CUDA kernels to them, so a
failed CUDA build leaves the CPU part working. An exclusive ``fcntl`` lock on ``build.lock``
serialises processes that build at the same time (DDP ranks); the kernel releases it when its
holder dies, unlike torch's own lock file. Any failure becomes a reason that ``auto`` skips and
``python -m fastssl.info`` prints.
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
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

PACKAGE_DIR = Path(__file__).resolve().parent.parent
SOURCE_DIR = PACKAGE_DIR.parent / "csrc"
PARTS = ("cpu", "cuda")
BUILD_COMMAND = "python -m fastssl.build"
BUILT_STAMP = "built.ok"  # written once a build has finished, so a half-written library is never loaded
# -fno-trapping-math: with it gcc turns the comparisons of fast_exp.h into selects and vectorises
# the loop (2-3x faster); nothing here reads floating-point exception flags.
# -mprefer-vector-width=512: gcc's -march=native picks 256-bit vectors on AVX-512 CPUs; 512-bit
# ones run the fast_exp passes ~1.2x faster here (the Sinkhorn too), and change nothing elsewhere.
# -ffp-contract=off: no fused multiply-add but those written out (fast_exp.h's mul_add), so that
# x · σ − L rounds as in torch (see fast_exp.h).
CXX_FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fno-trapping-math", "-ffp-contract=off",
             "-fopenmp")
LD_FLAGS = ("-fopenmp",)
# No -std: torch's cpp_extension passes the C++ standard its headers need (C++20 on torch 2.13,
# where a hard-coded -std=c++17 warns, and is an error to come); see torch_cxx_standard.
CUDA_FLAGS = ("-O3",)
# How many lines of a failed build's output a reason quotes.
ERROR_TAIL_LINES = 12

Tensor = torch.Tensor


def torch_cxx_standard() -> str:
    """The ``-std=`` torch's ``cpp_extension`` compiles extensions with ("c++20" on torch 2.13):
    the newest standard its build code names, read from its source since torch exposes it
    nowhere else (to compile the CUDA sources as the build does)."""
    import inspect
    import re

    from torch.utils import cpp_extension

    standards = re.findall(r"-std=c\+\+(\d+)", inspect.getsource(cpp_extension))
    return f"c++{max(map(int, standards))}" if standards else "c++17"


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


def sources(part: str) -> List[Path]:
    """The sources of a part: ``csrc/<family>/*_cpu.cpp``, or ``*.cu`` and ``*_cuda.cpp``."""
    if part == "cpu":
        return sorted(SOURCE_DIR.glob("*/*_cpu.cpp"))
    return sorted(SOURCE_DIR.glob("*/*.cu")) + sorted(SOURCE_DIR.glob("*/*_cuda.cpp"))


def library_name(part: str) -> str:
    return f"fastssl_native_{part}"


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


@functools.lru_cache(maxsize=None)
def _source_digest() -> "hashlib._Hash":
    """The sha256 state after the source tree (every source's path and bytes; copy it before
    updating), read once per process: each look-up of a built library needs it; a build hashes
    afresh what it compiles (:func:`_compile_reporting`), so a library is never filed under
    sources edited since."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.rglob("*")):
        if path.suffix in (".cpp", ".cu", ".h", ".cuh"):
            digest.update(path.relative_to(SOURCE_DIR).as_posix().encode())
            digest.update(path.read_bytes())
    return digest


def build_directory(part: str) -> Path:
    """The cache subdirectory of this part, torch version, source tree, flags and CPU."""
    digest = _source_digest().copy()
    flags = CXX_FLAGS + LD_FLAGS + (CUDA_FLAGS if part == "cuda" else ())
    digest.update(repr((flags, part, cpu_model(), os.environ.get("CXX", "c++"))).encode())
    return cache_root() / f"torch{torch.__version__}-{part}-{digest.hexdigest()[:16]}"


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


def _prebuilt_library(part: str) -> Optional[Path]:
    """The library ``setup.py`` built ahead of time next to the package, if any."""
    candidates = sorted(PACKAGE_DIR.glob(f"_{library_name(part)}*.so"))
    return candidates[0] if candidates else None


def _built_library(part: str) -> Optional[Path]:
    """The library :func:`build` left in the cache, if it finished (its stamp is written last)."""
    directory = build_directory(part)
    return directory / f"{library_name(part)}.so" if (directory / BUILT_STAMP).exists() else None


def _load_library(path: Path) -> Tuple[str, ...]:
    try:
        torch.ops.load_library(str(path))
    except Exception as error:  # a library built for another torch: anything may be raised
        return (f"loading {path} failed ({type(error).__name__}: {error}); rebuild it with `{BUILD_COMMAND}`",)
    return ()


# part -> reasons it is unusable (empty: loaded); a plain dict, which Dynamo traces.
_STATUS: Dict[str, Tuple[str, ...]] = {}


def _part_prerequisites(part: str) -> Tuple[str, ...]:
    if os.environ.get("FASTSSL_NATIVE", "1").strip() == "0":
        return ("disabled by FASTSSL_NATIVE=0",)
    if part == "cuda":
        if not torch.version.cuda:
            return ("this torch has no CUDA",)
        cpu = status("cpu")
        if cpu:
            return ("the cuda part extends the cpu part, which is unusable: " + "; ".join(cpu),)
    return ()


def status(part: str = "cpu") -> Tuple[str, ...]:
    """Why a part of the extension cannot be used (empty: it is loaded). Loads a built library
    once; never compiles, unless ``FASTSSL_NATIVE=build``."""
    if part not in _STATUS:
        reasons = _part_prerequisites(part)
        if not reasons:
            prebuilt = _prebuilt_library(part)
            if prebuilt is not None:
                reasons = _load_library(prebuilt)
            elif _built_library(part) is not None:
                reasons = _load_library(_built_library(part))
            elif os.environ.get("FASTSSL_NATIVE", "").strip() == "build":
                return build((part,))[part]
            else:
                reasons = (f"not built: run `{BUILD_COMMAND}` once (or set FASTSSL_NATIVE=build)",)
        _STATUS[part] = reasons
    return _STATUS[part]


def _build_reasons(part: str) -> Tuple[str, ...]:
    """What stops a part from being built here (empty: it can be)."""
    missing = [str(path) for path in sources(part) if not path.exists()] or ([] if sources(part) else [str(SOURCE_DIR)])
    if missing:
        return (f"the C++ sources are not installed ({', '.join(missing)} missing); "
                "install fastssl from a source checkout or prebuild with FASTSSL_BUILD_NATIVE=1",)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (f"no C++ compiler: {compiler!r} is not on PATH (set CXX)",)
    if part == "cuda" and _cuda_home() is None:
        return ("no CUDA toolkit (nvcc) was found for this torch's CUDA build",)
    ninja_reason = _find_ninja()
    return (ninja_reason,) if ninja_reason else ()


def _compile(part: str) -> None:
    from torch.utils import cpp_extension

    directory = build_directory(part)
    with build_lock(directory):
        # torch's own lock file: left behind by a build that was killed, it would make every
        # later build wait forever; holding build.lock, no other process is building.
        (directory / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name=library_name(part),
            sources=[str(path) for path in sources(part)],
            extra_cflags=list(CXX_FLAGS),
            extra_ldflags=list(LD_FLAGS),
            extra_cuda_cflags=list(CUDA_FLAGS),
            extra_include_paths=[str(SOURCE_DIR / "common")],
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
        (directory / BUILT_STAMP).touch()


def build(parts: Sequence[str] = PARTS, log=sys.stderr) -> Dict[str, Tuple[str, ...]]:
    """Build and load each part (one already built is only loaded) and return its reasons (empty:
    loaded). Prints each part's sources, where it goes and how long it took; a part that fails
    leaves the others as they are."""
    results = {}
    for part in parts:
        reasons = _part_prerequisites(part)
        if not reasons and _STATUS.get(part) != ():
            prebuilt = _prebuilt_library(part)
            if prebuilt is None and _built_library(part) is None:
                reasons = _build_reasons(part) or _compile_reporting(part, log)
            if not reasons:
                reasons = _load_library(prebuilt or _built_library(part))
        _STATUS[part] = results[part] = reasons
    return results


def _compile_reporting(part: str, log) -> Tuple[str, ...]:
    _source_digest.cache_clear()  # the directory names the sources compiled now
    names = ", ".join(path.relative_to(SOURCE_DIR).as_posix() for path in sources(part))
    print(f"fastssl native {part}: building {names} into {build_directory(part)} ...", file=log, flush=True)
    start = time.perf_counter()
    try:
        _compile(part)
        reasons: Tuple[str, ...] = ()
    except Exception as error:  # compiler errors are RuntimeError, but a broken toolchain may raise anything
        reasons = (_failure(error),)
    print(f"fastssl native {part}: {'failed' if reasons else 'built'} in {time.perf_counter() - start:.1f} s",
          file=log, flush=True)
    return reasons


def _failure(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return (f"building the native extension failed ({type(error).__name__}): "
            + " | ".join(lines[-ERROR_TAIL_LINES:]))


def cpu_only_reasons(tensors: Sequence[Tensor]) -> List[str]:
    """For native ops with a CPU kernel only."""
    devices = {t.device.type for t in tensors} - {"cpu"}
    if devices:
        return [f"this native op has a CPU kernel only, got {sorted(devices)} tensors"]
    return []


def require(part: str = "cpu") -> None:
    """Raise ImportError with the reasons unless the part is loaded (for the modules that
    register the native ops' fakes and autograd, which need the ops to exist)."""
    reasons = status(part)
    if reasons:
        raise ImportError(f"the native extension's {part} part is unusable: " + "; ".join(reasons))
