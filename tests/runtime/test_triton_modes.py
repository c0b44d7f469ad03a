"""Each Triton test runs only in the mode its tensors fit, and the interpreter's known breakages
are reasons, not crashes."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastssl.runtime import triton as triton_runtime
from helpers import triton_skip_reason

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("keywords, interpreted, runs", [
    ({"triton"}, True, True), ({"triton"}, False, False),
    ({"triton", "requires_cuda"}, True, False), ({"triton", "requires_cuda"}, False, True),
    (set(), True, True), (set(), False, True)])
def test_triton_tests_run_only_in_the_mode_their_tensors_fit(keywords, interpreted, runs):
    reason = triton_skip_reason(keywords, interpreted)
    assert (reason is None) == runs
    if reason:
        assert "TRITON_INTERPRET" in reason


def test_compiled_mode_skips_the_interpreter_tests_with_the_reason():
    """With TRITON_INTERPRET=0 (what a CUDA machine would use for its compiled tests) the CPU-tensor
    Triton tests are skipped, never handed to compiled kernels."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "tests/runtime/test_registry.py::test_triton_interpreter_runs_a_kernel_on_cpu"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert "1 skipped" in result.stdout, result.stdout + result.stderr
    assert "through the interpreter (TRITON_INTERPRET=1)" in result.stdout or "triton unusable" in result.stdout


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ((3, 6), (2, 4), True), ((3, 5), (2, 5), True), ((3, 6), (2, 3), False), ((3, 7), (2, 4), False),
    ((), (2, 4), False)])
def test_interpreter_with_numpy_2_4_is_a_reason_before_triton_3_7(triton_version, numpy_version, broken):
    reasons = triton_runtime.interpreter_reasons(triton_version, numpy_version)
    assert bool(reasons) == broken
    if broken:
        assert "triton-lang/triton#9171" in reasons[0]
