"""Smoke test of the benchmark suite (bench/): one tiny case per loss through the report's path.

The benchmarks never run in the default test command; this checks that what they produce is
sound: one row per (case, provider, mode), positive times and a memory number for every row that
ran, every fastssl backend and every peer present (a row that did not run says why, and says
"unavailable" only where fastssl itself refuses), failing peers reported as failures, and the
CSV / JSON / markdown / plot writers.
"""
import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # bench/ is a folder of the repository, not an installed package

from bench import core, report  # noqa: E402
from fastssl import backends  # noqa: E402

CPU = torch.device("cpu")
# tests/conftest.py sets TRITON_INTERPRET=1: Triton kernels that run there are exercised too.
SMOKE = dataclasses.replace(core.SETTINGS["smoke"], allow_interpreter=True)
LOSSES = {"nt_xent", "nt_xent_memory_bank", "clip_loss", "barlow_twins", "vicreg", "swav", "sinkhorn_knopp", "dino",
          "negative_cosine_similarity", "tico", "mmcr", "frossl", "emp_ssl", "hypersphere", "dcl", "dclw", "detcon",
          "macl", "directclr", "co2", "patch_kernel_alignment", "vicregl", "wmse", "dse", "sigreg", "lejepa", "lewm",
          "visreg"} | {"capi", "koleo", "gram_anchoring", "msn", "pmsn", "linear_distillation", "masked_lm",
                        "mae", "wav2vec2", "hubert", "ibot"}
GEMM_LOSSES = {"nt_xent", "nt_xent_memory_bank", "clip_loss", "barlow_twins", "vicreg", "tico", "mmcr", "frossl",
               "emp_ssl", "hypersphere", "dcl", "dclw", "detcon", "macl", "directclr", "co2",
               "patch_kernel_alignment", "vicregl", "wmse", "sigreg", "lejepa", "lewm", "visreg"} | {
    "koleo", "gram_anchoring", "msn", "pmsn", "linear_distillation", "masked_lm", "wav2vec2", "hubert"}


@pytest.fixture(scope="module")
def smoke_cases():
    return [case for family in core.FAMILIES for case in core.family_cases(family, "smoke")]


@pytest.fixture(scope="module")
def smoke_result(smoke_cases):
    return report.run(CPU, torch.float32, "smoke", smoke_cases, SMOKE, memory_process="run")


def test_one_smoke_case_per_loss(smoke_cases):
    assert {case.loss for case in smoke_cases} == LOSSES
    names = [(case.family, case.name) for case in smoke_cases]
    assert len(names) == len(set(names))


def test_one_row_per_case_provider_and_mode(smoke_cases, smoke_result):
    found = [(r["case"], r["provider"], r["mode"]) for r in smoke_result["rows"]]
    expected = [(case.name, provider, mode) for case in smoke_cases
                for provider in backends.BACKENDS + tuple(case.peers) for mode in case.modes]
    assert sorted(found) == sorted(expected)


def test_rows_are_well_formed(smoke_result):
    for row in smoke_result["rows"]:
        assert row["status"] in core.STATUSES, row
        if row["status"] == "ok":
            assert 0 < row["q25_ms"] <= row["median_ms"] <= row["q75_ms"], row
            assert row["runs"] >= 1 and row["timer"], row
            assert isinstance(row["peak_memory_bytes"], int) and row["peak_memory_bytes"] >= 0, row
            assert row["memory_method"], row
        else:
            assert row["reason"] and row["median_ms"] is None and row["peak_memory_bytes"] is None, row
        # TiCo and KoLeo do all their GEMMs in the forward (their backward is elementwise)
        has_gemm = row["loss"] in GEMM_LOSSES and not (row["loss"] in ("tico", "koleo") and row["mode"] == "bwd")
        assert (row["gemm_floor_ms"] is not None and row["gemm_floor_ms"] > 0) == has_gemm, row


def test_reference_and_torch_backends_run_every_case(smoke_result):
    for row in smoke_result["rows"]:
        if row["provider"] in ("reference", "torch"):
            assert row["status"] == "ok", row


def test_unavailable_only_where_fastssl_refuses(smoke_cases, smoke_result):
    by_name = {case.name: case for case in smoke_cases}
    for row in smoke_result["rows"]:
        if row["provider_kind"] == "fastssl" and row["status"] == "unavailable" and row["mode"] == "fwd":
            args, _ = core.make_inputs(by_name[row["case"]], CPU, torch.float32)
            with pytest.raises(backends.BackendUnavailableError):
                by_name[row["case"]].make_loss(row["provider"])(*args)


def test_missing_or_failing_peers_are_reported(smoke_cases):
    def out_of_memory(*_):
        raise MemoryError("cannot allocate the logits")

    def broken(*_):
        raise RuntimeError("a bug in the peer")

    def missing():
        raise ImportError("No module named 'somepeer'")

    expected = {"oom-peer": ("oom", "cannot allocate the logits"), "broken-peer": ("failed", "a bug in the peer"),
                "missing-peer": ("unavailable", "No module named 'somepeer'")}
    case = dataclasses.replace(smoke_cases[0], peers={"oom-peer": lambda: out_of_memory,
                                                      "broken-peer": lambda: broken, "missing-peer": missing})
    inputs = core.make_inputs(case, CPU, torch.float32)
    for peer, (status, message) in expected.items():
        rows = core.measure(case, peer, case.modes, CPU, torch.float32, SMOKE, inputs, core.default_timer(CPU, SMOKE))
        assert [r.mode for r in rows] == list(case.modes)
        for row in rows:
            assert (row.status, row.provider_kind) == (status, "peer") and message in row.reason, row


def test_machine_info(smoke_result):
    info = smoke_result["machine"]
    for key in ("cpu_model", "cpu_threads", "gpu_name", "torch", "triton", "commit", "key", "matmul_gflops"):
        assert key in info
    assert info["matmul_gflops"] > 0 and info["torch"] == torch.__version__


def test_written_results(smoke_result, tmp_path):
    paths = report.write_results(smoke_result, tmp_path, make_plots=True)
    with open(tmp_path / "results.csv") as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == len(smoke_result["rows"])
    assert {"size_batch", "provider", "mode", "median_ms", "peak_memory_bytes"} <= set(lines[0])
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == smoke_result["rows"]
    markdown = (tmp_path / "report.md").read_text()
    assert report.summary_table(smoke_result) in markdown
    assert "unavailable" in markdown  # the reasons of what did not run are in the report
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    # the BYOL series has two smoke sizes: its curve is drawn
    assert any(p.suffix == ".png" and p.stem.startswith("byol") for p in paths)


def test_pytest_benchmark_entry_point():
    """``pytest bench/ --benchmark-only`` collects the bench files and runs their jobs."""
    command = [sys.executable, "-m", "pytest", "bench/bench_byol.py", "--benchmark-only", "--bench-set", "smoke",
               "--bench-device", "cpu", "-q", "-p", "no:cacheprovider", "-k", "b6-d10-torch-fwd+bwd"]
    process = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert "1 passed" in process.stdout


@pytest.mark.parametrize("clock", ["wall", "process"])
@pytest.mark.parametrize("forward_only", [False, True], ids=["step", "forward"])
def test_versus_times_both_sides_in_every_mode_and_clock(smoke_cases, clock, forward_only):
    """bench.versus against a stand-in peer (the reference backend): each round timed on both
    sides, a speedup per round, the median inside the spread."""
    from bench import versus

    case = next(c for c in smoke_cases if c.loss == "nt_xent")
    case = dataclasses.replace(case, peers={"reference": lambda: case.make_loss("reference")})
    row = versus.compare(case, "reference", rounds=3, runs=1, clock=versus.CLOCKS[clock], forward_only=forward_only)
    assert row["status"] == "ok", row
    assert row["fastssl_ms"] > 0 and row["peer_ms"] > 0
    assert row["speedup_min"] <= row["speedup"] <= row["speedup_max"]


def test_sweep_rows_ratios_and_writers(tmp_path):
    """bench.sweep on tiny sizes: a row per (loss, size, threads), fastssl and the plain torch code
    timed with per-round ratios (lightly too where installed, else the reason), the markdown table
    and the ratio plot; a provider slower than --max-step-s stays out of the larger sizes."""
    from bench import sweep

    rows = sweep.run(["contrastive"], [6, 12], [1], rounds=2, runs=1, clock="process", losses=["nt_xent"], dim=10)
    assert [(r["loss"], r["rows"], r["threads"], r["dim"]) for r in rows] == [("nt_xent", 6, 1, 10), ("nt_xent", 12, 1, 10)]
    for row in rows:
        assert row["ms"][sweep.FASTSSL] > 0 and row["ms"][sweep.PLAIN] > 0
        spread = row[f"ratio_{sweep.PLAIN}"]
        assert 0 < spread["min"] <= spread["median"] <= spread["max"]
        assert (sweep.LIGHTLY in row["ms"]) != (sweep.LIGHTLY in row["skipped"]), row
    text = sweep.markdown(rows, "header", [])
    assert all(line in text for line in sweep.table_lines(rows))
    from bench.plots import plot_ratios

    paths, notes = plot_ratios(rows, tmp_path, "cpu", sweep.PLAIN)
    if notes and "matplotlib is not installed" in notes[0]:
        assert paths == []
    else:
        assert paths == [tmp_path / "sweep-contrastive.png"] and paths[0].exists()
    slow = sweep.run(["contrastive"], [6, 12], [1], rounds=1, runs=1, clock="process", losses=["nt_xent"], dim=10,
                     max_step_s=0.0)
    assert slow[0]["skipped"][sweep.PLAIN].startswith("first step")
    assert slow[1]["skipped"][sweep.PLAIN].startswith("skipped: slower than --max-step-s at 6 rows")


def test_sweep_rounds_of_fast_steps_fill_the_minimum_round_time():
    from bench import sweep

    assert sweep.steps_per_round(0.4, 3, 100.0) == 250  # sub-ms steps: enough to outlast scheduler noise
    assert sweep.steps_per_round(50.0, 3, 100.0) == 3  # --runs already fills the round
    assert sweep.steps_per_round(2e3, 3, 1e4) == 1  # a step over a second runs once, as before
    assert sweep.steps_per_round(0.4, 3, 0.0) == 3  # the default of run(): --runs as given


@pytest.mark.parametrize("family,sizes,dim,losses", [
    ("clustering", [6, 12], 10, ["swav", "sinkhorn_knopp"]),
    ("whitening", [8, 16], 4, ["wmse", "whitening2d"]),
    ("distillation", [6, 12], 10, ["dino", "ibot", "msn", "pmsn"]),
    ("regularizers", [16, 32], 4, ["koleo", "dse"]),
])
def test_sweep_covers_the_other_families(family, sizes, dim, losses):
    """The clustering (the Sinkhorn forward alone: it has no gradient), whitening, distillation and
    regularizer families through bench.sweep on tiny sizes: a row per (loss, size), fastssl and
    the plain torch code timed; a case over --max-input-gb is not built, its row says why."""
    from bench import sweep

    rows = sweep.run([family], sizes, [1], rounds=2, runs=1, clock="process", dim=dim)
    assert sorted((r["loss"], r["rows"]) for r in rows) == sorted((loss, size) for loss in losses for size in sizes)
    for row in rows:
        assert row["ms"][sweep.FASTSSL] > 0 and row["ms"][sweep.PLAIN] > 0, row
        assert 0 < row[f"ratio_{sweep.PLAIN}"]["min"] <= row[f"ratio_{sweep.PLAIN}"]["max"], row
        assert (sweep.LIGHTLY in row["ms"]) != (sweep.LIGHTLY in row["skipped"]), row
    too_big = sweep.run([family], sizes[:1], [1], rounds=1, runs=1, clock="process", dim=dim, max_input_gb=0.0)
    for row in too_big:
        assert row["ms"] == {} and set(row["skipped"]) == {sweep.FASTSSL, sweep.PLAIN, sweep.LIGHTLY}, row
        assert all("--max-input-gb 0" in why for why in row["skipped"].values()), row
