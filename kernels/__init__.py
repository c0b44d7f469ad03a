"""Triton kernels of fastssl, installed as ``fastssl.kernels`` (an uninstalled checkout maps its
own ``kernels/`` there: ``fastssl.runtime.checkout``). A leaf: nothing here imports fastssl.

One module per op family (``contrastive``, ``redundancy``, ``clustering``, ``distillation``): its
``@triton.jit`` kernels and their launchers. ``launch`` (device guard, one-axis grids, float64
scalars without a device tensor, the autotuner's choice) and ``occupancy`` (SM count, split of a
reduction to fill the card) are shared by all of them. Importing this package never imports
Triton: a family's ``triton_backend`` imports its module when the registry first considers the
triton backend for a call, and only if Triton is usable.
"""
