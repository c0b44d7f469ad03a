"""Backend choice, from one static manifest.

Every core op has up to four implementations, named in :data:`MANIFEST` as ``"module:function"``
strings — the only place a backend is registered; nothing is imported until it is chosen:

* ``reference`` — the plain-PyTorch spec (``fastssl.<family>.reference``); always available.
* ``torch``     — fast algorithms in PyTorch ops (``fastssl.<family>.torch_backend``); any device.
* ``triton``    — Triton kernels (``fastssl.<family>.triton_backend`` launching
                  ``fastssl.kernels.<family>``): CUDA tensors, or CPU tensors under
                  ``TRITON_INTERPRET=1`` (tests only).
* ``native``    — the C++/CUDA extension from ``csrc/`` (``fastssl.<family>.native_backend``), once
                  it is built (``python -m fastssl.build``): no loss call ever compiles it.

A backend that cannot serve a call says why (xformers' ``not_supported_reasons`` style): first
the generic gate (Triton: devices, then importable; native: built and loaded), then the backend
module's own ``not_supported_reasons(tensors)`` if it has one. ``backend="auto"`` takes the first
backend of :data:`AUTO_ORDER` that the manifest lists for the op, that can serve the call (Triton
never for CPU tensors) and whose module's ``auto_skip_reasons(tensors)``, if it has one, is empty
(a backend that runs the call but knowingly slower than the next); an explicit backend that cannot raises
:class:`BackendUnavailableError` with every reason. ``FASTSSL_BACKEND`` replaces ``"auto"``.

Compiled code can still fail when it is called (a Triton kernel out of shared memory or
registers for the card, a compilation error, a failed launch: :func:`is_backend_failure`). Under
``auto`` such a failure is recorded as a reason for that op, backend and signature (dtypes and
devices), warned once, and the call is served by the next backend that can; an explicit backend
raises :class:`BackendFailedError` naming the op, the inputs and the error. A failure in the
backward (autograd calling the backend's backward op) cannot be re-served and is raised.

Resolution imports by name, which ``torch.compile`` cannot trace: ``import fastssl`` resolves the
reference and torch backends, and a compiled call sees an implementation only once an eager call
(or :func:`preload`) has resolved it.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import native, triton

BACKENDS = ("reference", "torch", "triton", "native")
AUTO_ORDER = ("triton", "native", "torch", "reference")

MANIFEST: Dict[str, Dict[str, str]] = {
    "info_nce": {
        "reference": "fastssl.contrastive.reference:info_nce",
        "torch": "fastssl.contrastive.torch_backend:info_nce",
        "triton": "fastssl.contrastive.triton_backend:info_nce",
    },
    "info_nce_self": {
        "reference": "fastssl.contrastive.reference:info_nce_self",
        "torch": "fastssl.contrastive.torch_backend:info_nce_self",
        "triton": "fastssl.contrastive.triton_backend:info_nce_self",
    },
    "info_nce_masked": {
        "reference": "fastssl.contrastive.reference:info_nce_masked",
        "torch": "fastssl.contrastive.torch_backend:info_nce_masked",
    },
    "info_nce_self_decoupled": {
        "reference": "fastssl.contrastive.reference:info_nce_self_decoupled",
        "torch": "fastssl.contrastive.torch_backend:info_nce_self_decoupled",
    },
    "barlow_twins": {
        "reference": "fastssl.redundancy.reference:barlow_twins",
        "torch": "fastssl.redundancy.torch_backend:barlow_twins",
        "triton": "fastssl.redundancy.triton_backend:barlow_twins",
        "native": "fastssl.redundancy.native_backend:barlow_twins",
    },
    "vicreg_variance_covariance": {
        "reference": "fastssl.redundancy.reference:vicreg_variance_covariance",
        "torch": "fastssl.redundancy.torch_backend:vicreg_variance_covariance",
        "triton": "fastssl.redundancy.triton_backend:vicreg_variance_covariance",
    },
    "vicreg": {"reference": "fastssl.redundancy.reference:vicreg", "torch": "fastssl.redundancy.torch_backend:vicreg"},
    "mutual_nearest_neighbors": {
        "reference": "fastssl.redundancy.reference:mutual_nearest_neighbors",
        "torch": "fastssl.redundancy.torch_backend:mutual_nearest_neighbors",
    },
    "sinkhorn": {
        "reference": "fastssl.clustering.reference:sinkhorn",
        "torch": "fastssl.clustering.torch_backend:sinkhorn",
        "triton": "fastssl.clustering.triton_backend:sinkhorn",
        "native": "fastssl.clustering.native_backend:sinkhorn",
    },
    "kmeans_assign": {
        "reference": "fastssl.clustering.reference:kmeans_assign",
        "torch": "fastssl.clustering.torch_backend:kmeans_assign",
    },
    "soft_cross_entropy_pairs": {
        "reference": "fastssl.distillation.reference:soft_cross_entropy_pairs",
        "torch": "fastssl.distillation.torch_backend:soft_cross_entropy_pairs",
        "triton": "fastssl.distillation.triton_backend:soft_cross_entropy_pairs",
        "native": "fastssl.distillation.native_backend:soft_cross_entropy_pairs",
    },
    "linear_soft_cross_entropy_pairs": {
        "reference": "fastssl.distillation.reference:linear_soft_cross_entropy_pairs",
        "torch": "fastssl.distillation.torch_backend:linear_soft_cross_entropy_pairs",
    },
    "linear_distillation": {
        "reference": "fastssl.distillation.reference:linear_distillation",
        "torch": "fastssl.distillation.torch_backend:linear_distillation",
        "triton": "fastssl.distillation.triton_backend:linear_distillation",
    },
    "linear_cross_entropy": {
        "reference": "fastssl.distillation.reference:linear_cross_entropy",
        "torch": "fastssl.distillation.torch_backend:linear_cross_entropy",
    },
    "tico": {"reference": "fastssl.spectral.reference:tico", "torch": "fastssl.spectral.torch_backend:tico"},
    "mmcr": {"reference": "fastssl.spectral.reference:mmcr", "torch": "fastssl.spectral.torch_backend:mmcr"},
    "frossl": {"reference": "fastssl.spectral.reference:frossl", "torch": "fastssl.spectral.torch_backend:frossl"},
    "emp_ssl": {"reference": "fastssl.spectral.reference:emp_ssl", "torch": "fastssl.spectral.torch_backend:emp_ssl"},
    "patch_kernel_alignment": {
        "reference": "fastssl.spectral.reference:patch_kernel_alignment",
        "torch": "fastssl.spectral.torch_backend:patch_kernel_alignment",
    },
    "gram_anchoring": {
        "reference": "fastssl.spectral.reference:gram_anchoring",
        "torch": "fastssl.spectral.torch_backend:gram_anchoring",
    },
    "hypersphere_uniformity": {
        "reference": "fastssl.spectral.reference:hypersphere_uniformity",
        "torch": "fastssl.spectral.torch_backend:hypersphere_uniformity",
    },
    "co2": {"reference": "fastssl.regularizers.reference:co2", "torch": "fastssl.regularizers.torch_backend:co2"},
    "koleo": {"reference": "fastssl.regularizers.reference:koleo", "torch": "fastssl.regularizers.torch_backend:koleo"},
    "dse": {"reference": "fastssl.regularizers.reference:dse", "torch": "fastssl.regularizers.torch_backend:dse"},
    "whitening": {"reference": "fastssl.whitening.reference:whitening",
                  "torch": "fastssl.whitening.torch_backend:whitening"},
    "wmse": {"reference": "fastssl.whitening.reference:wmse", "torch": "fastssl.whitening.torch_backend:wmse"},
    "negative_cosine_similarity": {
        "reference": "fastssl.cosine.reference:negative_cosine_similarity",
        "torch": "fastssl.cosine.torch_backend:negative_cosine_similarity",
    },
    "sigreg_sums": {"reference": "fastssl.sliced.reference:sigreg_sums", "torch": "fastssl.sliced.torch_backend:sigreg_sums"},
    "visreg_shape": {
        "reference": "fastssl.sliced.reference:visreg_shape",
        "torch": "fastssl.sliced.torch_backend:visreg_shape",
    },
    "msn_anchor_terms": {
        "reference": "fastssl.distillation.reference:msn_anchor_terms",
        "torch": "fastssl.distillation.torch_backend:msn_anchor_terms",
    },
    "mae": {"reference": "fastssl.masked.reference:mae", "torch": "fastssl.masked.torch_backend:mae"},
    "wav2vec2_contrastive": {
        "reference": "fastssl.masked.reference:wav2vec2_contrastive",
        "torch": "fastssl.masked.torch_backend:wav2vec2_contrastive",
    },
    "hubert": {"reference": "fastssl.masked.reference:hubert", "torch": "fastssl.masked.torch_backend:hubert"},
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this call; the message lists every reason."""


class BackendFailedError(BackendUnavailableError):
    """An explicitly requested backend was chosen, but its compiled code failed on the call."""


# Backends of compiled code, whose compile or launch can fail on a call where torch works.
COMPILED_BACKENDS = ("triton", "native")
# Whether ``auto`` may take Triton for CPU tensors under ``TRITON_INTERPRET=1``: never by default
# (the interpreter is for tests); tests of ``auto`` itself turn it on.
AUTO_USES_INTERPRETER = False


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op: ``fn``, and ``supports(tensors) -> reasons it
    cannot serve them`` (empty: it can)."""

    fn: Callable
    supports: Callable[[Sequence[torch.Tensor]], List[str]]
    auto_skips: Optional[Callable[[Sequence[torch.Tensor]], List[str]]] = None  # reasons auto passes it over


# (op, backend) -> Implementation, filled as the manifest's entries are first used.
_RESOLVED: Dict[Tuple[str, str], Implementation] = {}


def _always(_tensors: Sequence[torch.Tensor]) -> List[str]:
    return []


def ops() -> List[str]:
    return sorted(MANIFEST)


def implementation(op: str, backend: str) -> Implementation:
    """The manifest's ``backend`` entry of ``op``, imported on first use."""
    key = (op, backend)
    if key not in _RESOLVED:
        module_name, function_name = MANIFEST[op][backend].split(":")
        module = importlib.import_module(module_name)
        _RESOLVED[key] = Implementation(getattr(module, function_name),
                                        getattr(module, "not_supported_reasons", _always),
                                        getattr(module, "auto_skip_reasons", None))
    return _RESOLVED[key]


# (op, backend) -> why its module could not be imported (a checkout without ``pip install``
# lacks ``fastssl.kernels``; a broken Triton raises anything): a reason, never a crash of ``auto``.
_IMPORT_FAILURES: Dict[Tuple[str, str], str] = {}


def _import_reasons(op: str, backend: str) -> List[str]:
    key = (op, backend)
    if key not in _RESOLVED and key not in _IMPORT_FAILURES:
        try:
            implementation(op, backend)
        except Exception as error:  # ImportError, or anything a broken dependency raises at import
            _IMPORT_FAILURES[key] = (f"importing {MANIFEST[op][backend]} failed ({type(error).__name__}: {error}); "
                                     "is fastssl installed (`pip install -e .`)?")
    return [_IMPORT_FAILURES[key]] if key in _IMPORT_FAILURES else []


def _gate_reasons(backend: str, tensors: Sequence[torch.Tensor]) -> List[str]:
    """What stops a whole backend, asked before any of its modules is imported."""
    if backend == "triton":
        return triton.reasons(tensors)
    if backend == "native":
        return list(native.status("cpu"))
    return []


def preload(*backends: str) -> None:
    """Resolve every manifest entry of ``backends`` that can run in this process (for code that
    is compiled before any eager call; ``import fastssl`` preloads reference and torch)."""
    for op, entries in MANIFEST.items():
        for backend in entries:
            if backend not in backends:
                continue
            if backend == "triton" and triton.import_reasons():
                continue
            if backend == "native" and native.status("cpu"):
                continue
            _import_reasons(op, backend)
    forget_choices()


def requested_backend(backend: str) -> str:
    """The backend a call asked for, after the ``FASTSSL_BACKEND`` override of ``"auto"``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = os.environ.get("FASTSSL_BACKEND", "auto") or "auto"
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {', '.join(BACKENDS)}; got {backend!r}")
    return backend


# (op, backend, signature) -> how the backend's compiled code failed on a call of that signature;
# ``auto`` skips it from then on (a compile failure would repeat on every call).
_CALL_FAILURES: Dict[Tuple[str, str, tuple], str] = {}


def _signature(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((t.dtype, t.device.type) for t in tensors)


def unavailable_reasons(op: str, backend: str, tensors: Sequence[torch.Tensor]) -> List[str]:
    """Every reason ``backend`` cannot run ``op`` on ``tensors`` (empty list: it can)."""
    gate = _gate_reasons(backend, tensors)
    if backend not in MANIFEST[op]:
        return [f"fastssl has no {backend} implementation of {op} yet"] + gate
    failure = _CALL_FAILURES.get((op, backend, _signature(tensors)))
    return gate or _import_reasons(op, backend) or ([failure] if failure else []) or \
        implementation(op, backend).supports(tensors)


def call_failures() -> List[str]:
    """Every failure of compiled code recorded in this process, as "op: backend: reason"."""
    return [f"{op}: {backend}: {reason}" for (op, backend, _), reason in _CALL_FAILURES.items()]


def is_backend_failure(error: BaseException) -> bool:
    """Whether ``error`` is compiled code failing rather than the call being wrong: any error of
    Triton (``OutOfResources``, ``CompilationError``, the interpreter's), or a ``RuntimeError``
    (a launch or driver error); not running out of memory, which the next backend would too."""
    if type(error).__module__.split(".")[0] == "triton":
        return True
    return isinstance(error, RuntimeError) and not isinstance(error, (torch.OutOfMemoryError, BackendUnavailableError))


def _failure_text(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def _handling_failures(fn: Callable, handle: Callable) -> Callable:
    """``fn``, whose compiled-code failures (:func:`is_backend_failure`) go to
    ``handle(error, args, kwargs)``; other errors propagate."""
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            if not is_backend_failure(error):
                raise
            return handle(error, args, kwargs)

    return call


def _falling_back(op: str, backend: str, fn: Callable, tensors: Sequence[torch.Tensor]) -> Callable:
    """``fn`` that, when its compiled code fails, records why and lets ``auto`` serve the call."""
    def fall_back(error, args, kwargs):
        key = (op, backend, _signature(tensors))
        _CALL_FAILURES[key] = f"its compiled code failed on {describe(tensors)} ({_failure_text(error)})"
        forget_choices()
        try:
            chosen, fallback = _select_auto(op, tensors)
            result = fallback(*args, **kwargs)
        except Exception:
            del _CALL_FAILURES[key]  # every backend fails: the call is wrong, not the backend
            forget_choices()
            raise
        warnings.warn(f"fastssl op {op!r}: the {backend} backend failed ({_failure_text(error)}); backend='auto' "
                      f"uses {chosen} for {describe(tensors)} from now on (python -m fastssl.info lists it)",
                      RuntimeWarning, stacklevel=3)
        return result

    return _handling_failures(fn, fall_back)


def _explaining_failures(op: str, backend: str, fn: Callable, tensors: Sequence[torch.Tensor]) -> Callable:
    """``fn`` whose compiled-code failures say which backend, op and inputs failed."""
    def explain(error, args, kwargs):
        raise BackendFailedError(f"backend {backend!r} failed to run fastssl op {op!r} on {describe(tensors)} "
                                 f"(backend='auto' would fall back to the next backend): "
                                 f"{type(error).__name__}: {error}") from error

    return _handling_failures(fn, explain)


def _select_auto(op: str, tensors: Sequence[torch.Tensor]) -> Tuple[str, Callable]:
    on_cpu = all(t.device.type == "cpu" for t in tensors)
    for candidate in AUTO_ORDER:
        if candidate not in MANIFEST[op] or (candidate == "triton" and on_cpu and not AUTO_USES_INTERPRETER):
            continue
        if not unavailable_reasons(op, candidate, tensors) and not _auto_skips(op, candidate, tensors):
            fn = implementation(op, candidate).fn
            if candidate in COMPILED_BACKENDS and not torch.compiler.is_compiling():
                fn = _falling_back(op, candidate, fn, tensors)
            return candidate, fn
    raise BackendUnavailableError(f"no backend can run fastssl op {op!r} on {describe(tensors)}")


# ``_choice_key(op, tensors)`` -> the backend ``auto`` chose. A training loop
# asks the same question every step; the answer's reasons (gates, imports, each module's
# ``not_supported_reasons`` and ``auto_skip_reasons``) are then one dict lookup, which small calls
# notice (about a third of a small cosine call's Python). Only the name is kept: the function is
# looked up in ``_RESOLVED`` on every call, and compiled backends are wrapped for each call's tensors.
_CHOICES: Dict[tuple, str] = {}
MAX_CHOICES = 4096  # then the cache starts again (ragged shapes must not grow it without bound)


def forget_choices() -> None:
    """Drop the cached choices of ``auto``: after anything that changes what it would choose
    (a backend's compiled code failing on a call, :func:`preload`, a test patching the registry)."""
    _CHOICES.clear()


def _choice_key(op: str, tensors: Sequence[torch.Tensor]) -> tuple:
    """What ``auto``'s choice for ``op`` on ``tensors`` reads: the tensors' dtype, device, shape and
    requires_grad, and the process state that can change between calls — ``AUTO_USES_INTERPRETER``,
    the recorded call failures, the native extension's load status per part and, where Triton is a
    candidate (tensors off the CPU, or the interpreter allowed), the Triton interpreter switch
    (environment) and TF32 (the triton InfoNCE skip). About 3 µs for two tensors."""
    key = [op, AUTO_USES_INTERPRETER, id(_CALL_FAILURES), len(_CALL_FAILURES), native._STATUS.get("cpu"),
           native._STATUS.get("cuda")]
    for t in tensors:
        key += (t.dtype, t.shape, t.requires_grad)
    if AUTO_USES_INTERPRETER or not all(t.is_cpu for t in tensors):  # CPU tensors: their device is known
        key += (triton.interpreted(), torch.backends.cuda.matmul.allow_tf32, *[t.device for t in tensors])
    return tuple(key)


def _select_auto_cached(op: str, tensors: Sequence[torch.Tensor]) -> Tuple[str, Callable]:
    """``_select_auto``, its choice cached per ``_choice_key``."""
    key = _choice_key(op, tensors)
    chosen = _CHOICES.get(key)
    if chosen is None:
        chosen, fn = _select_auto(op, tensors)
        if len(_CHOICES) >= MAX_CHOICES:
            _CHOICES.clear()
        _CHOICES[key] = chosen
        return chosen, fn
    fn = implementation(op, chosen).fn
    if chosen in COMPILED_BACKENDS:
        fn = _falling_back(op, chosen, fn, tensors)
    return chosen, fn


def select(op: str, backend: str, tensors: Sequence[Optional[torch.Tensor]]) -> Tuple[str, Callable]:
    """Pick the implementation of ``op`` for ``tensors``: returns (backend name, function). The
    choice of ``auto`` in eager code is cached (``_CHOICES``); traced code chooses afresh (its
    shapes may be symbolic)."""
    tensors = [t for t in tensors if t is not None]
    backend = requested_backend(backend)
    if backend == "auto":
        if torch.compiler.is_compiling():
            return _select_auto(op, tensors)
        return _select_auto_cached(op, tensors)
    reasons = unavailable_reasons(op, backend, tensors)
    if reasons:
        raise BackendUnavailableError(
            f"backend {backend!r} cannot run fastssl op {op!r} on {describe(tensors)}: " + "; ".join(reasons))
    fn = implementation(op, backend).fn
    if backend in COMPILED_BACKENDS and not torch.compiler.is_compiling():
        fn = _explaining_failures(op, backend, fn, tensors)
    return backend, fn


def _auto_skips(op: str, backend: str, tensors: Sequence[torch.Tensor]) -> List[str]:
    """Why ``auto`` passes over a backend that can run the call (its module's ``auto_skip_reasons``)."""
    skips = implementation(op, backend).auto_skips
    return skips(tensors) if skips is not None else []


def describe(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{t.dtype} {tuple(t.shape)} on {t.device}" for t in tensors) or "no tensors"
