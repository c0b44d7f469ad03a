"""fastssl against a peer library, side by side: the suite's cases (``bench/bench_<family>.py``),
fastssl (``backend="auto"``) and the peer timed in alternating rounds on the same inputs, so a
shared machine's load changes hit both; the result is the ratio of each round and its spread.

    python -m bench.versus --family spectral --set quick --rounds 7 --out bench/results/<key>/versus-spectral.md

Each round times ``--runs`` training steps (forward + backward; one where a step takes over a
second) of one provider, then of the other (which goes first alternates). Cases a provider cannot
run are listed with the reason. ``--mode forward`` times the forward alone under ``torch.no_grad``
(the fair comparison where the peer's value has no gradient: lightly's CO2); ``--clock process``
times the process's CPU time, which other processes on a shared machine do not inflate (use it with
``--threads 1``: with more, idle OpenMP threads spinning count too).

Robustness on a shared machine: ``--background-load N`` runs N busy processes (one spinning loop
each) during the measurement and ``--repeat R`` measures each case R separate times (fresh inputs
and losses); the table then gives the spread of the runs' median speedups (worst, median, best):

    python -m bench.versus --family clustering --set full --case sinkhorn-b4096 --threads 2 --repeat 5 --background-load 1
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import core, machine, report


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def _steps_ms(fn, args, leaves, runs: int, clock=time.perf_counter, forward_only: bool = False) -> float:
    start = clock()
    for _ in range(runs):
        if forward_only:
            with torch.no_grad():
                fn(*args)
        else:
            core.clear_grads(leaves)
            fn(*args).backward()
    return (clock() - start) / runs * 1e3


def compare(case: core.Case, peer: str, rounds: int, runs: int, clock=time.perf_counter,
            forward_only: bool = False) -> Dict[str, object]:
    """Median ms of each side and the per-round speedups (peer ms / fastssl ms) of one case."""
    args, leaves = core.make_inputs(case, torch.device("cpu"), torch.float32)
    forward_only = forward_only or not case.differentiable  # Sinkhorn: no gradient to time
    sides, warmup_ms = {}, {}
    for name, build in (("fastssl", lambda: case.make_loss("auto")), (peer, case.peers[peer])):
        try:
            sides[name] = build()
            warmup_ms[name] = _steps_ms(sides[name], args, leaves, 1, clock, forward_only)  # a failure: the row's reason
        except Exception as error:  # noqa: BLE001 - the row says why
            failure = core.classify(error, name)
            return {"case": case.name, "status": failure.status, "reason": f"{name}: {failure.reason}"}
    times: Dict[str, List[float]] = {name: [] for name in sides}
    for round_index in range(rounds):
        order = list(sides) if round_index % 2 == 0 else list(sides)[::-1]
        for name in order:  # one step per round where a step takes over a second
            times[name].append(_steps_ms(sides[name], args, leaves, 1 if warmup_ms[name] > 1e3 else runs,
                                         clock, forward_only))
    speedups = [p / f for p, f in zip(times[peer], times["fastssl"])]
    return {"case": case.name, "status": "ok", "fastssl_ms": statistics.median(times["fastssl"]),
            "peer_ms": statistics.median(times[peer]), "speedup": statistics.median(speedups),
            "speedup_min": min(speedups), "speedup_max": max(speedups)}


def repeated(case: core.Case, peer: str, repeats: int, *args) -> Dict[str, object]:
    """:func:`compare` ``repeats`` separate times; the median run's row, with every run's median
    speedup in ``run_speedups`` (the first failure, if any run fails)."""
    runs = []
    for _ in range(repeats):
        runs.append(compare(case, peer, *args))
        if runs[-1]["status"] != "ok":
            return runs[-1]
    runs.sort(key=lambda row: row["speedup"])
    return dict(runs[len(runs) // 2], run_speedups=[row["speedup"] for row in runs])


@contextlib.contextmanager
def background_load(processes: int):
    """``processes`` busy Python loops running for the duration (the load of other jobs on a
    shared machine, made reproducible); stopped, by their handles, on exit."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
            process.wait()


def table(rows: Sequence[Dict[str, object]], peer: str) -> str:
    spread = any("run_speedups" in row for row in rows)
    lines = [f"| case | fastssl ms | {peer} ms | speedup (median [min–max] of rounds) |"
             + (" runs' speedups: worst / median / best |" if spread else ""),
             "|---|---:|---:|---|" + ("---|" if spread else "")]
    for row in rows:
        if row["status"] == "ok":
            runs = sorted(row.get("run_speedups", ()))
            lines.append(f"| {row['case']} | {row['fastssl_ms']:.3g} | {row['peer_ms']:.3g} | "
                         f"**{row['speedup']:.2f}×** [{row['speedup_min']:.2f}–{row['speedup_max']:.2f}] |"
                         + (f" **{runs[0]:.2f}×** / {row['speedup']:.2f}× / {runs[-1]:.2f}× ({len(runs)} runs) |"
                            if runs else ""))
        else:
            lines.append(f"| {row['case']} | – | – | {row['status']}: {row['reason'][:160]} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=core.FAMILIES, required=True)
    parser.add_argument("--set", default="quick", choices=core.SIZE_SETS)
    parser.add_argument("--case", nargs="+", help="only cases whose name contains one of these")
    parser.add_argument("--peer", default="lightly")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--runs", type=int, default=5, help="training steps per provider per round")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--mode", default="step", choices=("step", "forward"),
                        help="step: forward + backward; forward: the forward alone, without gradient")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="wall time, or the process's CPU time (for a shared machine, with --threads 1)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="separate runs of each case; with more than one, the spread of their median speedups")
    parser.add_argument("--background-load", type=int, default=0, metavar="N",
                        help="run N busy processes during the measurement (a shared machine's load)")
    parser.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [case for family in args.family for case in core.family_cases(family, args.set)
             if args.peer in case.peers and (not args.case or any(part in case.name for part in args.case))]
    rows = []
    load_before = os.getloadavg()[0]
    with background_load(args.background_load):
        for case in cases:
            measure = (functools.partial(repeated, case, args.peer, args.repeat) if args.repeat > 1
                       else functools.partial(compare, case, args.peer))
            rows.append(measure(args.rounds, args.runs, CLOCKS[args.clock], args.mode == "forward"))
            print(table(rows[-1:], args.peer).splitlines()[-1], flush=True)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    info = dict(machine.machine_info(torch.device("cpu")),
                matmul_gflops=core.matmul_flops_per_s(torch.device("cpu"), torch.float32, core.SETTINGS["quick"]) / 1e9)
    header = (f"{report.machine_line(info)}; {args.rounds} alternating rounds "
              f"of {args.runs} {'training steps (fwd+bwd; the forward alone without gradient)' if args.mode == 'step' else 'forwards (no gradient)'} each, "
              f"{args.clock} clock, float32"
              + (f"; {args.repeat} separate runs per case" if args.repeat > 1 else "")
              + (f"; {args.background_load} busy background processes" if args.background_load else "")
              + f"; load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
              + f"\n\ncommand: `python -m bench.versus {command}`")
    text = f"{header}\n\n{table(rows, args.peer)}\n"
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
