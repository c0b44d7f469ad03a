"""A backend whose module cannot be imported (a checkout used without ``pip install`` has no
``fastssl.kernels``; a broken dependency) is a reason: ``auto`` goes on to the next backend and an
explicit request says why."""
import subprocess
import sys

PROBE = """
import sys, torch
sys.modules["fastssl.kernels.contrastive"] = None  # as if kernels/ were not installed
import fastssl
from fastssl import backends
x = torch.randn(6, 4)
print("auto ->", backends.select("info_nce_self", "auto", [x])[0])
print("reasons:", backends.unavailable_reasons("info_nce_self", "triton", [x]))
try:
    fastssl.nt_xent(x, x.flip(0), backend="triton")
except fastssl.BackendUnavailableError as error:
    print("explicit:", error)
print("loss:", fastssl.nt_xent(x, x.flip(0)).item())
"""


def test_a_backend_that_cannot_be_imported_is_a_reason():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "auto -> torch" in out.stdout
    assert "importing fastssl.contrastive.triton_backend:info_nce_self failed (ModuleNotFoundError" in out.stdout
    assert "explicit: backend 'triton' cannot run fastssl op 'info_nce_self'" in out.stdout
    assert "loss:" in out.stdout
