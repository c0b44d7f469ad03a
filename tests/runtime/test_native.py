"""The native (csrc/) backend: its ops against the reference, the JIT build's robustness, and
the CUDA sources compiling with nvcc.

The extension is built (or loaded from its cache) once per session by the ``native`` fixture;
tests that need it are skipped, with the reason, where it cannot be built.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fastssl.runtime import native

CUDA_SOURCES = sorted(native.SOURCE_DIR.glob("*/*.cu"))


# --- build robustness ------------------------------------------------------------------------
def _python(code, env, timeout=120):
    environment = {**os.environ, "TRITON_INTERPRET": "0", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=environment)


FALLBACK_PROBE = """
    import torch, fastssl
    from fastssl import backends, info
    scores = torch.randn(6, 4)
    print("auto ->", backends.select("sinkhorn", "auto", [scores])[0])
    print(fastssl.functional.sinkhorn_knopp(scores).sum().item())
    print(info.report())
"""


@pytest.mark.parametrize("env,reason", [
    ({"CXX": "/nonexistent/c++", "FASTSSL_NATIVE": "build"}, "no C++ compiler: '/nonexistent/c++' is not on PATH"),
    ({"CXX": "false", "FASTSSL_NATIVE": "build"}, "building the native extension failed"),
    ({"FASTSSL_NATIVE": "0"}, "disabled by FASTSSL_NATIVE=0"),
    ({}, "not built: run `python -m fastssl.build` once"),
], ids=["no-compiler", "failed-build", "opt-out", "not-built"])
def test_unusable_extension_falls_back_and_says_why(tmp_path, env, reason):
    out = _python(FALLBACK_PROBE, {"FASTSSL_NATIVE_CACHE": str(tmp_path), **env})
    assert out.returncode == 0, out.stderr
    assert "auto -> torch" in out.stdout
    assert f"native cpu         unavailable: {reason}" in out.stdout
    if "FASTSSL_NATIVE" not in env:  # nobody asked for a build: no compiler ran, nothing was written
        assert not any(tmp_path.iterdir())


def test_cache_directory_is_predictable(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSSL_NATIVE_CACHE", str(tmp_path))
    directory = native.build_directory("cpu")
    assert directory.parent == tmp_path
    assert directory.name.startswith(f"torch{torch.__version__}-cpu-")
    assert native.build_directory("cpu") == directory
    assert native.build_directory("cuda") != directory
    monkeypatch.delenv("FASTSSL_NATIVE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_root() == tmp_path / "xdg" / "fastssl" / "native"


def test_a_second_process_waits_for_the_build_lock(built):
    """While one process holds the build lock, another one's build blocks, then loads."""
    if native._prebuilt_library("cpu") is not None:
        pytest.skip("a prebuilt library is loaded without building")
    directory = native.build_directory("cpu")
    code = """
        import sys, time
        from fastssl.runtime import native
        print("ready", flush=True)
        start = time.perf_counter()
        print(list(native.build(("cpu",))["cpu"]), round(time.perf_counter() - start, 1), flush=True)
    """
    # Without its stamp the build is redone (a no-op for ninja, which finds everything up to date).
    (directory / native.BUILT_STAMP).unlink()
    with native.build_lock(directory):
        process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
        assert process.stdout.readline().strip() == "ready"
        time.sleep(2.0)
        assert process.poll() is None, "the second process did not wait for the lock"
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    reasons, waited = stdout.split("] ")[0] + "]", float(stdout.split("] ")[1])
    assert reasons == "[]" and waited >= 1.5


# --- CUDA sources ----------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile_for_sm80_and_sm90_without_warnings(source, tmp_path):
    command = ["nvcc", "-c", str(source), "-o", str(tmp_path / "out.o"), "-std=c++17",
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cuda_sources_include_no_torch_header():
    assert CUDA_SOURCES
    for path in CUDA_SOURCES + sorted(native.SOURCE_DIR.glob("*/*.cuh")):
        text = Path(path).read_text()
        for header in ("<ATen/", "<torch/", "<c10/"):
            assert header not in text, f"{path.name} includes {header}"


