"""What machine the numbers come from: hardware, library versions, commit, free memory.

Results are filed under a key made of the hardware (CPU model and threads, or GPU name), so
numbers from different machines are never mixed; versions and commit go into every result file.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, Optional

import torch

import fastssl

REPO_ROOT = Path(__file__).resolve().parents[1]
PEER_DISTRIBUTIONS = ("lightly", "pytorch-metric-learning")


def cpu_model() -> str:
    try:
        from fastssl.runtime.native import cpu_model as native_cpu_model  # needs fcntl: POSIX only
    except ImportError:
        return platform.processor() or platform.machine() or "unknown CPU"
    return native_cpu_model()


def _meminfo_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory_bytes(device: torch.device) -> int:
    """Memory free for a new allocation now: CUDA's free bytes, or the kernel's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    available = _meminfo_bytes("MemAvailable")
    if available is None:  # not Linux: the physical memory is the best bound at hand
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return available


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def machine_key(device: torch.device) -> str:
    """A folder name for this machine's results, e.g. ``cpu-intel-r-xeon-r-processor-2t``."""
    name = device_name(device)
    if device.type == "cpu":
        name = f"cpu-{name}-{torch.get_num_threads()}t"
    else:
        name = f"cuda-{name}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> Dict[str, object]:
    """The commit of the checkout the suite runs from, and whether tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown (not a git checkout)", "dirty": None}


def machine_info(device: torch.device) -> Dict[str, object]:
    """Hardware, versions and commit of this run, for the CSV / JSON / report headers."""
    info: Dict[str, object] = {
        "key": machine_key(device),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "logical_cpus": os.cpu_count(),
        "memory_total_bytes": _meminfo_bytes("MemTotal"),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "fastssl": fastssl.__version__,
        "peers": {name: _version(name) for name in PEER_DISTRIBUTIONS},
        "environment": {name: os.environ.get(name) for name in ("TRITON_INTERPRET", "FASTSSL_BACKEND")},
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }
    info.update(git_commit())
    return info
