"""``python -m fastssl.info``: versions, devices, whether the native extension is built, and which
backend can run each op (and why not), and which compiled code failed on a call in this process
(``auto`` then skips it). It never builds anything.

Each op is probed with small float32 tensors on every device present (CPU, and CUDA when
available); a backend that cannot run prints its reasons.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import List

import torch

import fastssl
from fastssl.runtime import native, registry, triton


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception as error:  # a broken install may raise anything at import
        return f"not available ({type(error).__name__}: {error})"
    return getattr(module, "__version__", "unknown")


def _devices() -> List[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices


def report() -> str:
    lines = [
        f"fastssl            {fastssl.__version__}",
        f"python             {platform.python_version()} ({sys.executable})",
        f"torch              {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})",
        f"triton             {_version('triton')}",
        f"numpy              {_version('numpy')}",
        f"platform           {platform.platform()}",
        f"CPU threads        {torch.get_num_threads()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            lines.append(f"CUDA device {i}      {torch.cuda.get_device_name(i)}")
    else:
        lines.append("CUDA devices       none")
    for variable in ("FASTSSL_BACKEND", "TRITON_INTERPRET"):
        lines.append(f"{variable:<18} {os.environ.get(variable, '(unset)')}")
    lines.append("")
    triton_reasons = triton.import_reasons()
    lines.append("triton backend     " + (
        "unavailable: " + "; ".join(triton_reasons) if triton_reasons else
        "importable; runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, for tests)"))
    for part in native.PARTS:
        reasons = native.status(part)
        lines.append(f"native {part:<11} " + ("built and loaded" if not reasons else "unavailable: " + "; ".join(reasons)))
    lines.append(f"native build       `{native.BUILD_COMMAND}` (cache {native.cache_root()}); "
                 "`auto` uses the native backend only once it is built")
    failures = registry.call_failures()
    lines.append(f"{'call failures':<18} " + (f"{len(failures)}, each skipped by auto from then on:" if failures else
                                             "none (auto skips a backend whose compiled code fails on a call)"))
    lines += [f"  {failure}" for failure in failures]
    for device in _devices():
        probe = [torch.zeros(4, 4, device=device)]
        lines.append("")
        lines.append(f"ops on {device} (float32):")
        for op in registry.ops():
            chosen, _ = registry.select(op, "auto", probe)
            lines.append(f"  {op}   [auto → {chosen}]")
            for backend in registry.BACKENDS:
                reasons = registry.unavailable_reasons(op, backend, probe)
                status = "yes" if not reasons else "no: " + "; ".join(reasons)
                lines.append(f"    {backend:<10} {status}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
