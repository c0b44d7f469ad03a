"""Compiling Triton kernels for a GPU on a machine without one (tests only).

``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))`` runs
the whole pipeline down to a cubin with the ptxas shipped in the triton wheel; ``ptxas -v`` on the
PTX reports registers and spills. No driver is needed, so the limits of the card a user will run
on are checked here, before any card is lent.

The tests run with ``TRITON_INTERPRET=1``, under which ``@triton.jit`` makes interpreter objects
that cannot be compiled: :func:`compile_in_subprocess` compiles in a fresh process without it
(``python tests/gpu_static.py`` reads the kernel specs as JSON on stdin).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

# Shared memory one block may use (opt-in maximum), per compute capability: H100 (sm_90)
# 227 KiB, A100 (sm_80) 163 KiB (CUDA C programming guide, compute capabilities table).
SHARED_MEMORY_LIMIT = {90: 232_448, 80: 166_912}


@dataclass(frozen=True)
class CompiledKernel:
    shared_bytes: int
    registers: int
    spill_bytes: int  # spill stores + spill loads reported by ptxas
    ptx: str

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
                options: Optional[Mapping[str, int]] = None) -> CompiledKernel:
    """``fn`` (a ``@triton.jit`` function) compiled for ``sm_<capability>`` with the launch
    ``options`` (num_warps, num_stages) its launcher passes; every constexpr of ``constexprs``
    must also be in ``signature`` as "constexpr"."""
    import triton
    from triton.backends.compiler import GPUTarget
    kernel = triton.compile(triton.compiler.ASTSource(fn, dict(signature), dict(constexprs)),
                            target=GPUTarget("cuda", capability, 32), options=dict(options or {}))
    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)  # sm_90a where Triton uses Hopper's wgmma
        report = subprocess.run([_ptxas(capability), f"-arch={arch}", "-v", str(source), "-o",
                                 str(Path(folder) / "kernel.cubin")], capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return CompiledKernel(shared_bytes=kernel.metadata.shared, registers=registers, spill_bytes=spills, ptx=ptx)


REPO_ROOT = Path(__file__).resolve().parents[1]


def compile_in_subprocess(specs: Sequence[Mapping[str, object]]) -> List[CompiledKernel]:
    """Each spec {"module", "kernel", "signature", "constexprs", "capability", "options"} compiled by
    :func:`compile_for` in one fresh process without the interpreter; results in order."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, __file__], input=json.dumps(list(specs)), env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"compiling the kernels failed:\n{result.stderr[-4000:]}")
    return [CompiledKernel(**fields) for fields in json.loads(result.stdout)]


def _main() -> None:
    results = []
    for spec in json.load(sys.stdin):
        fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
        compiled = compile_for(fn, spec["signature"], spec["constexprs"], spec["capability"], spec.get("options"))
        results.append(dataclasses.asdict(compiled))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    _main()
