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


def plot_curves(rows: Sequence[dict], out_dir: Path, device_name: str) -> Tuple[List[Path], List[str]]:
    """Write one PNG per series with at least two measured sizes; returns (paths, notes)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return [], [f"no plots: matplotlib is not installed ({error}); `pip install fastssl[bench]`"]
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
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel(x_key)
            axis.set_ylabel(label)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        figure.suptitle(f"{title} — {mode} on {device_name}")
        figure.tight_layout()
        path = out_dir / f"{slug(title)}.png"
        figure.savefig(path, dpi=90)
        plt.close(figure)
        paths.append(path)
    return paths, notes
