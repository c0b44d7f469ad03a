"""How close the fused losses are to their GEMMs: a training step against the GEMMs it cannot avoid,
timed in alternating rounds of the same run, and its peak memory growth against lightly's.

    PYTHONPATH=/tmp/lightly_site python -m bench.floor --rounds 3

* NT-Xent, batch 8192, D = 128 (R = 16,384 rows): against the three R×R×D GEMMs of an
  unfused step (S = Z Zᵀ, and backward G Z and Gᵀ Z). fastssl's blocked algorithm does fewer
  FLOPs (half of S forward, half again to recompute it, one product (G + Gᵀ) Z: 4R²D instead of
  6R²D), so below 1× is possible.
* Barlow Twins and VICReg at N = 256, D = 8192 (the Gram path): against their four N×N×D GEMMs
  (each view's Gram Z Zᵀ forward, and a Gram times the other operand backward).

Peak memory: ``bench.memory``'s fresh-process RSS growth of one step (the second of two, so
imports and first-call caches are not charged), fastssl's torch backend and lightly.
Writes ``floor.md`` / ``floor.json`` to ``bench/results/<machine-key>/`` (``--out``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from . import bench_contrastive, bench_redundancy, core, machine, memory, report, sweep, versus

MIB = 2 ** 20


def gemms(shapes: Sequence[Tuple[int, int, int]]):
    """A callable running one (m×k)·(k×n) ``torch.mm`` per shape on random float32 operands
    made once (so only the GEMMs are timed)."""
    operands = [(torch.randn(m, k), torch.randn(k, n)) for m, k, n in shapes]

    def run():
        for a, b in operands:
            torch.mm(a, b)
        return torch.zeros(())  # versus' forward-only step ignores it

    return run


def floor_ratio(case: core.Case, shapes: Sequence[Tuple[int, int, int]], rounds: int, runs: int = 1) -> dict:
    """Median over alternating rounds of (fastssl fwd+bwd time) / (the GEMMs' time), process clock."""
    args, leaves = core.make_inputs(case, torch.device("cpu"), torch.float32)
    loss, floor = case.make_loss("auto"), gemms(shapes)
    clock = time.process_time
    versus._steps_ms(loss, args, leaves, 1, clock)  # warm-up: workspaces, first-call caches
    versus._steps_ms(floor, (), [], 1, clock, forward_only=True)
    step_ms, gemm_ms = [], []
    for round_index in range(rounds):
        timed = [lambda: step_ms.append(versus._steps_ms(loss, args, leaves, runs, clock)),
                 lambda: gemm_ms.append(versus._steps_ms(floor, (), [], runs, clock, forward_only=True))]
        for measure in timed if round_index % 2 == 0 else timed[::-1]:
            measure()
    ratios = [s / g for s, g in zip(step_ms, gemm_ms)]
    return {"case": case.name, "gemms": [list(s) for s in shapes], "step_ms": statistics.median(step_ms),
            "gemm_ms": statistics.median(gemm_ms), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def memory_growth(case: core.Case, size_set: str) -> dict:
    """Peak fwd+bwd RSS growth (bytes) of fastssl's torch backend and lightly, and their ratio."""
    table = memory.cpu_peak_memory([case], size_set, torch.float32, core.Settings(), providers=["torch", "lightly"])
    peaks = {provider: table[case.family, case.name, provider]["fwd+bwd"] for provider in ("torch", "lightly")}
    row = {"case": case.name, **{f"{p}_bytes": m.peak_bytes for p, m in peaks.items()},
           **{f"{p}_status": f"{m.status} {m.reason}".strip() for p, m in peaks.items()}}
    if all(m.peak_bytes for m in peaks.values()):
        row["fraction_of_lightly"] = peaks["torch"].peak_bytes / peaks["lightly"].peak_bytes
    return row


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--out", type=Path, help="folder (default bench/results/<machine-key>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    info = machine.machine_info(torch.device("cpu"))
    info["matmul_gflops"] = core.matmul_flops_per_s(torch.device("cpu"), torch.float32, core.SETTINGS["quick"]) / 1e9
    rows = 2 * 8192
    simclr = bench_contrastive.simclr(8192, 128)
    n, d = 256, 8192
    gram_gemms = [(n, d, n), (n, d, n), (n, n, d), (n, n, d)]
    timings: List[dict] = [floor_ratio(simclr, [(rows, 128, rows), (rows, rows, 128), (rows, rows, 128)], args.rounds)]
    timings += [floor_ratio(case, gram_gemms, args.rounds, runs=5)
                for case in (bench_redundancy.barlow_twins(n, d), bench_redundancy.vicreg(n, d))]
    lines = ["| case | fastssl fwd+bwd ms | its GEMMs ms | ratio (median [min–max]) | GEMMs (m, k, n) |",
             "|---|---:|---:|---|---|"]
    for t in timings:
        lines.append(f"| {t['case']} | {t['step_ms']:.4g} | {t['gemm_ms']:.4g} | **{t['ratio']:.2f}×** "
                     f"[{t['ratio_min']:.2f}–{t['ratio_max']:.2f}] | {', '.join(map(str, map(tuple, t['gemms'])))} |")
        print(lines[-1], flush=True)
    grown = [] if args.no_memory else [memory_growth(simclr, "full")]
    if grown:
        lines += ["", "| case | fastssl (torch) peak growth MiB | lightly MiB | fastssl / lightly |", "|---|---:|---:|---:|"]
        for g in grown:
            mib = [f"{g[k] / MIB:.1f}" if g.get(k) is not None else g[k.replace('bytes', 'status')]
                   for k in ("torch_bytes", "lightly_bytes")]
            lines.append(f"| {g['case']} | {mib[0]} | {mib[1]} | {g.get('fraction_of_lightly', float('nan')):.4f} |")
    command = " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"{report.machine_line(info)}; process clock, 1 thread, float32\n\ncommand: `python -m bench.floor "
            f"{command}`\n\n" + "\n".join(lines) + "\n")
    sweep.write_result(args.out or report.RESULTS_DIR / info["key"], "floor", text,
                       {"machine": info, "command": command, "timings": timings, "memory": grown})


if __name__ == "__main__":
    main()
