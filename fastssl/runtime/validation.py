"""Input checks shared by every public function.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
size, device or value) with the argument's name and the shapes involved, so that a bad call
fails loudly instead of returning a silent NaN or a wrong number.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed

class InputError(ValueError, AssertionError):
    """Bad input where lightly 1.6 ``assert``s: a ``ValueError`` that ``except AssertionError`` still catches."""


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, value, ndim: Optional[int] = None, min_ndim: int = 1) -> torch.Tensor:
    """A non-empty floating-point tensor, with exactly ``ndim`` (or at least ``min_ndim``) dims."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype} "
            f"(shape {tuple(value.shape)})"
        )
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(value.shape)}")
    if value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    return value


def check_label_tensor(name: str, value, length: int) -> torch.Tensor:
    """An integer tensor of shape (length,)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(value.shape)}")
    return value


def check_same_shape(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    shapes = [tuple(t.shape) for t in tensors]
    if any(s != shapes[0] for s in shapes):
        described = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
        raise ValueError(f"{' and '.join(names)} must have the same shape, got {described}")


def check_same_dtype(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    dtypes = [t.dtype for t in tensors]
    if any(d != dtypes[0] for d in dtypes):
        described = ", ".join(f"{n} {d}" for n, d in zip(names, dtypes))
        raise TypeError(f"{' and '.join(names)} must have the same dtype, got {described}")


def check_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    devices = [t.device for t in tensors]
    if any(d != devices[0] for d in devices):
        described = ", ".join(f"{n} on {d}" for n, d in zip(names, devices))
        raise ValueError(f"{' and '.join(names)} must be on the same device, got {described}")


def check_batch_at_least(name: str, tensor: torch.Tensor, minimum: int, why: str) -> None:
    if tensor.shape[0] < minimum:
        raise ValueError(
            f"{name} needs a batch of at least {minimum} rows ({why}), got shape {tuple(tensor.shape)}"
        )


def check_positive(name: str, value) -> float:
    """A finite number > 0 (temperatures, epsilons)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def check_finite_number(name: str, value) -> float:
    """A finite real number (a weight or coefficient of any sign)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_temperature(name: str, value) -> float:
    """lightly's rule for a temperature: a finite number with |τ| ≥ 1e-8 (a negative one is allowed)."""
    value = check_finite_number(name, value)
    if abs(value) < 1e-8:
        raise ValueError(f"Illegal {name}: abs({value}) < 1e-8")
    return value


def check_non_negative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def check_int_at_least(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_tensor_list(name: str, value, min_len: int = 1) -> list:
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(value).__name__}")
    if len(value) < min_len:
        raise ValueError(f"{name} must hold at least {min_len} tensor(s), got {len(value)}")
    for i, t in enumerate(value):
        check_float_tensor(f"{name}[{i}]", t)
    return list(value)


def check_views(names: Sequence[str], tensors: Sequence[torch.Tensor], ndim: Optional[int] = 2) -> None:
    """Floating-point views of one shape, dtype and device (``ndim`` dims; None: any)."""
    for name, tensor in zip(names, tensors):
        check_float_tensor(name, tensor, ndim=ndim)
    check_same_shape(names, tensors)
    check_same_dtype(names, tensors)
    check_same_device(names, tensors)


def eager() -> bool:
    """Value checks (which read tensor data) run in eager mode only, not while compiling."""
    return not torch.compiler.is_compiling()


def check_distributed_available(name: str, value: bool) -> bool:
    """lightly's constructor check: ``name=True`` needs a torch built with ``torch.distributed``."""
    if value and not torch.distributed.is_available():
        raise ValueError(f"{name} is True but torch.distributed is not available. Please set {name}=False or "
                         "install a torch version with distributed support.")
    return value
