"""Backend choice (documented name): re-exports ``fastssl.runtime.registry``, where every backend
is registered in one static manifest, and the Triton and native status checks."""
from .runtime.native import status as native_status
from .runtime.registry import (
    AUTO_ORDER,
    BACKENDS,
    MANIFEST,
    BackendFailedError,
    BackendUnavailableError,
    implementation,
    ops,
    preload,
    requested_backend,
    select,
    unavailable_reasons,
)
from .runtime.triton import device_reasons as triton_device_reasons
from .runtime.triton import import_reasons as triton_import_reasons
from .runtime.triton import interpreted as triton_interpreted

__all__ = ["AUTO_ORDER", "BACKENDS", "MANIFEST", "BackendFailedError", "BackendUnavailableError", "implementation", "ops", "preload",
           "requested_backend", "select", "unavailable_reasons", "native_status", "triton_device_reasons",
           "triton_import_reasons", "triton_interpreted"]
