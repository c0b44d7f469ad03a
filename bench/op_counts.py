"""Per-call overhead: the aten ops one training step of a loss dispatches (forward + backward), fastssl
beside lightly 1.6, for the losses of ``bench.sweep`` at a small and a large size.

    PYTHONPATH=/tmp/lightly_site python -m bench.op_counts --sizes 128 1024

An op is counted once where it is called from Python or from inside a fastssl op (the profiler's
``aten::`` events without an ``aten::`` ancestor): the ops that an aten op calls itself (``linear``
→ ``mm``) are its own business and not counted again. Views (``view``, ``t``, ``as_strided``)
count: each is a dispatch too. The step is profiled once after one warm-up step (first-call
caches excluded); the counts depend on shapes and code paths only, not on the CPU or its ISA
(``tests/benchmarks/test_op_counts.py`` pins those of the fused paths). Writes ``op_counts.md``
and ``op_counts.json`` to ``bench/results/<machine-key>/`` (``--out``).

On a CUDA device the unit is the kernel launch instead (:func:`device_kernels`: the profiler's
device-side events, Triton's included; ``bench.gpu_check``'s launch-count section): a launch
costs microseconds on a card whatever the aten op that made it.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from . import core, machine, report, sweep


def _step(fn: Callable, args: tuple, leaves: Sequence[torch.Tensor], forward_only: bool = False) -> None:
    core.clear_grads(leaves)
    loss = fn(*args)
    if not forward_only:  # Sinkhorn-Knopp's codes have no gradient
        loss.backward()


def _profiled(fn: Callable, args: tuple, leaves: Sequence[torch.Tensor], device: torch.device,
              forward_only: bool) -> profile:
    """The profiler of one step of ``fn(*args)`` on ``device`` after one warm-up step (first-call
    caches, compiles and autotuning excluded)."""
    _step(fn, args, leaves, forward_only)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        _step(fn, args, leaves, forward_only)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # every launch of the step is on the record
    return profiler


def aten_ops(fn: Callable, args: tuple, leaves: Sequence[torch.Tensor], forward_only: bool = False
             ) -> collections.Counter:
    """{aten op name: calls} of one step (forward + backward) of ``fn(*args)``, after one warm-up step."""
    counts: collections.Counter = collections.Counter()
    for event in _profiled(fn, args, leaves, torch.device("cpu"), forward_only).events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts


def device_kernels(fn: Callable, args: tuple, leaves: Sequence[torch.Tensor], device: torch.device,
                   forward_only: bool = False) -> collections.Counter:
    """{kernel name: launches} of one step of ``fn(*args)`` on a CUDA ``device``: the profiler's
    device-side events (cuBLAS, aten's and Triton's kernels; copies and memsets under their own
    "Memcpy …" / "Memset …" names), after one warm-up step."""
    events = _profiled(fn, args, leaves, device, forward_only).events()
    return collections.Counter(e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA)


def launches(fn: Callable, args: tuple, leaves: Sequence[torch.Tensor], device: torch.device,
             forward_only: bool = False) -> collections.Counter:
    """The per-call overhead of one step in the device's unit: kernel launches on CUDA
    (:func:`device_kernels`), aten ops elsewhere (:func:`aten_ops`)."""
    if device.type == "cuda":
        return device_kernels(fn, args, leaves, device, forward_only)
    return aten_ops(fn, args, leaves, forward_only)


def unit(device: torch.device) -> str:
    return "kernel launches" if device.type == "cuda" else "aten ops"


def count_case(case: core.Case, providers: Dict[str, Callable[[], Callable]],
               device: torch.device = torch.device("cpu")) -> dict:
    """{"ops": {provider: total}, "top": {provider: its most called ops}, "skipped": {provider: why}}
    in ``unit(device)``."""
    args, leaves = core.make_inputs(case, device, torch.float32)
    result: dict = {"ops": {}, "top": {}, "skipped": {}}
    for name, build in providers.items():
        try:
            counts = launches(build(), args, leaves, device, forward_only=not case.differentiable)
        except Exception as error:  # noqa: BLE001 - the row says why
            failure = core.classify(error, name)
            result["skipped"][name] = f"{failure.status}: {failure.reason}"
            continue
        result["ops"][name] = sum(counts.values())
        result["top"][name] = dict(counts.most_common(5))
    return result


def run(families: Sequence[str], sizes: Sequence[int], losses: Sequence[str] = (), dim: Optional[int] = None
        ) -> List[dict]:
    rows = []
    for family in families:
        for size in sizes:
            for case in sweep.sweep_cases(family, size, dim, losses):
                providers = {name: build for name, build in sweep.providers(case).items() if name != sweep.PLAIN}
                row = {"family": family, "loss": case.loss, "rows": size, "dim": sweep.case_dim(case),
                       **count_case(case, providers)}
                rows.append(row)
                print(table_lines([row])[-1], flush=True)
    return rows


def _short(name: str) -> str:
    """An op or kernel name for a table cell: aten's without its namespace, a kernel's cut short."""
    return name[len("aten::"):] if name.startswith("aten::") else name[:48]


def table_lines(rows: Sequence[dict], counted: str = "aten ops", providers: Sequence[str] = (sweep.FASTSSL, sweep.LIGHTLY)
                ) -> List[str]:
    """A markdown table of ``count_case`` rows: one column of ``counted`` per provider, the ratio
    fastssl / lightly and fastssl's most called ops (or kernels)."""
    lines = ["| loss | rows | D | " + " | ".join(f"{name} {counted}" for name in providers)
             + " | fastssl / lightly | fastssl's most called |",
             "|---|---:|---:|" + "---:|" * len(providers) + "---:|---|"]
    for row in rows:
        ours, theirs = row["ops"].get(sweep.FASTSSL), row["ops"].get(sweep.LIGHTLY)
        ratio = f"{ours / theirs:.2f}" if ours is not None and theirs else "–"
        cells = [str(row["ops"][name]) if name in row["ops"] else row["skipped"].get(name, "–")[:80]
                 for name in providers]
        top = ", ".join(f"{_short(name)} {calls}" for name, calls in row["top"].get(sweep.FASTSSL, {}).items())
        lines.append(f"| {row['loss']} | {row['rows']} | {row['dim']} | " + " | ".join(cells) + f" | {ratio} | {top} |")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=tuple(sweep.FAMILIES), default=tuple(sweep.FAMILIES))
    parser.add_argument("--loss", nargs="+", default=())
    parser.add_argument("--sizes", nargs="+", type=int, default=(128, 1024), help="rows per view")
    parser.add_argument("--dim", type=int, help="D for every family (default: each family's usual D)")
    parser.add_argument("--out", type=Path, help="folder (default bench/results/<machine-key>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = machine.machine_info(torch.device("cpu"))
    info["matmul_gflops"] = core.matmul_flops_per_s(torch.device("cpu"), torch.float32, core.SETTINGS["smoke"]) / 1e9
    rows = run(args.family, args.sizes, args.loss, args.dim)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"{report.machine_line(info)}\n\ncommand: `python -m bench.op_counts {command}`\n\n"
            "aten ops dispatched by one training step (forward + backward), fastssl (backend=\"auto\") and "
            "lightly 1.6 on the same inputs\n\n" + "\n".join(table_lines(rows)) + "\n")
    sweep.write_result(args.out or report.RESULTS_DIR / info["key"], "op_counts", text,
                       {"machine": info, "command": command, "rows": rows})


if __name__ == "__main__":
    main()
