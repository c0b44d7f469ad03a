"""``python -m bench.gpu_check --dry-run``: the card check's whole path on the CPU (interpreter,
tiny shapes), so it is known to work before a card is lent."""
import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # bench/ is a folder of the repository, not an installed package

from bench import gpu_check  # noqa: E402
from fastssl import backends  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    gpu_check.main(["--dry-run", "--out", str(out)])
    return out, json.loads((out / "gpu_check.json").read_text())


def test_writes_the_markdown_and_json_results(dry_run):
    out, result = dry_run
    assert result["dry_run"] is True and result["machine"]["device"] == "cpu"
    assert (out / "gpu_check.md").read_text().startswith("# GPU check on ")


def test_every_registered_op_dtype_and_backend_is_checked(dry_run):
    _, result = dry_run
    checked = {(r["op"], r["dtype"], r["backend"]) for r in result["rows"] if r["section"] == "ops"}
    assert checked == {(op, dtype, backend) for op in backends.ops() for dtype in gpu_check.DTYPE_NAMES
                       for backend in backends.MANIFEST[op]}
    for row in result["rows"]:
        assert row["status"] in ("ok", "failed", "unavailable"), row
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
