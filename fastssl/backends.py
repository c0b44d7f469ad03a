"""Backend registry and choice.

Every op family has up to four implementations:

* ``reference`` — the plain-PyTorch spec (``fastssl.reference``); always available.
* ``torch``     — fast algorithms in PyTorch ops, registered as ``torch.library`` ops; any device.
* ``triton``    — Triton kernels (``fastssl.kernels``); CUDA tensors, or CPU tensors under
                  ``TRITON_INTERPRET=1`` (tests only: the interpreter is ~1000× slower).
* ``native``    — the C++/CUDA extension built from ``csrc/``.

A backend that cannot serve a call says why (xformers' ``not_supported_reasons`` style).
``backend="auto"`` takes the first backend that can serve the call, in the order of
``AUTO_ORDER``; naming a backend explicitly raises ``BackendUnavailableError`` with every reason
when it cannot. The environment variable ``FASTSSL_BACKEND`` replaces ``"auto"`` (an explicit
``backend=`` argument still wins).
"""
from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

BACKENDS = ("reference", "torch", "triton", "native")
AUTO_ORDER = ("triton", "native", "torch", "reference")
MIN_TRITON = (3, 2)
HALF_DTYPES = (torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this call; the message lists every reason."""


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op.

    ``supports(tensors) -> list of reasons it cannot serve them`` (empty: it can).
    """

    fn: Callable
    supports: Callable[[Sequence[torch.Tensor]], List[str]]


_IMPLEMENTATIONS: Dict[str, Dict[str, Implementation]] = {}


def _always(_tensors: Sequence[torch.Tensor]) -> List[str]:
    return []


def register(op: str, backend: str, fn: Callable, supports: Optional[Callable] = None) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op`` (called by ops / kernel modules)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _IMPLEMENTATIONS.setdefault(op, {})[backend] = Implementation(fn, supports or _always)


def ops() -> List[str]:
    return sorted(_IMPLEMENTATIONS)


def _once(probe: Callable[[], object]) -> Callable[[], object]:
    """Memoise a probe that takes no argument (a plain dict, which Dynamo traces without fuss)."""
    results: dict = {}

    @functools.wraps(probe)
    def cached():
        if "value" not in results:
            results["value"] = probe()
        return results["value"]

    return cached


def _triton_version() -> Tuple[int, ...]:
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())


@_once
def triton_import_reasons() -> Tuple[str, ...]:
    """Why Triton cannot be used at all in this process (empty when it can)."""
    try:
        version = _triton_version()
    except Exception as error:  # ImportError, or a broken install raising anything at import
        return (f"triton is not importable ({type(error).__name__}: {error}); "
                "install it with `pip install fastssl[triton]`",)
    if version < MIN_TRITON:
        return (f"triton {'.'.join(map(str, version))} is older than the required "
                f"{'.'.join(map(str, MIN_TRITON))}",)
    return ()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_device_reasons(tensors: Sequence[torch.Tensor]) -> List[str]:
    """Reasons the Triton backend cannot run on these tensors (device and dtype checks)."""
    reasons = list(triton_import_reasons())
    devices = {t.device.type for t in tensors}
    if triton_interpreted():
        if devices - {"cpu"}:
            reasons.append(f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, got {sorted(devices)}")
        if any(t.dtype == torch.bfloat16 for t in tensors):
            reasons.append("the Triton interpreter has no bfloat16 arithmetic")
    elif devices != {"cuda"}:
        reasons.append(f"triton kernels need CUDA tensors, got {sorted(devices)} "
                       "(set TRITON_INTERPRET=1 to run them on CPU for testing)")
    return reasons


@_once
def native_import_reasons() -> Tuple[str, ...]:
    """Why the native (csrc/) extension cannot be used (empty when it can)."""
    try:
        native = importlib.import_module("fastssl.native")
    except ImportError:
        return ("the native C++/CUDA extension is not part of this build yet (csrc/ has no ops)",)
    return tuple(native.unavailable_reasons())


def requested_backend(backend: str) -> str:
    """The backend a call asked for, after the ``FASTSSL_BACKEND`` override of ``"auto"``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("FASTSSL_BACKEND", "auto") or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend


@_once
def load_triton_kernels() -> None:
    """Import the Triton kernel families (they register themselves), once, if Triton is usable."""
    if not triton_import_reasons():
        kernels = importlib.import_module("fastssl.kernels")
        for family in pkgutil.iter_modules(kernels.__path__):
            importlib.import_module(f"fastssl.kernels.{family.name}")


def unavailable_reasons(op: str, backend: str, tensors: Sequence[torch.Tensor]) -> List[str]:
    """Every reason ``backend`` cannot run ``op`` on ``tensors`` (empty list: it can)."""
    if backend == "triton":
        load_triton_kernels()
    elif backend == "native":
        native_import_reasons()  # builds or loads the extension, which registers its ops, once
    implementation = _IMPLEMENTATIONS.get(op, {}).get(backend)
    if implementation is None:
        reasons = [f"fastssl has no {backend} implementation of {op} yet"]
        if backend == "triton":
            reasons += triton_device_reasons(tensors)
        elif backend == "native":
            reasons += list(native_import_reasons())
        return reasons
    return implementation.supports(tensors)


def select(op: str, backend: str, tensors: Sequence[Optional[torch.Tensor]]) -> Tuple[str, Callable]:
    """Pick the implementation of ``op`` for ``tensors``: returns (backend name, function)."""
    tensors = [t for t in tensors if t is not None]
    backend = requested_backend(backend)
    if backend != "auto":
        reasons = unavailable_reasons(op, backend, tensors)
        if reasons:
            raise BackendUnavailableError(
                f"backend {backend!r} cannot run fastssl op {op!r} on "
                f"{describe(tensors)}: " + "; ".join(reasons)
            )
        return backend, _IMPLEMENTATIONS[op][backend].fn
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    for candidate in AUTO_ORDER:
        if candidate == "triton" and on_cpu:
            continue  # the interpreter is for tests, never a default
        if not unavailable_reasons(op, candidate, tensors):
            return candidate, _IMPLEMENTATIONS[op][candidate].fn
    raise BackendUnavailableError(f"no backend can run fastssl op {op!r} on {describe(tensors)}")


def describe(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{t.dtype} {tuple(t.shape)} on {t.device}" for t in tensors) or "no tensors"
