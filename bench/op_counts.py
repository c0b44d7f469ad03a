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


def _step(fn: Callable, args: tuple, leaves: Sequence[torch.Tensor]) -> None:
    core.clear_grads(leaves)
    fn(*args).backward()


def aten_ops(fn: Callable, args: tuple, leaves: Sequence[torch.Tensor]) -> collections.Counter:
    """{aten op name: calls} of one forward + backward of ``fn(*args)``, after one warm-up step."""
    _step(fn, args, leaves)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        _step(fn, args, leaves)
    counts: collections.Counter = collections.Counter()
    for event in profiler.events():
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            counts[event.name] += 1
    return counts


def count_case(case: core.Case, providers: Dict[str, Callable[[], Callable]]) -> dict:
    """{"ops": {provider: total}, "top": {provider: its most called ops}, "skipped": {provider: why}}."""
    args, leaves = core.make_inputs(case, torch.device("cpu"), torch.float32)
    result: dict = {"ops": {}, "top": {}, "skipped": {}}
    for name, build in providers.items():
        try:
            counts = aten_ops(build(), args, leaves)
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
                row = {"family": family, "loss": case.loss, "rows": size, "dim": case.sizes["dim"],
                       **count_case(case, providers)}
                rows.append(row)
                print(table_lines([row])[-1], flush=True)
    return rows


def table_lines(rows: Sequence[dict]) -> List[str]:
    lines = ["| loss | rows | D | fastssl aten ops | lightly aten ops | fastssl / lightly | fastssl's most called |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        ours, theirs = row["ops"].get(sweep.FASTSSL), row["ops"].get(sweep.LIGHTLY)
        ratio = f"{ours / theirs:.2f}" if ours is not None and theirs else "–"
        top = ", ".join(f"{name[6:]} {calls}" for name, calls in row["top"].get(sweep.FASTSSL, {}).items())
        lines.append(f"| {row['loss']} | {row['rows']} | {row['dim']} | {ours if ours is not None else '–'} | "
                     f"{theirs if theirs is not None else row['skipped'].get(sweep.LIGHTLY, '–')[:80]} | {ratio} | {top} |")
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
