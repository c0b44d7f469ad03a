"""The native (csrc/) backend: its ops against the reference, the JIT build's robustness, and
the CUDA sources compiling with nvcc.

The extension is built (or loaded from its cache) once per session by the ``native`` fixture;
tests that need it are skipped, with the reason, where it cannot be built.
"""
import io
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


@pytest.fixture
def fresh_source_digest():
    """The sources' digest read anew, and forgotten after the test (which may point SOURCE_DIR elsewhere)."""
    native._source_digest.cache_clear()
    yield
    native._source_digest.cache_clear()


def test_sources_are_read_once_per_process_and_again_by_a_build(monkeypatch, tmp_path, fresh_source_digest):
    """Every look-up of a built library names its directory: csrc is read by the first only. A
    build reads it again, so an edited source is compiled into a directory of its own."""
    sources = tmp_path / "csrc"
    shutil.copytree(native.SOURCE_DIR, sources)
    monkeypatch.setattr(native, "SOURCE_DIR", sources)
    reads = []
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: reads.append(path) or read_bytes(path))
    directory = native.build_directory("cpu")
    first_reads = len(reads)
    assert first_reads == len([p for p in sources.rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh")]) > 0
    assert native.build_directory("cpu") == directory and native.build_directory("cuda") != directory
    assert len(reads) == first_reads

    (sources / "common" / "common.h").write_text((sources / "common" / "common.h").read_text() + "\n// edited\n")
    assert native.build_directory("cpu") == directory  # not read again: the process's own sources
    compiled_into = []
    monkeypatch.setattr(native, "_compile", lambda part: compiled_into.append(native.build_directory(part)))
    assert native._compile_reporting("cpu", io.StringIO()) == ()
    assert len(reads) == 2 * first_reads
    assert compiled_into[0] != directory and native.build_directory("cpu") == compiled_into[0]


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
    """With the C++ standard torch's extension build uses (~6 s a source here)."""
    command = ["nvcc", "-c", str(source), "-o", str(tmp_path / "out.o"), f"-std={native.torch_cxx_standard()}",
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




def test_the_cuda_build_uses_the_cxx_standard_torch_wants():
    """No -std of our own (torch's cpp_extension adds its own unless one is given, and nvcc takes
    one only); the standard the nvcc test compiles with is the one torch's build names."""
    from torch.utils import cpp_extension
    import inspect

    assert not any(flag.startswith("-std") for flag in native.CUDA_FLAGS + native.CXX_FLAGS)
    assert f"'-std={native.torch_cxx_standard()}'" in inspect.getsource(cpp_extension)
    if torch.__version__ >= "2.13":
        assert native.torch_cxx_standard() == "c++20"


def test_a_failed_cuda_build_leaves_the_cpu_part_working(built, monkeypatch):
    """The parts build and load separately: CUDA failing to compile is the cuda part's reason only."""
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(native, "_cuda_home", lambda: "/usr/local/cuda")
    monkeypatch.setitem(native._STATUS, "cuda", ("not built",))
    cpu_status = native.status("cpu")

    def failing_compile(part):
        assert part == "cuda"
        raise RuntimeError("Error building extension 'fastssl_native_cuda'\nsinkhorn.cu(1): error: nvcc failed")

    monkeypatch.setattr(native, "_compile", failing_compile)
    monkeypatch.setattr(native, "_built_library", lambda part: None)  # only the cuda part is built here
    log = io.StringIO()
    reasons = native.build(("cuda",), log=log)["cuda"]
    assert len(reasons) == 1 and "building the native extension failed (RuntimeError)" in reasons[0]
    assert "nvcc failed" in reasons[0] and "fastssl native cuda: failed" in log.getvalue()
    assert native.status("cuda") == reasons and native.status("cpu") == cpu_status == ()
    scores = torch.randn(6, 5)
    codes = __import__("fastssl").sinkhorn_knopp(scores, backend="native")
    assert codes.shape == (6, 5)
