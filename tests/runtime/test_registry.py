"""Backend choice: auto, explicit, the FASTSSL_BACKEND override, reasons, import without Triton."""
import os
import subprocess
import sys

import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl import backends
from fastssl.runtime import registry


def test_auto_on_cpu_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(4, 3)
    for op in backends.ops():
        chosen, _ = backends.select(op, "auto", [x])
        expected = "native" if not backends.unavailable_reasons(op, "native", [x]) else "torch"
        assert chosen == expected, op


def test_every_op_has_reference_and_torch():
    for op in backends.ops():
        for backend in ("reference", "torch"):
            assert backends.unavailable_reasons(op, backend, [torch.randn(2, 2)]) == []


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_explicit_unavailable_backend_raises_with_reasons(backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    with pytest.raises(fastssl.BackendUnavailableError, match=rf"backend '{backend}' cannot run fastssl op 'info_nce'.*float32 \(5, 4\) on cpu") as info:
        fn.info_nce(a, b, backend=backend)
    message = str(info.value)
    if backend == "triton":
        assert "CUDA tensors" in message or "not importable" in message
    else:
        assert "no native implementation of info_nce" in message


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of reference, torch, triton, native; got 'cuda'"):
        fn.barlow_twins(torch.randn(4, 3), torch.randn(4, 3), backend="cuda")
    with pytest.raises(TypeError, match="backend must be a string"):
        fn.barlow_twins(torch.randn(4, 3), torch.randn(4, 3), backend=None)


def test_environment_override_replaces_auto_only(monkeypatch):
    calls = []
    original = backends.implementation("barlow_twins", "reference")

    def spy(*args):
        calls.append("reference")
        return original.fn(*args)

    monkeypatch.setitem(registry._RESOLVED, ("barlow_twins", "reference"), registry.Implementation(spy, original.supports))
    a, b = torch.randn(6, 3), torch.randn(6, 3)
    monkeypatch.setenv("FASTSSL_BACKEND", "reference")
    fn.barlow_twins(a, b)
    assert calls == ["reference"]
    fn.barlow_twins(a, b, backend="torch")  # an explicit argument wins over the environment
    assert calls == ["reference"]
    monkeypatch.setenv("FASTSSL_BACKEND", "native")  # VICReg has no native op
    with pytest.raises(fastssl.BackendUnavailableError, match="backend 'native'"):
        fn.vicreg(a, b)
    monkeypatch.setenv("FASTSSL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="got 'bogus'"):
        fn.barlow_twins(a, b)


def test_triton_device_reasons(monkeypatch):
    cpu = [torch.randn(2, 2)]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert any("CUDA tensors" in r or "not importable" in r for r in backends.triton_device_reasons(cpu))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not backends.triton_import_reasons():
        assert backends.triton_device_reasons(cpu) == []
        bf16 = [torch.randn(2, 2, dtype=torch.bfloat16)]
        assert any("bfloat16" in r for r in backends.triton_device_reasons(bf16))


def test_import_without_triton_and_info_says_why():
    """`import fastssl` and `python -m fastssl.info` work when triton cannot be imported."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, fastssl\n"
        "print(fastssl.NTXentLoss()(torch.randn(4, 3), torch.randn(4, 3)).item())\n"
        "from fastssl import info; print(info.report())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "0", "FASTSSL_NATIVE": "0"})
    assert out.returncode == 0, out.stderr
    assert "triton backend     unavailable: triton is not importable" in out.stdout
    assert "native cpu         unavailable: disabled by FASTSSL_NATIVE=0" in out.stdout


def test_info_module_runs():
    out = subprocess.run([sys.executable, "-m", "fastssl.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"fastssl            {fastssl.__version__}" in out.stdout
    for op in backends.ops():
        assert f"  {op}   [auto → " in out.stdout
    assert "native     no: " in out.stdout


@pytest.mark.triton
def test_triton_interpreter_runs_a_kernel_on_cpu():
    """conftest sets TRITON_INTERPRET=1 before triton is imported, so kernels run on CPU tensors."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the kernels are compiled, not interpreted")
    import triton
    import triton.language as tl

    @triton.jit
    def scaled_add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask)
        y = tl.load(y_ptr + offsets, mask=mask)
        tl.store(out_ptr + offsets, x * alpha + y, mask=mask)

    x, y = torch.randn(37), torch.randn(37)
    out = torch.empty_like(x)
    scaled_add[(triton.cdiv(37, 16),)](x, y, out, 37, 0.5, BLOCK=16)
    torch.testing.assert_close(out, 0.5 * x + y)


def _counting_select_auto(monkeypatch):
    """Record every uncached choice of ``auto`` (the op asked), passing it on."""
    asked = []
    original = registry._select_auto

    def counting(op, tensors):
        asked.append(op)
        return original(op, tensors)

    monkeypatch.setattr(registry, "_select_auto", counting)
    return asked


def test_auto_choices_are_cached_per_dtype_shape_and_requires_grad(monkeypatch):
    asked = _counting_select_auto(monkeypatch)
    x, y = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4)
    op = "negative_cosine_similarity"
    first = registry.select(op, "auto", [x, y])
    assert registry.select(op, "auto", [x, y]) == first and asked == [op]  # the second call asks nothing
    registry.select(op, "auto", [x.double(), y.double()])
    registry.select(op, "auto", [x.detach(), y])
    registry.select(op, "auto", [torch.randn(6, 4), y[:1].expand(6, 4)])
    assert asked == [op] * 4
    registry.select(op, "auto", [x, y])
    assert asked == [op] * 4  # still cached
    registry.forget_choices()
    registry.select(op, "auto", [x, y])
    assert asked == [op] * 5


def test_a_cached_choice_follows_the_backend_override(monkeypatch):
    x = torch.randn(5, 4)
    assert registry.select("barlow_twins", "auto", [x, x])[0] in ("native", "torch")
    monkeypatch.setenv("FASTSSL_BACKEND", "reference")
    assert registry.select("barlow_twins", "auto", [x, x])[0] == "reference"
    monkeypatch.delenv("FASTSSL_BACKEND")
    assert registry.select("barlow_twins", "auto", [x, x])[0] in ("native", "torch")


def test_a_recorded_failure_changes_the_cached_choice(monkeypatch):
    """A backend's compiled code failing on a signature (here: recorded by hand for torch) makes
    ``auto`` choose again for it; the other signatures keep their choice."""
    x, y = torch.randn(5, 4), torch.randn(5, 4, dtype=torch.float64)
    op = "negative_cosine_similarity"
    assert registry.select(op, "auto", [x, x])[0] == "torch" and registry.select(op, "auto", [y, y])[0] == "torch"
    monkeypatch.setitem(registry._CALL_FAILURES, (op, "torch", registry._signature([x, x])), "failed")
    assert registry.select(op, "auto", [x, x])[0] == "reference"
    assert registry.select(op, "auto", [y, y])[0] == "torch"


@pytest.mark.triton
def test_a_cached_choice_follows_the_triton_interpreter_switch(monkeypatch):
    """With the interpreter allowed for ``auto``, CPU float16 InfoNCE goes to Triton while
    TRITON_INTERPRET is set and to torch once it is not: the environment is part of the cached
    choice's key."""
    monkeypatch.setattr(registry, "AUTO_USES_INTERPRETER", True)
    x = torch.randn(8, 4, dtype=torch.float16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry.select("info_nce", "auto", [x, x])[0] == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert registry.select("info_nce", "auto", [x, x])[0] == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry.select("info_nce", "auto", [x, x])[0] == "triton"
