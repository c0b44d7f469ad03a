"""``python -m bench.report``: run the benchmark cases and write CSV, JSON, markdown and plots.

    python -m bench.report --quick                # minutes on a CPU: the quick set
    python -m bench.report --full                 # the papers' sizes (meant for a GPU)
    python -m bench.report --family contrastive --provider torch lightly --case simclr
    python -m bench.report --summary bench/results/<key>/quick/results.json   # README table

Every loss, every provider (fastssl backend, or peer library when installed) and every mode;
CPU peaks come from a fresh process per case (``bench.memory``), CUDA peaks from torch's
allocator. Results go to ``bench/results/<machine-key>/<size-set>/``: ``results.csv``,
``results.json`` (rows and machine info), ``report.md`` and one PNG per scaling curve.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import core, machine, plots
from .memory import cpu_peak_memory

RESULTS_DIR = machine.REPO_ROOT / "bench" / "results"
MIB = 2 ** 20
# tensors as fastssl.runtime.registry.describe lists them: "torch.float32 (8, 16) on cuda:0, ..."
TENSOR_DESCRIPTION = re.compile(r"torch\.\w+ \([\d, ]*\) on \w+(?::\d+)?(?:, torch\.\w+ \([\d, ]*\) on \w+(?::\d+)?)*")


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def _milliseconds(row: dict) -> str:
    return f"{row['median_ms']:.3g} ms [{row['q25_ms']:.3g}–{row['q75_ms']:.3g}]"


def _mib(nbytes: Optional[int]) -> str:
    return "–" if nbytes is None else f"{nbytes / MIB:.3g}"


def _print_provider(rows: Sequence[dict]) -> None:
    """One provider's line of the progress log; every reason a mode did not run goes below it."""
    measured = [r for r in rows if r["status"] == "ok"]
    lines = []
    if measured:
        lines.append("  ".join(f"{r['mode']} {_milliseconds(r)}" for r in measured)
                     + "   peak MiB " + "/".join(_mib(r["peak_memory_bytes"]) for r in measured))
    lines += dict.fromkeys(r["reason"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"
                           for r in rows if r["status"] != "ok" or r["reason"])
    print(f"    {rows[0]['provider']:<23} " + f"\n    {'':<23} ".join(lines), flush=True)


def run(device: torch.device, dtype: torch.dtype, size_set: str, cases: Sequence[core.Case],
        settings: core.Settings, providers: Optional[Sequence[str]] = None, memory_process: str = "case",
        command: str = "") -> dict:
    """Measure ``cases`` on ``device``: {"machine": info, "size_set", "settings", "rows": [...]}.

    ``providers``: only these (default: all of each case). ``memory_process`` (CPU): "case" runs
    the peak-memory worker in a fresh process per case; "run" in one fresh process for all cases,
    as the quick set does: the start-up (seconds on a loaded machine) would dominate it, and on
    the development machine both gave the same peaks within 0.35 MiB over all 142 quick-set
    numbers of the reference and torch backends. ``command``: how this run was started.
    """
    info = machine.machine_info(device)
    info["matmul_gflops"] = core.matmul_flops_per_s(device, dtype, settings) / 1e9
    info["memory_process"] = memory_process if device.type == "cpu" else None
    info["command"] = command
    print(f"{machine_line(info)}; {size_set} set, {str(dtype).replace('torch.', '')}", flush=True)
    memory: dict = {}
    if device.type == "cpu" and memory_process == "run":
        print(f"  peak memory of {len(cases)} cases in a fresh process", flush=True)
        memory = cpu_peak_memory(cases, size_set, dtype, settings, providers)
    rows: List[dict] = []
    for case in cases:
        chosen = [p for p in case.providers if not providers or p in providers]
        print(f"  {case.family} {case.name}", flush=True)
        if device.type == "cpu" and memory_process == "case":
            memory.update(cpu_peak_memory([case], size_set, dtype, settings, chosen))
        inputs = core.make_inputs(case, device, dtype)
        for provider in chosen:
            provider_rows = core.as_dicts(core.measure(
                case, provider, case.modes, device, dtype, settings, inputs, core.default_timer(device, settings),
                memory.get((case.family, case.name, provider)), info["matmul_gflops"] * 1e9))
            _print_provider(provider_rows)
            rows += provider_rows
        del inputs
    return {"machine": info, "size_set": size_set, "settings": dataclasses.asdict(settings), "rows": rows}


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------
def write_csv(rows: Sequence[dict], path: Path) -> None:
    """One line per row; sizes spread over ``size_<key>`` columns, series joined with "; "."""
    size_keys = sorted({key for row in rows for key in row["sizes"]})
    fields = [f for f in rows[0] if f not in ("sizes", "series")] if rows else []
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields[:3] + [f"size_{k}" for k in size_keys] + fields[3:]
                                + ["series"])
        writer.writeheader()
        for row in rows:
            flat = {f: row[f] for f in fields}
            flat.update({f"size_{k}": v for k, v in row["sizes"].items()})
            flat["series"] = "; ".join(f"{title} (vs {x})" for title, x in row["series"])
            writer.writerow(flat)


def _provider_order(rows: Sequence[dict]) -> List[str]:
    names = dict.fromkeys(r["provider"] for r in rows)
    return [p for p in core.FASTSSL_PROVIDERS if p in names] + [p for p in names if p not in core.FASTSSL_PROVIDERS]


def _cases(rows: Sequence[dict]) -> Dict[str, List[dict]]:
    grouped: Dict[str, List[dict]] = {}
    for row in rows:
        grouped.setdefault(row["case"], []).append(row)
    return grouped


def _sizes(row: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in row["sizes"].items())


def summary_table(result: dict) -> str:
    """Markdown: per case, each provider's time and peak memory for a training step (fwd+bwd;
    fwd for Sinkhorn), with the GEMM floor. Only providers that ran somewhere get a column."""
    rows = result["rows"]
    providers = _provider_order([r for r in rows if r["status"] == "ok"])
    lines = ["| loss | sizes | mode | " + " | ".join(f"{p} ms · MiB" for p in providers) + " | GEMM floor ms |",
             "|---|---|---|" + "---:|" * (len(providers) + 1)]
    for members in _cases(rows).values():
        mode = plots.main_mode(members)
        cells = []
        for provider in providers:
            found = [r for r in members if r["provider"] == provider and r["mode"] == mode]
            if found and found[0]["status"] == "ok":
                cells.append(f"{found[0]['median_ms']:.3g} · {_mib(found[0]['peak_memory_bytes'])}")
            else:
                cells.append(found[0]["status"] if found else "")
        floor = next((r["gemm_floor_ms"] for r in members
                      if r["mode"] == mode and r["gemm_floor_ms"] is not None), None)
        lines.append(f"| {members[0]['loss']} | {_sizes(members[0])} | {mode} | " + " | ".join(cells)
                     + f" | {'' if floor is None else f'{floor:.3g}'} |")
    return "\n".join(lines)


def machine_line(info: dict) -> str:
    """Hardware, versions, commit, date and matmul rate of a run, in one line."""
    gpu = f", {info['gpu_name']}" if info["gpu_name"] else ""
    threads = f"{info['cpu_threads']} torch thread{'' if info['cpu_threads'] == 1 else 's'}"
    return (f"{info['cpu_model']} ({threads}){gpu}; torch {info['torch']}, triton "
            f"{info['triton']}; fastssl {info['fastssl']} at commit {str(info['commit'])[:10]}"
            f"{' + local changes' if info['dirty'] else ''}; {info['date_utc']} UTC; "
            f"measured matmul rate {info['matmul_gflops']:.1f} GFLOP/s")


def markdown_report(result: dict, plot_paths: Sequence[Path], notes: Sequence[str]) -> str:
    rows, info = result["rows"], result["machine"]
    settings = result["settings"]
    out = [f"# fastssl benchmarks: {result['size_set']} set on {info['device_name']} ({info['device']})", "",
           f"- machine: {machine_line(result['machine'])}",
           f"- command: `{info['command'] or 'bench.report.run(...)'}`",
           f"- timing: median [25th–75th percentile]; CPU: {settings['min_runs']}–{settings['max_runs']} runs "
           f"(fewer than the most once {settings['budget_s']} s is spent) after {settings['warmup_runs']} "
           f"warm-up run(s), clock `{settings['cpu_clock']}` "
           f"({'CPU time of the process' if settings['cpu_clock'] == 'process' else 'wall time'}); "
           "CUDA: `triton.testing.do_bench` (CUDA events)",
           "- memory: peak above the inputs (for bwd: above the inputs and the forward's graph); CPU: peak RSS "
           f"growth in a fresh process {'per case' if info.get('memory_process') == 'case' else 'for the run'}; "
           "CUDA: `torch.cuda.max_memory_allocated`",
           "- GEMM floor: FLOPs of the GEMMs an exact algorithm must do ÷ the measured matmul rate", "",
           "## Summary: a training step (fwd+bwd; fwd where there is no gradient), median ms · peak MiB", "",
           summary_table(result), ""]
    providers = _provider_order(rows)
    for family in core.FAMILIES:
        family_rows = [r for r in rows if r["family"] == family]
        if not family_rows:
            continue
        out += [f"## {family}", "",
                "| case | provider | fwd ms | bwd ms | fwd+bwd ms | peak MiB fwd / bwd / fwd+bwd "
                "| GEMM floor ms fwd+bwd |",
                "|---|---|---|---|---|---|---:|"]
        for name, members in _cases(family_rows).items():
            for provider in providers:
                mine = {r["mode"]: r for r in members if r["provider"] == provider}
                if not any(r["status"] == "ok" for r in mine.values()):
                    continue
                times = [_milliseconds(mine[m]) if m in mine and mine[m]["status"] == "ok"
                         else (mine[m]["status"] if m in mine else "–") for m in core.MODES]
                peaks = " / ".join(_mib(mine[m]["peak_memory_bytes"]) if m in mine else "–" for m in core.MODES)
                floor = mine.get(plots.main_mode(members), {}).get("gemm_floor_ms")
                out.append(f"| {name} | {provider} | " + " | ".join(times) + f" | {peaks} | "
                           + ("" if floor is None else f"{floor:.3g}") + " |")
        out.append("")
    not_run: Dict[tuple, List[str]] = {}
    for row in rows:
        if row["status"] != "ok" or row["reason"]:
            reason = TENSOR_DESCRIPTION.sub("…", row["reason"])  # one line for all the shapes of a reason
            cases = not_run.setdefault((row["provider"], row["status"], reason), [])
            if row["case"] not in cases:
                cases.append(row["case"])
    if not_run:
        out += ["## Not run, or not measured in full", "",
                "| provider | status | reason | cases |", "|---|---|---|---|"]
        for (provider, status, reason), cases in not_run.items():
            out.append(f"| {provider} | {status} | {reason.replace('|', '/')} | {', '.join(cases)} |")
        out.append("")
    if plot_paths or notes:
        out += ["## Scaling curves", ""] + [f"- {n}" for n in notes]
        out += [f"![{p.stem}]({p.name})" for p in plot_paths]
        out.append("")
    return "\n".join(out)


def write_results(result: dict, out_dir: Path, make_plots: bool = True) -> List[Path]:
    """Write results.csv, results.json, the PNGs and report.md into ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("*.png"):  # curves of a series no longer measured must not linger
        stale.unlink()
    write_csv(result["rows"], out_dir / "results.csv")
    (out_dir / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_paths, notes = (plots.plot_curves(result["rows"], out_dir, result["machine"]["device_name"])
                         if make_plots else ([], ["plots not requested (--no-plots)"]))
    for note in notes:
        print(note)
    (out_dir / "report.md").write_text(markdown_report(result, plot_paths, notes))
    return [out_dir / n for n in ("results.csv", "results.json", "report.md")] + list(plot_paths)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", dest="size_set", action="store_const", const="quick",
                       help="small sizes: a couple of minutes on 2 CPU cores (default without CUDA)")
    sizes.add_argument("--full", dest="size_set", action="store_const", const="full",
                       help="the papers' sizes (default with CUDA)")
    sizes.add_argument("--smoke", dest="size_set", action="store_const", const="smoke", help="tiny sizes")
    parser.add_argument("--device", nargs="+", choices=("cpu", "cuda"),
                        help="devices to run on, each into its own results folder "
                             "(default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    parser.add_argument("--family", nargs="+", choices=core.FAMILIES, default=list(core.FAMILIES))
    parser.add_argument("--provider", nargs="+", help="only these providers (backends or peers)")
    parser.add_argument("--case", nargs="+", help="only cases whose name contains one of these")
    parser.add_argument("--out", type=Path, help="results folder (default: bench/results/<machine-key>/<size-set>)")
    parser.add_argument("--memory-process", choices=("case", "run"),
                        help="CPU peak memory in a fresh process per case, or one for the whole run "
                             "(default: case for --full, run otherwise)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cpu-clock", choices=("wall", "process"), default="wall",
                        help="CPU timing clock: wall time, or the process's CPU time (robust on a shared "
                             "machine; use with --threads 1)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--summary", type=Path, metavar="RESULTS_JSON",
                        help="print the summary table of a results.json (for the README) and exit")
    args = parser.parse_args(argv)
    if args.summary:
        result = json.loads(args.summary.read_text())
        print(f"{machine_line(result['machine'])}; {result['size_set']} set\n\n{summary_table(result)}")
        return
    devices = [torch.device(d) for d in (args.device or ["cuda" if torch.cuda.is_available() else "cpu"])]
    if any(d.type == "cuda" for d in devices) and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    for device in devices:
        size_set = args.size_set or ("full" if device.type == "cuda" else "quick")
        cases = [case for family in args.family for case in core.family_cases(family, size_set)
                 if not args.case or any(part in case.name for part in args.case)]
        settings = dataclasses.replace(core.SETTINGS[size_set], cpu_clock=args.cpu_clock)
        command = "python -m bench.report " + " ".join(argv if argv is not None else sys.argv[1:])
        result = run(device, getattr(torch, args.dtype), size_set, cases, settings, args.provider,
                     args.memory_process or ("case" if size_set == "full" else "run"), command)
        out_dir = args.out or RESULTS_DIR / result["machine"]["key"] / size_set
        for path in write_results(result, out_dir, not args.no_plots):
            print(f"wrote {path.relative_to(machine.REPO_ROOT) if path.is_relative_to(machine.REPO_ROOT) else path}")


if __name__ == "__main__":
    main()
