"""How many programs a launch needs to fill the card: the SM count of a device and the split of a
reduction that reaches PROGRAMS_PER_SM programs per SM (the kernels' shared launch arithmetic)."""
from __future__ import annotations

import torch
import triton

PROGRAMS_PER_SM = 2  # split a reduction until its launch has this many programs per SM
_PROPERTIES: dict = {}


def _properties(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROPERTIES:
        _PROPERTIES[index] = torch.cuda.get_device_properties(index)
    return _PROPERTIES[index]


def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (cached); 1 for the CPU tensors of the interpreter."""
    return _properties(device).multi_processor_count if device.type == "cuda" else 1


def capability_major(device: torch.device) -> int:
    """The compute capability's major version of a CUDA device (9: Hopper); 9 for the
    interpreter's CPU tensors, so tests take the choices of the newest card."""
    return _properties(device).major if device.type == "cuda" else 9


def splits(programs: int, length: int, block: int, device: torch.device):
    """(splits, length per split) of a reduction over ``length`` in steps of ``block``, launched
    as ``programs`` programs per split: enough splits for PROGRAMS_PER_SM programs per SM (whole
    steps per split, so the count rounds up), at most one per step, none empty."""
    steps = max(1, triton.cdiv(length, block))
    wanted = triton.cdiv(PROGRAMS_PER_SM * multiprocessors(device), programs)
    per_split = max(1, steps // wanted) * block
    return max(1, triton.cdiv(length, per_split)), per_split
