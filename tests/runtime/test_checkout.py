"""A source checkout used without ``pip install`` (``PYTHONPATH=checkout``, issue 17 item 2): its
``fastssl.kernels`` is its own ``kernels/``; a ``fastssl/`` without ``kernels/`` beside it runs
every loss, the Triton backend saying why it cannot, never a crash."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs in the copied tree: no installed fastssl may answer (the editable install's finder of the
# environment is removed, so only PYTHONPATH can provide fastssl).
PROBE = """
    import sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()
                        and "editable" not in type(f).__name__.lower()]
    import torch, fastssl
    from fastssl import backends, info
    print("fastssl from", fastssl.__file__)
    scores = torch.randn(9, 20)
    print("auto ->", backends.select("sinkhorn", "auto", [scores])[0])
    print("triton reasons:", backends.unavailable_reasons("sinkhorn", "triton", [scores]))
    try:
        codes = fastssl.sinkhorn_knopp(scores, backend="triton")
        import fastssl.kernels
        print("kernels from", fastssl.kernels.__file__, "codes", tuple(codes.shape))
    except fastssl.BackendUnavailableError as error:
        print("explicit:", error)
    print("loss:", fastssl.nt_xent(scores, scores.flip(0)).item())
    print(info.report())
"""


def _copy_checkout(destination: Path, with_kernels: bool) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    shutil.copytree(REPO_ROOT / "fastssl", destination / "fastssl", ignore=ignore)
    if with_kernels:
        shutil.copytree(REPO_ROOT / "kernels", destination / "kernels", ignore=ignore)
    return destination


def _probe_copied_checkout(tmp_path: Path, with_kernels: bool) -> str:
    """PROBE's output in a copy of this checkout (``fastssl/``, and ``kernels/`` if asked)."""
    checkout = _copy_checkout(tmp_path, with_kernels)
    environment = {**os.environ, "PYTHONPATH": str(checkout), "TRITON_INTERPRET": "1", "FASTSSL_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(PROBE)], capture_output=True, text=True,
                         timeout=300, cwd=checkout, env=environment)
    assert out.returncode == 0, out.stderr
    assert f"fastssl from {checkout / 'fastssl' / '__init__.py'}" in out.stdout
    return out.stdout


@pytest.mark.triton
def test_a_checkout_without_install_runs_its_own_kernels(tmp_path):
    stdout = _probe_copied_checkout(tmp_path, with_kernels=True)
    assert "triton reasons: []" in stdout
    assert f"kernels from {tmp_path / 'kernels' / '__init__.py'} codes (9, 20)" in stdout


def test_a_checkout_without_kernels_records_the_reason(tmp_path):
    stdout = _probe_copied_checkout(tmp_path, with_kernels=False)
    assert "auto -> torch" in stdout
    reason = ("importing fastssl.clustering.triton_backend:sinkhorn failed (ModuleNotFoundError: No module named "
              "'fastssl.kernels'); is fastssl installed (`pip install -e .`)?")
    assert stdout.count(reason) >= 2  # the registry's reason, in unavailable_reasons and in fastssl.info
    assert "explicit: backend 'triton' cannot run fastssl op 'sinkhorn'" in stdout
    assert "loss:" in stdout
