"""Whether Triton can run here, asked without importing it until a call could use it.

Triton serves CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests only: the
interpreter is ~1000× slower). :func:`device_reasons` reads devices and environment only, so the
registry asks it first and imports Triton (:func:`import_reasons`) only when the devices fit.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
from typing import List, Sequence, Tuple

import torch

MIN_TRITON = (3, 2)

# A plain dict memo (``functools.lru_cache`` is opaque to Dynamo; this traces without fuss).
_IMPORT_REASONS: dict = {}


def _version() -> Tuple[int, ...]:
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())


def import_reasons() -> Tuple[str, ...]:
    """Why Triton cannot be used at all in this process (empty when it can); imports it once."""
    if "value" not in _IMPORT_REASONS:
        try:
            version = _version()
        except Exception as error:  # ImportError, or a broken install raising anything at import
            reasons: Tuple[str, ...] = (f"triton is not importable ({type(error).__name__}: {error}); "
                                        "install it with `pip install fastssl[triton]`",)
        else:
            reasons = () if version >= MIN_TRITON else (
                f"triton {'.'.join(map(str, version))} is older than the required "
                f"{'.'.join(map(str, MIN_TRITON))}",)
        _IMPORT_REASONS["value"] = reasons
    return _IMPORT_REASONS["value"]


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_INSTALLED_VERSIONS: dict = {}


def _installed_version(package: str) -> Tuple[int, ...]:
    """(major, minor) of an installed distribution, read from its metadata (no import) once per
    process: ``device_reasons`` asks on every interpreted call; () if absent."""
    if package not in _INSTALLED_VERSIONS:
        try:
            text = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            _INSTALLED_VERSIONS[package] = ()
        else:
            _INSTALLED_VERSIONS[package] = tuple(int(p) for p in re.findall(r"\d+", text)[:2])
    return _INSTALLED_VERSIONS[package]


def interpreter_reasons(triton_version: Tuple[int, ...], numpy_version: Tuple[int, ...]) -> List[str]:
    """Known breakages of the Triton interpreter with these versions: up to Triton 3.6 it converts
    1-element arrays to Python ints implicitly, which numpy 2.4 made an error
    (triton-lang/triton#9171: "only 0-dimensional arrays can be converted to Python scalars")."""
    if triton_version and triton_version <= (3, 6) and numpy_version >= (2, 4):
        return [f"the Triton {'.'.join(map(str, triton_version))} interpreter fails with numpy "
                f"{'.'.join(map(str, numpy_version))} (triton-lang/triton#9171): use numpy < 2.4 or triton >= 3.7"]
    return []


def device_reasons(tensors: Sequence[torch.Tensor]) -> List[str]:
    """Reasons Triton cannot run on these tensors' devices and dtypes (no import)."""
    reasons = []
    devices = {t.device.type for t in tensors}
    if interpreted():
        if devices - {"cpu"}:
            reasons.append(f"TRITON_INTERPRET=1 runs kernels on CPU tensors only, got {sorted(devices)}")
        if any(t.dtype == torch.bfloat16 for t in tensors):
            reasons.append("the Triton interpreter has no bfloat16 arithmetic")
        reasons += interpreter_reasons(_installed_version("triton"), _installed_version("numpy"))
    elif devices != {"cuda"}:
        reasons.append(f"triton kernels need CUDA tensors, got {sorted(devices)} "
                       "(set TRITON_INTERPRET=1 to run them on CPU for testing)")
    return reasons


def reasons(tensors: Sequence[torch.Tensor]) -> List[str]:
    """Every reason Triton cannot run on these tensors: the import is tried only when the devices
    could run (a CPU call never imports Triton unless the interpreter was asked for)."""
    device = device_reasons(tensors)
    return device if device else list(import_reasons())
