"""Shared test setup.

Triton kernels run on the CPU through the interpreter: ``TRITON_INTERPRET=1`` must be set
before anything imports ``triton``, so it is set here, at the top of the first module pytest
imports — on a machine with a CUDA device too, where compiled kernels handed the CPU tensors of
the interpreter tests would fail. Each Triton test runs only in the mode its tensors fit
(``helpers.triton_skip_reason``): ``triton`` tests on CPU tensors under the interpreter,
``triton`` + ``requires_cuda`` tests on CUDA tensors with ``TRITON_INTERPRET=0`` (and
``python -m bench.gpu_check`` validates a card in one go).
"""
import os
import re
import tempfile

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

# Inductor's FX-graph cache is keyed without the vector ISA that ATEN_CPU_CAPABILITY forces
# (torch 2.13): a graph compiled under AVX-512 and reloaded under `avx2` computes garbage, under
# `default` it is C++ using at::vec without its header. Fresh, each kernel set compiles and runs
# correctly. `.ci/portability` runs the suite under each in turn, so each forced kernel set gets
# its own cache directory (read by Inductor at its first compile, not at import).
_capability = os.environ.get("ATEN_CPU_CAPABILITY")
if _capability and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{os.getuid()}_aten_{re.sub(r'[^A-Za-z0-9]', '_', _capability)}")

import pytest  # noqa: E402

from fastssl import backends  # noqa: E402
from fastssl.runtime import blocks, native, registry  # noqa: E402
from helpers import triton_skip_reason  # noqa: E402

# Decorate every kernel now, while TRITON_INTERPRET is set: @triton.jit picks interpreter or
# compiler when a kernel module is imported, and tests that unset the variable must not be the
# first to import one.
backends.preload("triton")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_runtest_setup(item):
    """Tests of the native backend build the extension once per session (the one explicit build:
    loss calls never compile), or are skipped with the reason it cannot be built."""
    if "native" in item.keywords:
        reasons = native.build(("cpu",))["cpu"]
        if reasons:
            pytest.skip("native extension unavailable: " + "; ".join(reasons))


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow to run")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason="triton unusable: " + "; ".join(backends.triton_import_reasons()))
    for item in items:
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(skip_slow)
        if "requires_cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
        if "triton" in item.keywords and backends.triton_import_reasons():
            item.add_marker(skip_triton)
        mode_reason = triton_skip_reason(item.keywords, backends.triton_interpreted())
        if mode_reason:
            item.add_marker(pytest.mark.skip(reason=mode_reason))


@pytest.fixture(autouse=True)
def _seed_and_isolate_backend(monkeypatch):
    """Every test starts from seed 0, without a FASTSSL_BACKEND override from the shell and without
    ``auto``'s cached choices (tests patch the gates those were made with)."""
    monkeypatch.delenv("FASTSSL_BACKEND", raising=False)
    torch.manual_seed(0)
    registry.forget_choices()


@pytest.fixture(scope="module")
def built():
    reasons = native.build(("cpu",))["cpu"]  # the one explicit build: loss calls never compile
    if reasons:
        pytest.skip("native extension unavailable: " + "; ".join(reasons))


@pytest.fixture(params=[pytest.param(None, id="one-block"), pytest.param(37, id="ragged-blocks")])
def block_elements(request, monkeypatch):
    """The torch backend's blocking: whole tensors at once, or blocks of 37 elements (so every
    blocked loop runs several times and ends on a partial block)."""
    if request.param is not None:
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", request.param)
    return request.param
