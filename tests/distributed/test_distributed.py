"""Two gloo processes on CPU against one process on the concatenated batch, for every loss with a
distributed flag.

The convention checked (lightly's, see fastssl.distributed): the mean over ranks of the returned
losses equals the single-process loss on the concatenated batch, and each rank's input gradient
is W × the single-process gradient of its rows (DDP's averaging turns it back into the
single-process gradient).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastssl
import fastssl.functional as fn

pytestmark = pytest.mark.distributed

WORLD = 2
BATCH = 3  # rows per rank: odd on purpose
DIM = 5


def global_inputs():
    """Every case's inputs for the whole (W·B) batch, float64, from a fixed seed."""
    g = torch.Generator().manual_seed(1234)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "z0": rand(WORLD * BATCH, DIM), "z1": rand(WORLD * BATCH, DIM),
        "labels": torch.tensor([0, 1, 0, 2, 1, 1]),
        "crops": [rand(WORLD * BATCH, 7) for _ in range(3)],   # SwAV: 2 high-res + 1 low-res, K=7
        "teacher": [rand(WORLD * BATCH, 11) for _ in range(2)],  # DINO: D=11
        "student": [rand(WORLD * BATCH, 11) for _ in range(3)],
    }


def cases():
    """name → loss(z0, z1, crops, teacher, student, labels, gather) returning a scalar."""
    center = torch.linspace(-0.5, 0.5, 11, dtype=torch.float64)
    return {
        "nt_xent": lambda d, gather: fn.nt_xent(d["z0"], d["z1"], temperature=0.3, gather_distributed=gather),
        "nt_xent_supcon": lambda d, gather: fn.nt_xent(d["z0"], d["z1"], labels=d["labels"],
                                                       gather_distributed=gather),
        "nt_xent_simcse": lambda d, gather: fn.nt_xent(d["z0"], d["z1"], mode="simcse", gather_distributed=gather),
        "nt_xent_symmetric": lambda d, gather: fn.nt_xent(d["z0"], d["z1"], mode="symmetric",
                                                          gather_distributed=gather),
        "ntxent_module": lambda d, gather: fastssl.NTXentLoss(gather_distributed=gather)(d["z0"], d["z1"]),
        "barlow_twins": lambda d, gather: fastssl.BarlowTwinsLoss(gather_distributed=gather)(d["z0"], d["z1"]),
        "vicreg": lambda d, gather: fastssl.VICRegLoss(gather_distributed=gather)(d["z0"], d["z1"]),
        "swav": lambda d, gather: fastssl.SwaVLoss(sinkhorn_gather_distributed=gather)(d["crops"][:2], d["crops"][2:]),
        "dino": lambda d, gather: fn.dino(d["teacher"], d["student"], center, 0.05),
    }


def local_slice(value, rank):
    if isinstance(value, list):
        return [local_slice(v, rank) for v in value]
    return value[rank * BATCH:(rank + 1) * BATCH].clone()


def differentiable(d):
    return [d["z0"], d["z1"]] + d["crops"] + d["teacher"] + d["student"]


def run_case(d, name, gather):
    for t in differentiable(d):
        t.requires_grad_(True)
        t.grad = None
    loss = cases()[name](d, gather)
    loss.backward()
    return loss.detach(), [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in differentiable(d)]


def _rank_main(rank, compute, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    torch.save(compute(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def results_of_ranks(compute, tmp_path_factory, name):
    """``compute(rank)`` (a module-level function: the spawned processes import it) run by WORLD gloo
    processes, one thread each; returns every rank's result, in rank order."""
    out_dir = tmp_path_factory.mktemp(name)
    mp.spawn(_rank_main, args=(compute, str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def assert_ranks_match_single_process(rank_results, single_loss, single_grads):
    """lightly's gather convention: the mean of the ranks' losses (``rank_results[r][0]``) is the
    single-process loss, and each rank's gradients (``rank_results[r][1:]``) are W × the
    single-process gradients of its rows (nonzero: a vanished gradient would pass vacuously)."""
    mean_loss = sum(result[0] for result in rank_results) / WORLD
    torch.testing.assert_close(mean_loss, single_loss, rtol=1e-10, atol=1e-12)
    for rank, result in enumerate(rank_results):
        for got, want in zip(result[1:], single_grads):
            assert got.abs().sum() > 0
            torch.testing.assert_close(got, WORLD * local_slice(want, rank), rtol=1e-8, atol=1e-10)


def worker(rank):
    results = {}
    data = global_inputs()
    for name in cases():
        local = {k: local_slice(v, rank) for k, v in data.items()}
        results[name] = run_case(local, name, gather=True)
    # Sinkhorn alone: each rank's codes are its rows of the codes of the gathered batch.
    scores = local_slice(data["crops"][0], rank)
    results["sinkhorn"] = fn.sinkhorn_knopp(scores, 5, 0.05, gather_distributed=True)
    results["sinkhorn_marginals"] = fn.sinkhorn_knopp(
        scores, 40, 0.1, row_marginals=torch.linspace(1, 2, 7, dtype=torch.float64),
        col_marginals=torch.linspace(1, 2, BATCH, dtype=torch.float64) + rank, tolerance=1e-9,
        gather_distributed=True)
    # DINO center: all-reduced mean of the teacher outputs.
    results["dino_center"] = fn.dino_center(local_slice(data["teacher"], rank), torch.zeros(1, 1, 11,
                                            dtype=torch.float64), 0.9)
    # Memory bank: the batches of both ranks are enqueued, rank order.
    bank = fastssl.MemoryBankModule(size=(2 * WORLD * BATCH, DIM), gather_distributed=True)
    bank.bank = bank.bank.double()
    bank(local_slice(data["z1"], rank), update=True)
    results["bank"] = bank.bank.clone()
    # Barlow Twins in lightly's convention: per-rank statistics, C averaged over ranks.
    local = {k: local_slice(v, rank) for k, v in data.items()}
    z0, z1 = local["z0"].requires_grad_(True), local["z1"].requires_grad_(True)
    loss = fastssl.BarlowTwinsLoss(gather_distributed=True, distributed_convention="lightly")(z0, z1)
    loss.backward()
    results["barlow_lightly"] = (loss.detach(), [z0.grad.clone(), z1.grad.clone()])
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return results_of_ranks(worker, tmp_path_factory, "ddp")


@pytest.mark.parametrize("name", list(cases()))
def test_ddp_equals_single_process(ranks, name):
    single_loss, single_grads = run_case(global_inputs(), name, gather=False)
    mean_loss = sum(r[name][0] for r in ranks) / WORLD
    torch.testing.assert_close(mean_loss, single_loss, rtol=1e-10, atol=1e-12)
    for rank, result in enumerate(ranks):
        for got, want in zip(result[name][1], single_grads):
            torch.testing.assert_close(got, WORLD * local_slice(want, rank), rtol=1e-8, atol=1e-10)


def test_ddp_gradients_are_not_trivially_zero(ranks):
    """Guards the comparison above: the gathered losses really have gradients on every input."""
    for name in ("nt_xent", "barlow_twins", "vicreg"):
        assert all(g.abs().sum() > 0 for g in ranks[0][name][1][:2]), name


def test_ddp_sinkhorn_codes_are_slices_of_global_codes(ranks):
    scores = global_inputs()["crops"][0]
    single = fn.sinkhorn_knopp(scores, 5, 0.05)
    torch.testing.assert_close(torch.cat([r["sinkhorn"] for r in ranks]), single, rtol=1e-10, atol=1e-12)
    columns = torch.cat([torch.linspace(1, 2, BATCH, dtype=torch.float64) + r for r in range(WORLD)])
    single = fn.sinkhorn_knopp(scores, 40, 0.1, row_marginals=torch.linspace(1, 2, 7, dtype=torch.float64),
                               col_marginals=columns, tolerance=1e-9)
    torch.testing.assert_close(torch.cat([r["sinkhorn_marginals"] for r in ranks]), single,
                               rtol=1e-10, atol=1e-12)


def test_ddp_dino_center_and_memory_bank(ranks):
    data = global_inputs()
    expected = fn.dino_center(data["teacher"], torch.zeros(1, 1, 11, dtype=torch.float64), 0.9)
    for r in ranks:
        torch.testing.assert_close(r["dino_center"], expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(r["bank"][: WORLD * BATCH], data["z1"], rtol=0, atol=0)


def test_ddp_barlow_lightly_convention(ranks):
    """lightly: per-rank batch-norm, C = mean_r C_r through an autograd all-reduce."""
    data = global_inputs()
    z0, z1 = data["z0"].requires_grad_(True), data["z1"].requires_grad_(True)
    c = sum(fastssl.reference.batch_normalize(local_slice(z0, r)).T @ fastssl.reference.batch_normalize(
        local_slice(z1, r)) / BATCH for r in range(WORLD)) / WORLD
    loss = fastssl.reference.barlow_twins_from_correlation(c, 5e-3)
    grads = torch.autograd.grad(loss, (z0, z1))
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["barlow_lightly"][0], loss.detach(), rtol=1e-10, atol=1e-12)
        for got, want in zip(result["barlow_lightly"][1], grads):
            torch.testing.assert_close(got, WORLD * local_slice(want, rank), rtol=1e-8, atol=1e-10)
    global_loss = fastssl.BarlowTwinsLoss()(data["z0"], data["z1"])
    assert not torch.allclose(loss, global_loss), "the two conventions should differ on this data"
