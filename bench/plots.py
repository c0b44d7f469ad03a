"""Scaling curves: time and peak memory against batch size (or D) on log axes, one PNG per series.

Each case names the series it is a point of (``Case.series``); a series is drawn from the rows of
a result file (dicts, as in ``results.json``), one line per provider, with the GEMM floor (the
GEMMs' FLOPs over the matmul rate measured in the same run) dashed where the loss does GEMMs.
matplotlib is optional (``pip install fastssl[bench]``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

MIB = 2 ** 20


def main_mode(rows: Sequence[dict]) -> str:
    """The mode a series is drawn for: a training step (fwd+bwd), or fwd for losses without one."""
    return "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in rows) else "fwd"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def group_series(rows: Sequence[dict]) -> Dict[Tuple[str, str], List[dict]]:
    """{(title, x size key): the rows of that series' cases}."""
    series: Dict[Tuple[str, str], List[dict]] = {}
    for row in rows:
        for title, x_key in row["series"]:
            series.setdefault((title, x_key), []).append(row)
    return series


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or why it cannot be imported."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"no plots: matplotlib is not installed ({error}); `pip install fastssl[bench]`"
    return plt


def _log_axes(axis, x_label: str, y_label: str, legend_size: int) -> None:
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xlabel(x_label)
    axis.set_ylabel(y_label)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=legend_size)


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path


def plot_curves(rows: Sequence[dict], out_dir: Path, device_name: str) -> Tuple[List[Path], List[str]]:
    """Write one PNG per series with at least two measured sizes; returns (paths, notes)."""
    plt = _pyplot()
    if isinstance(plt, str):
        return [], [plt]
    paths, notes = [], []
    for (title, x_key), members in group_series(rows).items():
        mode = main_mode(members)
        measured = [r for r in members if r["mode"] == mode and r["status"] == "ok"]
        if len({r["sizes"][x_key] for r in measured}) < 2:
            notes.append(f"no plot for {title!r}: fewer than two measured sizes")
            continue
        figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
        for provider in dict.fromkeys(r["provider"] for r in measured):
            points = sorted((r["sizes"][x_key], r["median_ms"], r["peak_memory_bytes"])
                            for r in measured if r["provider"] == provider)
            time_axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
            with_memory = [p for p in points if p[2] is not None]
            if with_memory:
                memory_axis.plot([p[0] for p in with_memory], [max(p[2], 1) / MIB for p in with_memory],
                                 marker="o", label=provider)
        floor = sorted({r["sizes"][x_key]: r["gemm_floor_ms"] for r in measured
                        if r["gemm_floor_ms"] is not None}.items())
        if floor:
            time_axis.plot([x for x, _ in floor], [f for _, f in floor], "k--", label="GEMM floor")
        for axis, label in ((time_axis, "median time (ms)"), (memory_axis, "peak memory (MiB)")):
            _log_axes(axis, x_key, label, 8)
        figure.suptitle(f"{title} — {mode} on {device_name}")
        paths.append(_save(figure, out_dir / f"{slug(title)}.png"))
        plt.close(figure)
    return paths, notes


def plot_ratios(rows: Sequence[dict], out_dir: Path, device_name: str, peer: str) -> Tuple[List[Path], List[str]]:
    """``bench.sweep``'s rows: one PNG per family, the ``peer``'s time over fastssl's against rows
    (log axes), one line per loss, solid at one thread and dashed with more; 1× and 1.5× marked."""
    plt = _pyplot()
    if isinstance(plt, str):
        return [], [plt]
    paths, notes = [], []
    for family in dict.fromkeys(r["family"] for r in rows):
        measured = [r for r in rows if r["family"] == family and f"ratio_{peer}" in r]
        if len({r["rows"] for r in measured}) < 2:
            notes.append(f"no ratio plot for {family!r}: fewer than two measured sizes")
            continue
        figure, axis = plt.subplots(figsize=(7, 4.5))
        colours = {loss: f"C{i % 10}" for i, loss in enumerate(dict.fromkeys(r["loss"] for r in measured))}
        for (loss, threads) in dict.fromkeys((r["loss"], r["threads"]) for r in measured):
            points = sorted((r["rows"], r[f"ratio_{peer}"]) for r in measured
                            if (r["loss"], r["threads"]) == (loss, threads))
            axis.errorbar([x for x, _ in points], [p["median"] for _, p in points],
                          yerr=[[p["median"] - p["min"] for _, p in points], [p["max"] - p["median"] for _, p in points]],
                          marker="o", capsize=2, linestyle="-" if threads == 1 else "--", color=colours[loss],
                          label=f"{loss}, {threads} thread{'s' if threads > 1 else ''}")
        for level, style in ((1.0, "-"), (1.5, ":")):  # the targets: never slower, 1.5× from 512 rows
            axis.axhline(level, color="k", linestyle=style, linewidth=0.8)
        _log_axes(axis, "rows per view", f"{peer} time / fastssl time", 7)
        axis.set_title(f"{family}: fwd+bwd speedup over {peer} on {device_name}", fontsize=9)
        paths.append(_save(figure, out_dir / f"sweep-{slug(family)}.png"))
        plt.close(figure)
    return paths, notes
