"""A backend whose module cannot be imported (a checkout used without ``pip install`` has no
``fastssl.kernels``; a broken dependency) is a reason: ``auto`` goes on to the next backend and an
explicit request says why; so is compiled code that fails on a call."""
import subprocess
import sys
import warnings

import pytest
import torch

import fastssl
from fastssl import backends, info
from fastssl.runtime import registry

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


# --- compiled code failing on a call (issue 17 item 4) ---------------------------------------
class FailingKernel:
    """A Triton kernel stand-in whose every launch raises ``error`` (and counts the tries)."""

    def __init__(self, error):
        self.error, self.launches = error, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.error
        return launch


def _out_of_resources():
    from triton.runtime.errors import OutOfResources

    return OutOfResources(425_984, 232_448, "shared memory")


LAUNCH_FAILURES = {
    "out-of-resources": (_out_of_resources, "OutOfResources"),
    "launch-error": (lambda: RuntimeError("Triton Error [CUDA]: an illegal instruction was encountered"),
                     "RuntimeError"),
}


@pytest.fixture
def failing_sinkhorn_kernel(request, monkeypatch):
    """Auto may take the interpreter (as it takes compiled Triton on CUDA), no failure recorded
    before, and the Sinkhorn kernel of a plain call (all phases in one kernel) failing with the
    parametrized error."""
    from fastssl.kernels import clustering as kernels

    make_error, name = LAUNCH_FAILURES[request.param]
    monkeypatch.setattr(registry, "AUTO_USES_INTERPRETER", True)
    monkeypatch.setattr(registry, "_CALL_FAILURES", {})
    kernel = FailingKernel(make_error())
    monkeypatch.setattr(kernels, "_sinkhorn_phases_kernel", kernel)
    return kernel, name


@pytest.mark.triton
@pytest.mark.parametrize("failing_sinkhorn_kernel", list(LAUNCH_FAILURES), indirect=True)
def test_auto_falls_back_when_a_triton_launch_fails_and_says_why(failing_sinkhorn_kernel):
    kernel, error_name = failing_sinkhorn_kernel
    scores = torch.randn(12, 20, dtype=torch.float64)
    assert backends.select("sinkhorn", "auto", [scores])[0] == "triton"
    with pytest.warns(RuntimeWarning, match=rf"fastssl op 'sinkhorn': the triton backend failed \({error_name}"):
        codes = fastssl.sinkhorn_knopp(scores)
    reasons = backends.unavailable_reasons("sinkhorn", "triton", [scores])
    assert len(reasons) == 1 and error_name in reasons[0] and "torch.float64 (12, 20) on cpu" in reasons[0]
    chosen = backends.select("sinkhorn", "auto", [scores])[0]
    assert chosen in ("native", "torch")
    # the next backend served the call: its own result, bit for bit
    assert torch.equal(codes, fastssl.sinkhorn_knopp(scores, backend=chosen))
    # recorded once: the next calls go straight to the next backend, without a warning
    launches = kernel.launches
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fastssl.sinkhorn_knopp(scores), codes)
    assert kernel.launches == launches
    # another signature (float32) is not affected by the float64 failure
    assert backends.select("sinkhorn", "auto", [scores.float()])[0] == "triton"
    assert error_name in info.report()


@pytest.mark.triton
@pytest.mark.parametrize("failing_sinkhorn_kernel", list(LAUNCH_FAILURES), indirect=True)
def test_explicit_triton_whose_launch_fails_raises_a_clear_error(failing_sinkhorn_kernel):
    _, error_name = failing_sinkhorn_kernel
    scores = torch.randn(12, 20)
    with pytest.raises(backends.BackendFailedError,
                       match=rf"backend 'triton' failed to run fastssl op 'sinkhorn' on torch.float32 \(12, 20\) on "
                             rf"cpu .*{error_name}") as failure:
        fastssl.sinkhorn_knopp(scores, backend="triton")
    assert failure.value.__cause__ is not None
    assert registry._CALL_FAILURES == {}  # an explicit request records nothing for auto


def test_an_error_that_every_backend_raises_is_not_a_backend_failure(monkeypatch):
    """When the next backend fails too, the call was wrong: its error is raised, nothing recorded."""
    monkeypatch.setattr(registry, "_CALL_FAILURES", {})
    x = torch.randn(3, 2)

    def broken(*args):
        raise RuntimeError("launch failed")

    def wrong_call(*args):
        raise RuntimeError("the inputs do not fit")

    monkeypatch.setattr(registry, "_select_auto", lambda op, tensors: ("torch", wrong_call))
    with pytest.raises(RuntimeError, match="the inputs do not fit"):
        registry._falling_back("sinkhorn", "triton", broken, [x])(x)
    assert registry._CALL_FAILURES == {}


@pytest.mark.parametrize("make_error, failure", [
    (_out_of_resources, True), (lambda: RuntimeError("CUDA error: unspecified launch failure"), True),
    (lambda: torch.OutOfMemoryError("CUDA out of memory"), False), (lambda: ValueError("bad input"), False),
    (lambda: fastssl.BackendUnavailableError("no backend"), False)])
def test_which_errors_are_backend_failures(make_error, failure):
    assert registry.is_backend_failure(make_error()) == failure
