"""What every kernel module's launchers share: the device guard, one-axis grids, float64 scalar
arguments without a device tensor, and the autotuner's choice among candidate configs.

A leaf like the kernel modules (torch and triton, nothing of fastssl).
"""
from __future__ import annotations

import contextlib
import functools
import math
import struct
from typing import Callable, Dict, Hashable, Iterable, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

# CUDA's grid limit on axis 0 (axes 1 and 2 stop at 65,535): kernels that could need more
# programs than that along a second axis take a one-axis grid and decode their indices.
MAX_GRID_PROGRAMS = 2**31 - 1


def on_device(tensor: Tensor):
    """The context to launch kernels on ``tensor``: Triton launches on the *current* CUDA device
    and its stream, so a ``cuda:1`` tensor with ``cuda:0`` current needs its device made current;
    nothing for CPU tensors (the interpreter)."""
    if tensor.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def on_input_device(launcher: Callable) -> Callable:
    """Decorate a launcher so it runs on the device of its first tensor argument (``on_device``)."""
    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        with on_device(first):
            return launcher(*args, **kwargs)

    return guarded


def flat_grid(*counts: int) -> Tuple[int]:
    """A one-axis grid of prod(counts) programs (the kernel decodes the index, last count
    fastest); ValueError past CUDA's 2³¹ − 1 programs."""
    programs = math.prod(counts)
    if programs > MAX_GRID_PROGRAMS:
        raise ValueError(f"a launch of {' × '.join(map(str, counts))} = {programs} programs exceeds CUDA's "
                         f"{MAX_GRID_PROGRAMS} per grid")
    return (programs,)


def float64_parts(value: float) -> Tuple[float, float, float]:
    """Three float32-representable floats whose float64 sum is exactly ``value``: Triton passes a
    Python float as float32, so a float64 scalar travels in three arguments (a one-element device
    tensor would cost a fill launch on every call) and the kernel adds them up in float64
    (24 + 24 + 24 bits hold the 53 of a double)."""
    def to_float32(x: float) -> float:
        return struct.unpack("f", struct.pack("f", x))[0]

    high = to_float32(value)
    middle = to_float32(value - high)
    return high, middle, value - high - middle


@triton.jit
def from_float64_parts(high, middle, low, FP64: tl.constexpr):
    """In a kernel, the scalar that :func:`float64_parts` split: the float64 sum of its parts, or
    (float32 arithmetic) the first one."""
    value = tl.cast(high, tl.float32)
    if FP64:
        value = (tl.cast(high, tl.float64) + tl.cast(middle, tl.float64)) + tl.cast(low, tl.float64)
    return value


def shape_bucket(size: int) -> int:
    """The autotuner's key for a size: its next power of two, so that ragged batches (1000, 1001,
    …) share one tuning run instead of timing every shape."""
    return 1 << max(0, int(size) - 1).bit_length()


_TUNED: Dict[Hashable, tuple] = {}


def fastest(key: Hashable, candidates: Iterable[tuple], time_config: Callable[[tuple], float]) -> tuple:
    """The candidate config with the least ``time_config(config)`` (seconds or ms), timed once
    per ``key`` and process. A config that fails to compile or launch (``OutOfResources``, a
    compilation error: anything ``time_config`` raises) is dropped, not fatal; if every one
    fails, the first candidate's error is raised."""
    if key not in _TUNED:
        candidates = list(dict.fromkeys(candidates))  # unique, in order
        timings, first_error = {}, None
        for config in candidates:
            try:
                timings[config] = time_config(config)
            except Exception as error:  # a config the target cannot run: OutOfResources, CompilationError, ...
                first_error = first_error or error
        if not timings:
            raise first_error
        _TUNED[key] = min(timings, key=timings.get)
    return _TUNED[key]
