"""Peak CPU memory of benchmark cases, measured in a fresh Python process.

CPU tensors have no allocator statistics worth trusting (torch's CPU allocator keeps none by
default), so the peak is the growth of the process's resident set (RSS):

* the worker runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB, so every tensor-sized
  block is its own mapping and freeing it gives the pages back: RSS falls back after each run;
* before the counted run it resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``
  sets VmHWM to the current RSS), and the peak is VmHWM minus the RSS at that moment;
* a fresh process (one per case, or one for a whole quick run: see ``bench.report.run``) keeps the
  timing process's caches and fragmentation out of the number, and its address space is capped
  at what is free, so a case too large fails with a MemoryError (status "oom") instead of calling
  the kernel's OOM killer on the machine; what it measured tells the timing process which
  providers fit.

Run by :func:`cpu_peak_memory`; the worker is ``python -m bench.memory`` with a JSON spec on stdin
and one JSON line per result on stdout (Linux only: it needs ``/proc``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import core, machine

# (family, case name, provider) -> {mode: MemoryResult}
MemoryTable = Dict[Tuple[str, str, str], Dict[str, core.MemoryResult]]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")


class RssPeak:
    """Peak RSS above the RSS at ``reset()`` (Linux ``/proc``)."""

    method = "peak RSS growth in a fresh process (VmHWM)"

    def __init__(self):
        self.base = 0

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        self.base = _status_bytes("VmRSS")

    def growth(self) -> int:
        # The kernel folds each thread's cached RSS counts into the mm's lazily, so VmHWM can trail
        # the VmRSS read at reset by a few dozen pages (seen: −27 pages): the peak since reset is at
        # least that RSS, never below it.
        return max(0, max(_status_bytes("VmHWM"), _status_bytes("VmRSS")) - self.base)


def _cap_address_space() -> None:
    """Make an allocation past the free memory fail in this process instead of on the machine."""
    import resource

    limit = _status_bytes("VmSize") + machine.available_memory_bytes(torch.device("cpu"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _emit(message: dict) -> None:
    print(json.dumps(message), flush=True)


def worker(spec: dict) -> None:
    """Measure every (case, provider, mode) of ``spec``, printing one JSON line per result.

    Before each measurement a ``{"start": [family, case, provider, mode]}`` line names it, so the
    parent knows what was running if the process dies.
    """
    _cap_address_space()
    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device("cpu"), getattr(torch, spec["dtype"])
    settings = replace(core.Settings(), allow_interpreter=spec["allow_interpreter"])
    counter = RssPeak()
    for job in spec["jobs"]:
        case = core.find_case(job["family"], job["case"], spec["size_set"])
        args, leaves = core.make_inputs(case, device, dtype)
        for provider in job["providers"]:
            try:
                fn = core.build_loss(case, provider, device, settings)
            except Exception as error:
                fn, failure = None, core.classify(error, provider)
            for mode in case.modes:
                key = [case.family, case.name, provider, mode]
                _emit({"start": key})
                if fn is None:
                    _emit({"result": key, "status": failure.status, "reason": failure.reason})
                    continue
                try:
                    peak = core.peak_memory(fn, args, leaves, mode, counter)
                    _emit({"result": key, "status": "ok", "peak_bytes": peak})
                except Exception as error:
                    failure = core.classify(error, provider)
                    _emit({"result": key, "status": failure.status, "reason": failure.reason})


def _death(returncode: int, stderr: str) -> Tuple[str, str]:
    """Status and reason for a worker that exited with ``returncode`` before it was done."""
    tail = " | ".join(stderr.strip().splitlines()[-3:])
    if returncode == -signal.SIGKILL:
        return "oom", "the memory worker was killed (SIGKILL, the kernel's OOM killer?) while measuring this"
    return "failed", f"the memory worker exited with status {returncode} while measuring this: {tail}"


def cpu_peak_memory(cases: Sequence[core.Case], size_set: str, dtype: torch.dtype, settings: core.Settings,
                    providers: Optional[Sequence[str]] = None) -> MemoryTable:
    """Peak CPU memory of each (case, provider, mode), all cases in one fresh worker process.

    ``providers``: those to measure (default: every provider of each case). A worker that dies
    charges the measurement it was running (status "oom" for SIGKILL) and is restarted for the
    providers it had not reached.
    """
    pending = [(case, provider) for case in cases for provider in (providers or case.providers)
               if provider in case.providers]
    table: MemoryTable = {}
    while pending:
        spec = {"size_set": size_set, "dtype": str(dtype).replace("torch.", ""),
                "allow_interpreter": settings.allow_interpreter, "threads": torch.get_num_threads(),
                "jobs": [{"family": case.family, "case": case.name, "providers": [provider]}
                         for case, provider in pending]}
        environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        process = subprocess.run([sys.executable, "-m", "bench.memory"], input=json.dumps(spec),
                                 capture_output=True, text=True, cwd=machine.REPO_ROOT, env=environment)
        running: Optional[List[str]] = None
        for line in process.stdout.splitlines():
            if not line.startswith("{"):  # a library writing to stdout (MKL's "Intel oneMKL ERROR: ...")
                continue
            message = json.loads(line)
            if "start" in message:
                running = message["start"]
                continue
            family, name, provider, mode = message["result"]
            table.setdefault((family, name, provider), {})[mode] = core.MemoryResult(
                message["status"], message.get("peak_bytes"), message.get("reason", ""),
                RssPeak.method if message["status"] == "ok" else "")
            running = None
        if process.returncode == 0:
            break
        status, reason = _death(process.returncode, process.stderr)
        if running is None:  # died outside a measurement (at start-up, say): a restart would too
            for case, provider in pending:
                measured = table.setdefault((case.family, case.name, provider), {})
                for mode in case.modes:
                    measured.setdefault(mode, core.MemoryResult("failed", None, reason))
            break
        family, name, provider, mode = running
        crashed = table.setdefault((family, name, provider), {})
        crashed[mode] = core.MemoryResult(status, None, reason)
        case = next(c for c, _ in pending if (c.family, c.name) == (family, name))
        for other in case.modes:  # the same provider's other modes would likely end the same way
            crashed.setdefault(other, core.MemoryResult(status, None, f"not measured: the memory worker "
                                                        f"died on this provider's {mode} run"))
        pending = [(c, p) for c, p in pending if (c.family, c.name, p) not in table]
    return table


if __name__ == "__main__":
    worker(json.load(sys.stdin))
