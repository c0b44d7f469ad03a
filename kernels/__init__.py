"""Triton kernels of fastssl, installed as ``fastssl.kernels``: one module per op family.

Each module holds ``@triton.jit`` kernels and their launchers and registers itself with
``fastssl.backends`` under the ``triton`` backend. Importing this package never imports Triton;
``fastssl`` imports the family modules only when Triton is usable (see ``fastssl.backends``).
"""
FAMILIES: tuple = ()  # modules filled in by the kernel issues, e.g. ("contrastive",)
