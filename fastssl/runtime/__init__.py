"""What every loss family shares and none owns: the backend registry (``registry``), Triton
support (``triton``), the native build (``native``), op definition (``library``), input checks
(``validation``), dtypes (``dtypes``), cache-sized blocking (``blocks``), ``F.normalize`` with its
backward written out (``normalize``) and the
``torch.distributed`` helpers (``distributed``). Nothing here imports a family."""
from pathlib import Path as _Path

from .checkout import install as _install_checkout_kernels

_install_checkout_kernels(_Path(__file__).resolve().parent.parent)
