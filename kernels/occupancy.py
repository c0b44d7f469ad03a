"""How many programs a launch needs to fill the card: the SM count of a device and the split of a
reduction that reaches PROGRAMS_PER_SM programs per SM (the kernels' shared launch arithmetic)."""
from __future__ import annotations

import torch
import triton

PROGRAMS_PER_SM = 2  # split a reduction until its launch has this many programs per SM
_SM_COUNTS: dict = {}


def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device (cached); 1 for the CPU tensors of the interpreter."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def splits(programs: int, length: int, block: int, device: torch.device):
    """(splits, length per split) of a reduction over ``length`` in steps of ``block``, launched
    as ``programs`` programs per split: enough splits for PROGRAMS_PER_SM programs per SM (whole
    steps per split, so the count rounds up), at most one per step, none empty."""
    steps = max(1, triton.cdiv(length, block))
    wanted = triton.cdiv(PROGRAMS_PER_SM * multiprocessors(device), programs)
    per_split = max(1, steps // wanted) * block
    return max(1, triton.cdiv(length, per_split)), per_split
