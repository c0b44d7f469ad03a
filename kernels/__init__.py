"""Triton kernels of fastssl, installed as ``fastssl.kernels``: one module per op family.

Each module holds ``@triton.jit`` kernels and their launchers and registers its ops with
``fastssl.backends`` under the ``triton`` backend when imported. Importing this package never
imports Triton: ``fastssl.backends.load_triton_kernels`` imports every module here, once, the
first time the triton backend is considered and only if Triton is usable.
"""
