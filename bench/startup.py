"""Cold start: time and memory of each loss's first call + backward in a fresh process, vs lightly.

    python -m bench.startup [--repeats 5] [--lightly-path DIR] [--json out.json] [--timeout 300]

For every loss that fastssl and lightly 1.6 both have (NTXentLoss, also with a MoCo memory bank,
which covers ``MemoryBankModule``; BarlowTwinsLoss, VICRegLoss, SwaVLoss, NegativeCosineSimilarity,
DINOLoss), each side (``fastssl``, ``lightly.loss``) runs in its own fresh ``python -c``
subprocess, ``--repeats`` times, the sides alternating. Each subprocess:

1. imports torch and warms it up identically on both sides (a tiny matmul + backward, so that
   torch's own first-op start-up is charged to neither), then builds the inputs with seed 0:
   two (128, 128) embeddings; SwAV 2 high- and 4 low-resolution crops of (128, 300) prototype
   scores in [-1, 1]; DINO 2 teacher and 4 student views of (128, 300), ``output_dim=300``, ``epoch=0``;
2. times the import of the library plus building the loss module (``import``), then the first
   forward + backward (``first call``), and reads the growth of VmRSS over both;
3. reports whether ``triton``, ``torch._dynamo`` or ``torch.utils.cpp_extension`` got imported.

The fastssl subprocesses get an empty ``FASTSSL_NATIVE_CACHE`` (no prebuilt native extension is
found, so a build inside the call shows up as time) and no ``TRITON_INTERPRET``; the thread
settings (``OMP_NUM_THREADS``...) are inherited. lightly is imported from ``--lightly-path``
(e.g. a ``pip install --no-deps --target DIR lightly==1.6.0``) or the environment, with
``torchvision`` replaced by an empty stub: lightly's loss modules import it but never use it.

Targets (issue 14): fastssl's first call + backward, and import + first call + backward, at most
lightly's + 50 ms; its RSS growth at most lightly's + 20 MB. The markdown table gives median
(min-max) per side and the difference of medians; rows missing a target are marked, never
asserted: the exit code is 0.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .lightly_import import prepare_lightly_import

# Only the standard library at the top: the subprocesses import this module before torch and the
# library they measure (``bench.machine`` imports fastssl, so it is imported in ``main`` only).
REPO_ROOT = Path(__file__).resolve().parents[1]
SIDES = ("fastssl", "lightly")
WATCHED_MODULES = ("triton", "torch._dynamo", "torch.utils.cpp_extension")
TIME_TARGET_MS = 50.0
MEMORY_TARGET_MB = 20.0
BATCH, EMBEDDING_DIM, PROTOTYPES = 128, 128, 300
RESULT_PREFIX = "STARTUP-RESULT "
CHILD_SCRIPT = "import sys; from bench.startup import measure_first_call; measure_first_call(*sys.argv[1:])"
LIGHTLY_PROBE_SCRIPT = ("import sys; from bench.startup import import_lightly_loss; "
                        "import_lightly_loss(sys.argv[1]); print(sys.modules['lightly'].__version__)")

# The first call's (positional args, keyword args), built in the subprocess after torch is warm.
CallArguments = Tuple[tuple, dict]


def two_embeddings() -> CallArguments:
    import torch
    return (torch.randn(BATCH, EMBEDDING_DIM, requires_grad=True),
            torch.randn(BATCH, EMBEDDING_DIM, requires_grad=True)), {}


def swav_crops() -> CallArguments:
    """Scores in [-1, 1], as SwAV's cosine similarities to normalised prototypes (lightly's
    linear-domain Sinkhorn overflows to NaN on unbounded scores)."""
    import torch

    def crop_scores():
        return torch.empty(BATCH, PROTOTYPES).uniform_(-1, 1).requires_grad_()

    return ([crop_scores() for _ in range(2)], [crop_scores() for _ in range(4)]), {}


def dino_views() -> CallArguments:
    import torch
    teacher = [torch.randn(BATCH, PROTOTYPES) for _ in range(2)]
    student = [torch.randn(BATCH, PROTOTYPES, requires_grad=True) for _ in range(4)]
    return (teacher, student), {"epoch": 0}


@dataclass(frozen=True)
class Case:
    """A loss module, named the same in ``fastssl`` and ``lightly.loss``, and its first call."""

    name: str
    loss_class: str
    constructor_kwargs: Dict[str, object]
    make_arguments: Callable[[], CallArguments]


CASES = (
    Case("NTXentLoss", "NTXentLoss", {"temperature": 0.5}, two_embeddings),
    Case("NTXentLoss (MoCo, bank 4096)", "NTXentLoss",
         {"temperature": 0.5, "memory_bank_size": (4096, EMBEDDING_DIM)}, two_embeddings),
    Case("BarlowTwinsLoss", "BarlowTwinsLoss", {}, two_embeddings),
    Case("VICRegLoss", "VICRegLoss", {}, two_embeddings),
    Case("SwaVLoss", "SwaVLoss", {}, swav_crops),
    Case("NegativeCosineSimilarity", "NegativeCosineSimilarity", {}, two_embeddings),
    Case("DINOLoss", "DINOLoss", {"output_dim": PROTOTYPES}, dino_views),
)
CASES_BY_NAME = {case.name: case for case in CASES}


# ============================================================================================
# In the fresh subprocess
# ============================================================================================
def import_lightly_loss(lightly_path: str) -> types.ModuleType:
    prepare_lightly_import(lightly_path)
    import lightly.loss
    return lightly.loss


def resident_memory_mb() -> float:
    """The process's resident set (VmRSS) now, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmRSS line")


def measure_first_call(side: str, case_name: str, lightly_path: str = "") -> None:
    """The subprocess's work: prints one ``RESULT_PREFIX`` + JSON line of measurements."""
    import torch

    warmup = torch.randn(8, 8, requires_grad=True)
    (warmup @ warmup).sum().backward()
    torch.manual_seed(0)
    case = CASES_BY_NAME[case_name]
    args, kwargs = case.make_arguments()
    if side == "lightly":
        prepare_lightly_import(lightly_path)
    memory_before = resident_memory_mb()

    start = time.perf_counter()
    library = importlib.import_module("fastssl" if side == "fastssl" else "lightly.loss")
    loss_module = getattr(library, case.loss_class)(**case.constructor_kwargs)
    imported = time.perf_counter()
    loss = loss_module(*args, **kwargs)
    loss.backward()
    called = time.perf_counter()

    print(RESULT_PREFIX + json.dumps({
        "import_ms": (imported - start) * 1e3,
        "first_call_ms": (called - imported) * 1e3,
        "total_ms": (called - start) * 1e3,
        "rss_growth_mb": resident_memory_mb() - memory_before,
        "loss": loss.item(),
        "modules": [name for name in WATCHED_MODULES if name in sys.modules],
    }))


# ============================================================================================
# In the parent
# ============================================================================================
def lightly_version_or_reason(lightly_path: str, timeout_s: float) -> Tuple[Optional[str], Optional[str]]:
    """(lightly's version, None) when ``lightly.loss`` imports in a subprocess, else (None, why)."""
    try:
        probe = subprocess.run([sys.executable, "-c", LIGHTLY_PROBE_SCRIPT, lightly_path], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"importing lightly.loss took over {timeout_s:g} s"
    if probe.returncode != 0:
        error_lines = probe.stderr.strip().splitlines() or [f"exit code {probe.returncode}"]
        return None, f"importing lightly.loss failed: {error_lines[-1]}"
    return probe.stdout.strip().splitlines()[-1], None


def run_fresh_process(side: str, case: Case, lightly_path: str, timeout_s: float) -> Dict[str, object]:
    """One measurement in a new interpreter: the child's JSON, or {"error": why}."""
    environment = dict(os.environ)
    environment.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory(prefix="fastssl-native-cache-") as empty_native_cache:
        environment["FASTSSL_NATIVE_CACHE"] = empty_native_cache
        try:
            child = subprocess.run([sys.executable, "-c", CHILD_SCRIPT, side, case.name, lightly_path],
                                   cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                                   timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:g} s"}
    results = [line for line in child.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if child.returncode != 0 or not results:
        error_lines = child.stderr.strip().splitlines() or [f"exit code {child.returncode}"]
        return {"error": error_lines[-1]}
    return json.loads(results[-1][len(RESULT_PREFIX):])


def spread(values: Sequence[float]) -> Dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(case: Case, runs: Dict[str, List[Dict[str, object]]], sides: Sequence[str]) -> Dict[str, object]:
    """Per side: median / min / max of each metric over the successful runs, and the errors."""
    summary: Dict[str, object] = {"loss": case.name}
    for side in sides:
        succeeded = [run for run in runs[side] if "error" not in run]
        summary[side] = {
            "runs": len(runs[side]),
            "errors": [run["error"] for run in runs[side] if "error" in run],
            "modules": sorted({name for run in succeeded for name in run["modules"]}),
            **{metric: spread([run[metric] for run in succeeded]) if succeeded else None
               for metric in ("import_ms", "first_call_ms", "total_ms", "rss_growth_mb")},
        }
    return summary


def cell(statistic: Optional[Dict[str, float]], runs: int) -> str:
    if statistic is None:
        return f"failed ({runs}/{runs})"
    return f"{statistic['median']:.0f} ({statistic['min']:.0f}–{statistic['max']:.0f})"


def difference(summary: Dict[str, object], metric: str, target: float) -> Tuple[str, bool]:
    """The difference of medians, fastssl − lightly, as a cell, and whether it misses ``target``."""
    mine, theirs = summary["fastssl"][metric], summary["lightly"][metric]
    if mine is None or theirs is None:
        return "n/a", True
    delta = mine["median"] - theirs["median"]
    missed = delta > target
    return f"{delta:+.0f}{' ✗' if missed else ''}", missed


def markdown_table(summaries: Sequence[Dict[str, object]], with_lightly: bool) -> str:
    if with_lightly:
        header = ("| loss | fastssl first call+bwd ms | lightly ms | diff ms (≤ +50) "
                  "| fastssl import+call+bwd ms | lightly ms | diff ms (≤ +50) "
                  "| fastssl RSS growth MB | lightly MB | diff MB (≤ +20) | modules imported (fastssl) |")
    else:
        header = ("| loss | fastssl first call+bwd ms | fastssl import+call+bwd ms "
                  "| fastssl RSS growth MB | modules imported (fastssl) |")
    lines = [header, "|" + "---|" * (len(header.split("|")) - 2)]
    for summary in summaries:
        mine = summary["fastssl"]
        modules = ", ".join(mine["modules"]) or "none"
        name = summary["loss"]
        if not with_lightly:
            cells = [name] + [cell(mine[metric], mine["runs"]) for metric in ("first_call_ms", "total_ms",
                                                                               "rss_growth_mb")]
            lines.append("| " + " | ".join(cells + [modules]) + " |")
            continue
        theirs = summary["lightly"]
        cells, missed_any = [], False
        for metric, target in (("first_call_ms", TIME_TARGET_MS), ("total_ms", TIME_TARGET_MS),
                               ("rss_growth_mb", MEMORY_TARGET_MB)):
            delta, missed = difference(summary, metric, target)
            missed_any |= missed
            cells += [cell(mine[metric], mine["runs"]), cell(theirs[metric], theirs["runs"]), delta]
        lines.append("| " + " | ".join([f"✗ {name}" if missed_any else name] + cells + [modules]) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per (loss, side)")
    parser.add_argument("--lightly-path", default="",
                        help="directory holding lightly (pip install --target); default: the environment's")
    parser.add_argument("--json", type=Path, help="also write the runs and the summary here")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed to one subprocess")
    options = parser.parse_args(argv)
    if options.repeats < 1:
        parser.error("--repeats must be at least 1")

    import torch  # here, not at the top: the subprocesses import this module before torch

    from .machine import machine_info
    machine = machine_info(torch.device("cpu"))
    lightly_version, lightly_reason = lightly_version_or_reason(options.lightly_path, options.timeout)
    sides = SIDES if lightly_version else SIDES[:1]
    print(f"# fastssl cold start vs lightly on {machine['cpu_model']} ({machine['cpu_threads']} threads), "
          f"torch {machine['torch']}, fastssl {machine['fastssl']} at {machine['commit'][:12]}"
          f"{' (dirty)' if machine['dirty'] else ''}, "
          + (f"lightly {lightly_version}" if lightly_version else f"lightly unavailable: {lightly_reason}"))
    print(f"# {options.repeats} fresh processes per (loss, side); median (min–max)\n", flush=True)

    runs = {case.name: {side: [] for side in sides} for case in CASES}
    for repeat in range(options.repeats):
        for case in CASES:
            for side in (sides if repeat % 2 == 0 else sides[::-1]):
                run = run_fresh_process(side, case, options.lightly_path, options.timeout)
                runs[case.name][side].append(run)
                outcome = run.get("error") or f"first call {run['first_call_ms']:.0f} ms"
                print(f"  run {repeat + 1}/{options.repeats} {case.name} [{side}]: {outcome}",
                      file=sys.stderr, flush=True)

    summaries = [summarize(case, runs[case.name], sides) for case in CASES]
    print(markdown_table(summaries, with_lightly=len(sides) == 2))
    for summary in summaries:
        for side in sides:
            for error in dict.fromkeys(summary[side]["errors"]):
                print(f"\n{summary['loss']} [{side}] failed: {error}")
    if not lightly_version:
        print(f"\nlightly columns left out: {lightly_reason}")
    if options.json:
        options.json.write_text(json.dumps({
            "machine": machine, "repeats": options.repeats, "lightly_version": lightly_version,
            "lightly_unavailable_reason": lightly_reason, "runs": runs, "summary": summaries,
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
