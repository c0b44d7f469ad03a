"""Size sweep: every loss with a lightly counterpart, rows 128 … 16,384 at its family's usual D, against
lightly 1.6 and the family's plain PyTorch code (fastssl's ``reference`` backend), one thread and all.

    PYTHONPATH=/tmp/lightly_site python -m bench.sweep --family contrastive --sizes 128 256 512 --threads 1

For each (loss, size, thread count) the providers are timed in alternating rounds on the same
inputs (``bench.versus``'s steps: forward + backward, ``--runs`` of them per provider per round,
more where they take under ``--min-round-ms`` together, one where a step takes over a second; the
order rotates every round), so load on a shared machine
hits all of them alike. The ratio of a round is the other provider's time over fastssl's; a cell
is the median of the rounds [min–max]. A provider whose first step exceeds ``--max-step-s`` is
left out of that size and every larger one (the row says so). Writes ``sweep.md``, ``sweep.json``
and one ratio-over-size PNG per family (``bench.plots.plot_ratios``) to
``bench/results/<machine-key>/sweep/`` (``--out``).

Families: contrastive, redundancy, spectral, BYOL; clustering (SwAV with 2+6 crops and its
Sinkhorn-Knopp at K = 3000 prototypes: the Sinkhorn has no gradient, its forward alone is timed);
whitening (W-MSE, Whitening2d; D at most rows / 2, as W-MSE's w_size >= 2D asks); distillation
(DINO with 2+10 crops and iBOT at 65,536 output dims, MSN / PMSN in their own D = 256, K = 1024);
regularizers (KoLeo, DSE). A case whose inputs would exceed ``--max-input-gb`` is not built.

Clocks: ``process`` (CPU time of this process, which other processes do not inflate) at one
thread; with more threads CPU time also counts idle OpenMP threads spinning, so ``auto`` (the
default) times those on the wall clock.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import (bench_byol, bench_clustering, bench_contrastive, bench_redundancy, bench_regularizers, bench_spectral,
               bench_whitening, core, machine, report, versus)

SIZES = tuple(2 ** k for k in range(7, 15))  # 128 … 16,384 rows (per view)
FASTSSL, PLAIN, LIGHTLY = "fastssl", "torch", "lightly"
PROVIDER_NOTES = {FASTSSL: 'fastssl, backend="auto"', PLAIN: "the family's plain PyTorch code "
                  '(fastssl\'s backend="reference")', LIGHTLY: "lightly 1.6"}

# family -> (usual D, (rows, D) -> its sweep cases: the losses that have a lightly counterpart).
# D is the prototypes for clustering (K = 3000) and DINO's / iBOT's output dims for distillation.
FAMILIES: Dict[str, tuple] = {
    "contrastive": (128, lambda n, d: [bench_contrastive.simclr(n, d), bench_contrastive.dcl(n, d),
                                       bench_contrastive.dcl(n, d, weighted=True)]
                    + bench_contrastive.parity_cases(n, d)),
    "redundancy": (8192, lambda n, d: [bench_redundancy.barlow_twins(n, d), bench_redundancy.vicreg(n, d)]),
    "spectral": (8192, bench_spectral.at_size),
    "byol": (256, lambda n, d: [bench_byol.negative_cosine(n, d, "BYOL")]),
    "clustering": (bench_clustering.PROTOTYPES, bench_clustering.at_size),
    "whitening": (128, bench_whitening.at_size),
    "distillation": (bench_clustering.DINO_DIM, bench_clustering.distillation_at_size),
    "regularizers": (128, bench_regularizers.at_size),
}


def sweep_cases(family: str, rows: int, dim: Optional[int] = None, losses: Sequence[str] = ()) -> List[core.Case]:
    """The family's sweep cases at ``rows`` rows and ``dim`` (default: the family's usual D)."""
    usual_dim, build = FAMILIES[family]
    return [case for case in build(rows, dim or usual_dim) if not losses or case.loss in losses]


def case_dim(case: core.Case) -> int:
    """The D of a sweep row: the case's dim, or its prototypes (SwAV, Sinkhorn)."""
    return case.sizes["dim"] if "dim" in case.sizes else case.sizes["prototypes"]


def input_bytes(case: core.Case) -> Optional[int]:
    """The bytes of the case's inputs, built on the meta device (no memory); None where they
    cannot be built there."""
    try:
        args, _ = case.make_inputs(torch.device("meta"), torch.float32)
    except Exception:  # noqa: BLE001 - an input that needs real data: no estimate
        return None
    tensors = [a for a in args if isinstance(a, torch.Tensor)] + [
        t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def providers(case: core.Case) -> Dict[str, Callable[[], Callable]]:
    return {FASTSSL: lambda: case.make_loss("auto"), PLAIN: lambda: case.make_loss("reference"),
            LIGHTLY: case.peers[LIGHTLY]}


def steps_per_round(step_ms: float, runs: int, min_round_ms: float) -> int:
    """``runs`` steps, or as many more as fill ``min_round_ms`` (a round of three 0.4 ms steps is
    within a scheduler tick: its time is noise), one where a step takes over a second."""
    if step_ms > 1e3:
        return 1
    return max(runs, math.ceil(min_round_ms / max(step_ms, 1e-3)))


def alternate(case: core.Case, builders: Dict[str, Callable[[], Callable]], rounds: int, runs: int,
              clock: Callable[[], float], max_step_s: float, min_round_ms: float = 0.0) -> dict:
    """Time every provider of ``builders`` in alternating rounds: {"ms": {provider: median},
    "ratios": {provider: [its ms / fastssl ms per round]}, "skipped": {provider: why}}. Each
    round of a provider runs ``steps_per_round`` steps (from its second step's time: the first
    pays one-time costs)."""
    args, leaves = core.make_inputs(case, torch.device("cpu"), torch.float32)
    forward_only = not case.differentiable  # Sinkhorn: no gradient, the forward is timed
    losses, first_ms, skipped = {}, {}, {}
    for name, build in builders.items():
        try:
            losses[name] = build()
            first_ms[name] = versus._steps_ms(losses[name], args, leaves, 1, clock, forward_only)
        except Exception as error:  # noqa: BLE001 - the row says why
            failure = core.classify(error, name)
            skipped[name] = f"{failure.status}: {failure.reason}"
            losses.pop(name, None)
            continue
        if first_ms[name] > max_step_s * 1e3:
            skipped[name] = f"first step {first_ms[name] / 1e3:.1f} s > --max-step-s {max_step_s:g}"
            del losses[name]
    steps = {name: steps_per_round(first_ms[name] if first_ms[name] > 1e3 else
                                   versus._steps_ms(losses[name], args, leaves, 1, clock, forward_only),
                                   runs, min_round_ms) for name in losses}
    times: Dict[str, List[float]] = {name: [] for name in losses}
    order = list(losses)
    for round_index in range(rounds):
        shift = round_index % max(len(order), 1)
        for name in order[shift:] + order[:shift]:
            times[name].append(versus._steps_ms(losses[name], args, leaves, steps[name], clock, forward_only))
    ratios = ({name: [t / f for t, f in zip(times[name], times[FASTSSL])] for name in times if name != FASTSSL}
              if FASTSSL in times else {})
    return {"ms": {name: statistics.median(t) for name, t in times.items()}, "ratios": ratios, "skipped": skipped}


def run(families: Sequence[str], sizes: Sequence[int], thread_counts: Sequence[int], rounds: int, runs: int,
        clock: str, losses: Sequence[str] = (), dim: Optional[int] = None, max_step_s: float = 10.0,
        max_input_gb: float = 4.0, min_round_ms: float = 0.0) -> List[dict]:
    """One row per (family, loss, size, threads). A provider skipped at a size for its time stays
    skipped at the larger sizes of that loss and thread count; a case whose inputs exceed
    ``max_input_gb`` (DINO's 12 crops × 65,536 dims grow fast) is not built, its row says so."""
    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        clock_name = clock if clock != "auto" else ("process" if threads == 1 else "wall")
        for family in families:
            too_slow: Dict[tuple, str] = {}
            for size in sorted(sizes):
                for case in sweep_cases(family, size, dim, losses):
                    builders = {name: build for name, build in providers(case).items()
                                if (case.loss, name) not in too_slow}
                    size_bytes = input_bytes(case)
                    if size_bytes is not None and size_bytes > max_input_gb * 2 ** 30:
                        why = f"inputs {size_bytes / 2 ** 30:.1f} GiB > --max-input-gb {max_input_gb:g}"
                        result = {"ms": {}, "ratios": {}, "skipped": {name: why for name in builders}}
                    else:
                        result = alternate(case, builders, rounds, runs, versus.CLOCKS[clock_name], max_step_s,
                                           min_round_ms)
                    skipped = dict(result["skipped"])
                    for name, why in skipped.items():
                        if why.startswith("first step"):
                            too_slow[case.loss, name] = f"skipped: slower than --max-step-s at {size} rows"
                    skipped.update({name: too_slow[case.loss, name] for name in providers(case)
                                    if name not in builders})
                    row = {"family": family, "loss": case.loss, "case": case.name, "rows": size,
                           "dim": case_dim(case), "threads": threads, "clock": clock_name,
                           "ms": result["ms"], "skipped": skipped,
                           **{f"ratio_{name}": _spread(ratios) for name, ratios in result["ratios"].items()}}
                    rows.append(row)
                    print(table_lines([row])[-1], flush=True)
    return rows


def _spread(ratios: Sequence[float]) -> dict:
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _ratio_cell(row: dict, provider: str) -> str:
    ratio = row.get(f"ratio_{provider}")
    if ratio is None:
        return "–"
    return f"**{ratio['median']:.2f}×** [{ratio['min']:.2f}–{ratio['max']:.2f}]"


def table_lines(rows: Sequence[dict]) -> List[str]:
    lines = ["| loss | rows | D | threads | fastssl ms | lightly ms | torch ms | × lightly [min–max] | × torch | notes |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for row in rows:
        cells = [f"{row['ms'][p]:.3g}" if p in row["ms"] else "–" for p in (FASTSSL, LIGHTLY, PLAIN)]
        notes = "; ".join(f"{name}: {why[:120]}" for name, why in row["skipped"].items())
        lines.append(f"| {row['loss']} | {row['rows']} | {row['dim']} | {row['threads']} | " + " | ".join(cells)
                     + f" | {_ratio_cell(row, LIGHTLY)} | {_ratio_cell(row, PLAIN)} | {notes} |")
    return lines


def slower_than_lightly(rows: Sequence[dict], bound: float = 1.0) -> List[dict]:
    """The rows where fastssl's median is below ``bound`` × lightly's speed."""
    return [row for row in rows if f"ratio_{LIGHTLY}" in row and row[f"ratio_{LIGHTLY}"]["median"] < bound]


def ratio_grid(rows: Sequence[dict], threads: int) -> List[str]:
    """lightly's time / fastssl's as a (loss, D) × rows table at ``threads``; below 1 in bold."""
    rows = [r for r in rows if r["threads"] == threads]
    sizes = sorted({r["rows"] for r in rows})
    lines = [f"| loss (D), {threads} thread{'s' if threads > 1 else ''} | " + " | ".join(map(str, sizes)) + " |",
             "|---|" + "---:|" * len(sizes)]
    for loss, dim in dict.fromkeys((r["loss"], r["dim"]) for r in rows):
        ratios = {r["rows"]: r[f"ratio_{LIGHTLY}"]["median"] for r in rows
                  if (r["loss"], r["dim"]) == (loss, dim) and f"ratio_{LIGHTLY}" in r}
        cells = [("–" if size not in ratios else f"**{ratios[size]:.2f}**" if ratios[size] < 1 else f"{ratios[size]:.3g}")
                 for size in sizes]
        lines.append(f"| {loss} ({dim}) | " + " | ".join(cells) + " |")
    return lines


def markdown(rows: Sequence[dict], header: str, plot_paths: Sequence[Path]) -> str:
    slow = slower_than_lightly(rows)
    worst = ("every measured size is at least as fast as lightly" if not slow else
             "slower than lightly: " + ", ".join(f"{r['loss']} rows={r['rows']} threads={r['threads']} "
                                               f"{r[f'ratio_{LIGHTLY}']['median']:.2f}×" for r in slow))
    plots_text = "\n".join(f"![{path.stem}]({path.name})" for path in plot_paths)
    return (f"{header}\n\nProviders: " + "; ".join(f"{k} = {v}" for k, v in PROVIDER_NOTES.items())
            + f". Ratios: provider ms / fastssl ms (above 1: fastssl is faster).\n\n{worst}\n\n"
            + "".join("\n".join(ratio_grid(rows, threads)) + "\n\n" for threads in sorted({r["threads"] for r in rows}))
            + "\n".join(table_lines(rows)) + f"\n\n{plots_text}\n")


def write_result(out: Path, stem: str, text: str, payload: dict) -> None:
    """``<out>/<stem>.md`` (``text``, also printed) and ``<out>/<stem>.json`` (``payload``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    print("\n" + text)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", choices=tuple(FAMILIES), default=tuple(FAMILIES))
    parser.add_argument("--loss", nargs="+", default=(), help="only these losses (e.g. nt_xent barlow_twins)")
    parser.add_argument("--sizes", nargs="+", type=int, default=SIZES, help="rows per view")
    parser.add_argument("--dim", type=int, help="D for every family (default: each family's usual D)")
    parser.add_argument("--threads", nargs="+", type=int, default=(1, torch.get_num_threads()))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5, help="training steps per provider per round")
    parser.add_argument("--clock", default="auto", choices=("auto",) + tuple(versus.CLOCKS),
                        help="auto: process CPU time at one thread, wall time with more")
    parser.add_argument("--max-step-s", type=float, default=10.0,
                        help="leave out a provider whose first step takes longer (and its larger sizes)")
    parser.add_argument("--min-round-ms", type=float, default=100.0,
                        help="a provider's round runs at least --runs steps and as many as take this long")
    parser.add_argument("--max-input-gb", type=float, default=4.0,
                        help="leave out a case whose inputs take more memory (GiB)")
    parser.add_argument("--out", type=Path, help="folder for sweep.md / sweep.json / PNGs "
                        "(default bench/results/<machine-key>/sweep)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--summary", type=Path, nargs="+", help="print the ratio tables of saved sweep.json files")
    args = parser.parse_args(argv)
    if args.summary:
        rows = [row for path in args.summary for row in json.loads(path.read_text())["rows"]]
        for threads in sorted({r["threads"] for r in rows}):
            print("\n".join(ratio_grid(rows, threads)) + "\n")
        return
    cpu = torch.device("cpu")
    info = machine.machine_info(cpu)  # before any set_num_threads: the key names all threads
    info["matmul_gflops"] = core.matmul_flops_per_s(cpu, torch.float32, core.SETTINGS["quick"]) / 1e9
    out = args.out or report.RESULTS_DIR / info["key"] / "sweep"
    started = time.perf_counter()
    rows = run(args.family, args.sizes, sorted(set(args.threads)), args.rounds, args.runs, args.clock,
               args.loss, args.dim, args.max_step_s, args.max_input_gb, args.min_round_ms)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"{report.machine_line(info)}; fwd+bwd float32, {args.rounds} alternating rounds of {args.runs} "
              f"steps per provider (more where they take under {args.min_round_ms:g} ms), clock {args.clock}; "
              f"{time.perf_counter() - started:.0f} s\n\n"
              f"command: `python -m bench.sweep {command}`")
    out.mkdir(parents=True, exist_ok=True)
    plot_paths: List[Path] = []
    if not args.no_plot:
        from .plots import plot_ratios

        plot_paths, notes = plot_ratios(rows, out, info["device_name"], LIGHTLY)
        for note in notes:
            print(note)
    write_result(out, "sweep", markdown(rows, header, plot_paths), {"machine": info, "command": command, "rows": rows})


if __name__ == "__main__":
    main()
