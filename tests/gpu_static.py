"""Compiling Triton kernels for a GPU on a machine without one (tests only).

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))`` runs
the whole pipeline down to a cubin with the ptxas shipped in the triton wheel; ``ptxas -v`` on the
PTX reports registers and spills. No driver is needed, so the limits of the card a user will run
on are checked here, before any card is lent.

The tests run with ``TRITON_INTERPRET=1``, under which ``@triton.jit`` makes interpreter objects
that cannot be compiled: :func:`compile_in_subprocess` compiles in fresh processes without it
(``python tests/gpu_static.py`` reads the kernel specs as JSON on stdin).

Which kernels and configs to compile is read from the launchers themselves: under
:func:`recording_launches` every Triton kernel of ``fastssl.kernels`` is replaced by a recorder,
and the op glue (``fastssl.<family>.triton_backend``) runs on ``meta`` tensors, so each launch it
would make — kernel, argument types, constexprs (tiles, flags), num_warps / num_stages — is
recorded without a device and without a copy of the launchers' choices.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import torch

# Shared memory one block may use (opt-in maximum), per compute capability: H100 (sm_90)
# 227 KiB, A100 (sm_80) 163 KiB (CUDA C programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {90: 232_448, 80: 166_912}


@dataclass(frozen=True)
class CompiledKernel:
    shared_bytes: int
    registers: int
    spill_bytes: int  # spill stores + spill loads reported by ptxas
    ptx: str
    has_dot: bool = False  # the kernel multiplies tiles (a tt.dot in its Triton IR)
    tf32_dot: bool = False  # ... one of them on float32 operands with input_precision "tf32" (else IEEE)
    seconds: float = 0.0  # the compile's wall time (Triton + ptxas)

    @property
    def uses_tensor_cores(self) -> bool:
        return bool(re.search(r"\b(mma|wgmma)\.", self.ptx))


def _ptxas(capability: int) -> str:
    """The ptxas of the triton wheel for this architecture (``get_ptxas`` took no argument before
    Triton 3.5)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(capability).path
    except TypeError:
        return get_ptxas().path


def ptxas_unavailable_reason() -> Optional[str]:
    try:
        for capability in SHARED_MEMORY_LIMIT:
            if not Path(_ptxas(capability)).is_file():
                return f"no ptxas for sm_{capability} in the triton wheel"
    except Exception as error:  # noqa: BLE001 - any failure is the reason to skip
        return f"ptxas not available ({type(error).__name__}: {error})"
    return None


def compile_for(fn, signature: Mapping[str, str], constexprs: Mapping[str, object], capability: int,
                options: Optional[Mapping[str, int]] = None, divisible: Sequence[str] = ()) -> CompiledKernel:
    """``fn`` (a ``@triton.jit`` function) compiled for ``sm_<capability>`` with the launch
    ``options`` (num_warps, num_stages) its launcher passes; every constexpr of ``constexprs``
    must also be in ``signature`` as "constexpr". The arguments named in ``divisible`` are
    multiples of 16 (pointers: 16-byte aligned), as Triton's launcher specialises them."""
    import triton
    from triton.backends.compiler import GPUTarget
    start = time.perf_counter()
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    kernel = triton.compile(triton.compiler.ASTSource(fn, dict(signature), dict(constexprs), attrs),
                            target=GPUTarget("cuda", capability, 32), options=dict(options or {}))
    ptx, ttir = kernel.asm["ptx"], kernel.asm["ttir"]
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)  # sm_90a where Triton uses Hopper's wgmma
        report = subprocess.run([_ptxas(capability), f"-arch={arch}", "-v", str(source), "-o",
                                 str(Path(folder) / "kernel.cubin")], capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    dots = re.findall(r"tt\.dot .*", ttir)  # IEEE, the default, is not printed
    return CompiledKernel(shared_bytes=kernel.metadata.shared, registers=registers, spill_bytes=spills, ptx=ptx,
                          has_dot=bool(dots), tf32_dot=any("inputPrecision = tf32" in dot for dot in dots),
                          seconds=time.perf_counter() - start)


REPO_ROOT = Path(__file__).resolve().parents[1]


def _compile_batch(specs: Sequence[Mapping[str, object]]) -> List[CompiledKernel]:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__], input=json.dumps(list(specs)), env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"compiling the kernels failed:\n{result.stderr[-4000:]}")
    return [CompiledKernel(**fields) for fields in json.loads(result.stdout)]


def compile_in_subprocess(specs: Sequence[Mapping[str, object]], processes: Optional[int] = None
                          ) -> List[CompiledKernel]:
    """Each spec {"module", "kernel", "signature", "constexprs", "capability", "options",
    "divisible"} compiled by :func:`compile_for` in fresh processes without the interpreter (one
    per core by default, each compiling its share in turn); results in order."""
    specs = list(specs)
    count = max(1, min(processes or os.cpu_count() or 1, len(specs)))
    shares = [specs[i::count] for i in range(count)]
    with ThreadPoolExecutor(count) as pool:
        compiled = list(pool.map(_compile_batch, shares))
    results: List[Optional[CompiledKernel]] = [None] * len(specs)
    for i, share in enumerate(compiled):
        results[i::count] = share
    return results


TRITON_TYPE = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.bool: "i1"}


def _argument_type(value) -> str:
    """Triton's signature type of a launch argument, as its launcher would see it."""
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for launch argument {value!r}")


def _is_constexpr(fn, name: str) -> bool:
    """Whether parameter ``name`` of the kernel is a ``tl.constexpr`` (annotations may be strings)."""
    return "constexpr" in str(inspect.signature(fn.fn).parameters[name].annotation)


class _Recorder:
    """Stands in for one kernel: ``kernel[grid](*args, **kwargs)`` appends the launch's spec."""

    def __init__(self, module: str, name: str, kernel, launches: List[Dict[str, object]]):
        self.module, self.name, self.kernel, self.launches = module, name, kernel, launches

    def __getitem__(self, grid):
        self.grid = None if callable(grid) else tuple(grid)
        return self._launch

    def _launch(self, *args, **kwargs):
        names = self.kernel.arg_names
        values = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in names})
        signature, constexprs, divisible = {}, {}, []
        for name in names:
            value = values[name]
            if _is_constexpr(self.kernel, name):
                signature[name], constexprs[name] = "constexpr", value
                continue
            signature[name] = _argument_type(value)
            if isinstance(value, torch.Tensor) or (isinstance(value, int) and not isinstance(value, bool)
                                                   and value % 16 == 0):
                divisible.append(name)
        self.launches.append({"module": self.module, "kernel": self.name, "signature": signature,
                              "constexprs": constexprs, "divisible": divisible, "grid": self.grid,
                              "options": {k: v for k, v in kwargs.items() if k not in names}})


@contextlib.contextmanager
def recording_launches(package: str = "fastssl.kernels") -> Iterator[List[Dict[str, object]]]:
    """Every Triton kernel of the (imported) modules of ``package`` replaced by a recorder; yields
    the list the launches are appended to (one spec each, without "capability")."""
    from triton.runtime.jit import KernelInterface

    launches: List[Dict[str, object]] = []
    replaced = []
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith(package + "."):
            continue
        for name, value in list(vars(module).items()):
            if isinstance(value, KernelInterface):
                replaced.append((module, name, value))
                setattr(module, name, _Recorder(module_name, name, value, launches))
    try:
        yield launches
    finally:
        for module, name, value in replaced:
            setattr(module, name, value)


def _main() -> None:
    results = []
    for spec in json.load(sys.stdin):
        fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        compiled = compile_for(fn, spec["signature"], spec["constexprs"], spec["capability"], spec.get("options"),
                               spec.get("divisible", ()))
        results.append(dataclasses.asdict(compiled))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    _main()
