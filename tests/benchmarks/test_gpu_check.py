"""``python -m bench.gpu_check --dry-run``: the card check's whole path on the CPU (interpreter,
tiny shapes), so it is known to work before a card is lent; its budget, its supervisor (a fake
worker that hangs) and its launch counts (aten ops on the CPU)."""
import json
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # bench/ is a folder of the repository, not an installed package

from bench import core, gpu_check, op_counts, sweep  # noqa: E402
from fastssl import backends  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    gpu_check.main(["--dry-run", "--out", str(out)])
    return out, json.loads((out / "gpu_check.json").read_text())


def test_writes_the_markdown_json_and_json_lines_results(dry_run):
    out, result = dry_run
    assert result["dry_run"] is True and result["machine"]["device"] == "cpu"
    assert (out / "gpu_check.md").read_text().startswith("# GPU check on ")
    streamed = [json.loads(line) for line in (out / "gpu_check.jsonl").read_text().splitlines()]
    assert streamed == json.loads(json.dumps(result["rows"], default=str))  # every row, as it arrived


def test_every_case_ran_in_priority_order_without_a_budget(dry_run):
    _, result = dry_run
    assert result["budget_s"] is None
    names = [case.name for case in gpu_check.check_cases()]
    assert names[0] == "sinkhorn_barrier" and names[-1] == "large:nt_xent_4m"
    assert {c["case"] for c in result["cases"]} == set(names)
    assert all(c["status"] == "done" and c["seconds"] >= 0 for c in result["cases"]), result["cases"]


def test_the_sinkhorn_barrier_case_runs_first_and_matches_float64(dry_run):
    _, result = dry_run
    assert result["cases"][0]["case"] == "sinkhorn_barrier"
    [row] = [r for r in result["rows"] if r["section"] == "barrier"]
    assert row["status"] == "ok" and row["error"] <= row["bound"], row
    assert row["cooperative"] is False and row["note"]  # one launch per phase under the interpreter
    assert row["counted"] == "aten ops" and row["launches_per_call"] > 0


def test_launch_counts_cover_each_familys_main_loss(dry_run):
    _, result = dry_run
    rows = [r for r in result["rows"] if r["section"] == "launch_counts"]
    assert {(r["family"], r["loss"]) for r in rows} == {
        (family, loss) for family, losses in gpu_check.LAUNCH_COUNT_LOSSES.items() for loss in losses}
    for row in rows:
        assert row["status"] == "ok" and row["counted"] == "aten ops", row
        assert row["ops"][sweep.FASTSSL] > 0 and row["ops"][sweep.PLAIN] > 0, row


def test_every_registered_op_dtype_and_backend_is_checked(dry_run):
    _, result = dry_run
    checked = {(r["op"], r["dtype"], r["backend"]) for r in result["rows"] if r["section"] == "ops"}
    assert checked == {(op, dtype, backend) for op in backends.ops() for dtype in gpu_check.DTYPE_NAMES
                       for backend in backends.MANIFEST[op]}
    for row in result["rows"]:
        assert row["status"] in ("ok", "unavailable"), row
        assert row["status"] == "ok" or row["reason"], row


def test_the_interpreter_runs_every_triton_op_in_float32(dry_run):
    """Rows the interpreter can run are compared, not skipped: float32 on the triton backend."""
    _, result = dry_run
    rows = [r for r in result["rows"] if r["section"] == "ops" and r["backend"] == "triton"
            and r["dtype"] == "float32"]
    assert rows and all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    assert all(r["error"] <= r["bound"] for r in rows)


def test_the_large_cases_and_the_autotune_pass_run(dry_run):
    _, result = dry_run
    large = {(r["case"], r["backend"]) for r in result["rows"] if r["section"] == "large" and r["status"] == "ok"}
    assert {"nt_xent_4m", "barlow_twins", "barlow_twins_float64", "sinkhorn", "dino_pairs"} <= {c for c, _ in large}
    assert all((case, "torch") in large for case in ("barlow_twins", "sinkhorn", "dino_pairs"))
    autotune = [r for r in result["rows"] if r["section"] == "autotune"]
    assert [r["autotune"] for r in autotune] == [False, True] and all(r["status"] == "ok" for r in autotune)
    assert all(r["median_ms"] > 0 for r in autotune)


def test_the_dry_run_shapes_are_tiny_and_the_card_shapes_are_the_issues():
    assert gpu_check.SIZES["nt_xent_4m"][1] == (2 * 1024 * 1024, 768)  # 4M rows: over 2^31 elements
    assert 2 * 2 * 1024 * 1024 * 768 > 2**31
    assert all(torch.Size(dry).numel() < 4096 for dry, _ in gpu_check.SIZES.values())


def test_no_op_row_fails_in_the_dry_run(dry_run):
    _, result = dry_run
    failed = [r for r in result["rows"] if r["section"] == "ops" and r["status"] == "failed"]
    assert not failed, failed


def test_gradients_are_of_a_weighted_sum_so_centred_outputs_are_not_rounding_noise():
    """A whitening's rows are centred: ∂Σy/∂x = 0 exactly, its float64 value ≈ 1e-17, and every
    relative error against it is meaningless. The check weights each output by a fixed random w
    (∂Σw·y/∂x is O(1)) and draws the same w on every call."""
    x = torch.randn(2, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    reference = backends.implementation("whitening", "reference").fn
    plain = torch.autograd.grad(reference(x, None, None, 0.1)[0].sum(), x)[0]
    assert plain.abs().max() < 1e-12  # the degenerate check this guards against
    first, _ = gpu_check._evaluate(reference, [x, None, None, 0.1])
    second, _ = gpu_check._evaluate(reference, [x, None, None, 0.1])
    assert first[-1].shape == x.shape and first[-1].abs().max() > 0.1
    assert torch.equal(first[-1], second[-1])


def test_launch_counts_on_the_cpu_count_aten_ops_for_two_losses():
    """The launch-count section's code path on the CPU, for two losses: each provider's count is
    ``bench.op_counts``' count of the same step, and the table has a column per provider."""
    ctx = gpu_check.Context(torch.device("cpu"), True, lambda message: None)
    rows = gpu_check.launch_counts(ctx, {"contrastive": ("nt_xent",), "redundancy": ("barlow_twins",)})
    assert [r["loss"] for r in rows] == ["nt_xent", "barlow_twins"]
    rows_per_view, dim = gpu_check.SIZES["launch_counts"][0]
    for row in rows:
        [case] = sweep.sweep_cases(row["family"], rows_per_view, dim, (row["loss"],))
        for provider, backend in ((sweep.FASTSSL, "auto"), (sweep.PLAIN, "reference")):
            args, leaves = core.make_inputs(case, torch.device("cpu"), torch.float32)
            assert row["ops"][provider] == sum(op_counts.aten_ops(case.make_loss(backend), args, leaves).values())
    header = op_counts.table_lines(rows, "aten ops", (sweep.FASTSSL, sweep.PLAIN, sweep.LIGHTLY))[0]
    assert "fastssl aten ops | torch aten ops | lightly aten ops" in header


def test_the_budget_skips_what_does_not_fit_and_says_so():
    h100 = gpu_check.card_rates("NVIDIA H100 80GB HBM3")
    assert h100.name == "H100 SXM" and gpu_check.card_rates("NVIDIA H100 PCIe").name == "H100 PCIe"
    unknown = gpu_check.card_rates("Some Card", multiprocessors=216)
    assert unknown.flops["bfloat16"] == 2 * gpu_check.FALLBACK_RATES.flops["bfloat16"]
    cases = gpu_check.check_cases()
    preview = gpu_check.plan(cases, h100, gpu_check.DEFAULT_BUDGET_S, gpu_check.DEFAULT_JOBS)
    kept = [p for p in preview if p["fits"]]
    assert preview[0]["case"] == "sinkhorn_barrier" and preview[0]["fits"]
    assert all(p["start_s"] + p["estimate_s"] <= gpu_check.DEFAULT_BUDGET_S for p in kept)
    # the 4M-row step alone: 4 GEMMs of 2·(4M)²·768 at 35% of 989 TFLOP/s ≈ 312 s, more than is left
    [big] = [p for p in preview if p["case"] == "large:nt_xent_4m"]
    assert 300 < big["estimate_s"] < 330 and not big["fits"]
    assert all(p["fits"] for p in preview if p["case"].startswith("ops:"))  # correctness first
    assert gpu_check.plan(cases, h100, None, 1)[-1]["fits"]
    assert [c.name for c in gpu_check.select(cases, ["ops"])] == [c.name for c in cases if c.name.startswith("ops:")]
    with pytest.raises(ValueError, match="no case named"):
        gpu_check.select(cases, ["nope"])


FAKE_WORKER = textwrap.dedent("""
    import json, sys, time
    events = open(sys.argv[sys.argv.index("--events") + 1], "a", buffering=1)
    emit = lambda **event: events.write(json.dumps(event) + "\\n")
    emit(event="ready")
    for line in sys.stdin:
        case = line.strip()
        emit(event="start", case=case)
        if case == "sinkhorn_barrier" and "--per-phase-sinkhorn" not in sys.argv:
            emit(event="progress", case=case, message="launched: waiting for the grid barriers")
            time.sleep(3600)  # the spin of a grid barrier whose programs are not all resident
        emit(event="row", case=case, row={"section": "large", "case": case, "status": "ok"})
        emit(event="end", case=case, seconds=0.0)
""")


def test_the_supervisor_kills_a_deadlocked_barrier_and_goes_on_without_it(tmp_path):
    """A worker stuck after the launch is killed at the case's timeout and reported as a deadlock;
    the next worker starts with the per-phase Sinkhorn, the next case runs, and a case whose
    estimate exceeds what is left of the budget is skipped with the numbers."""
    cases = [gpu_check.CheckCase("sinkhorn_barrier", "barrier", None, gpu_check.Work(), timeout_s=2.0),
             gpu_check.CheckCase("quick", "large", None, gpu_check.Work()),
             gpu_check.CheckCase("too_big", "large", None, gpu_check.Work(fixed=1e6))]
    started, rows, outcomes = [], [], []

    def start_worker(per_phase_sinkhorn):
        argv = [sys.executable, "-c", FAKE_WORKER] + ["--per-phase-sinkhorn"] * per_phase_sinkhorn
        started.append(gpu_check._Worker(argv, tmp_path / f"worker-{len(started)}.jsonl", {}))
        return started[-1]

    begin = time.monotonic()
    gpu_check.supervise(cases, start_worker, gpu_check.card_rates("H100"), 120.0, 2, rows.append, outcomes.append,
                        log=lambda message: None, poll_s=0.05)
    assert time.monotonic() - begin < 60
    assert [(o["case"], o["status"]) for o in outcomes] == [("sinkhorn_barrier", "deadlock"), ("quick", "done"),
                                                            ("too_big", "skipped")]
    assert "launched" in outcomes[0]["reason"] and "left of the budget" in outcomes[2]["reason"]
    assert ["--per-phase-sinkhorn" in w.process.args for w in started] == [False, True]
    assert all(w.process.returncode is not None for w in started)  # none outlives the supervisor
    assert {(r["case"], r["status"]) for r in rows} == {("sinkhorn_barrier", "deadlock"), ("quick", "ok"),
                                                       ("too_big", "skipped")}
