"""Barlow Twins and VICReg on two gloo processes through both fused paths: the gathered N·D views
(not an all-reduced D×D matrix) give the single-process loss and gradients of the concatenated
batch, on the Gram path (global batch 6 < D = 11) as on the direct one (tests/distributed/test_distributed.py
covers the default path and lightly's per-rank convention)."""

import pytest
import torch

import fastssl.functional as fn

from test_distributed import BATCH, WORLD, assert_ranks_match_single_process, local_slice, results_of_ranks

pytestmark = pytest.mark.distributed

DIM = 11
CASES = {
    f"{name}-{algorithm}": (loss, algorithm)
    for name, loss in (("barlow_twins", lambda a, b, **kw: fn.barlow_twins(a, b, 0.02, backend="torch", **kw)),
                       ("vicreg", lambda a, b, **kw: fn.vicreg(a, b, 2.0, 3.0, 0.5, backend="torch", **kw)))
    for algorithm in ("gram", "direct")
}


def global_views():
    g = torch.Generator().manual_seed(4321)
    base = torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64)
    return (0.6 * base + 0.3 * torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64),
            0.6 * base + 0.3 * torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64))


def run_case(name, z_a, z_b, gather):
    loss_fn, algorithm = CASES[name]
    z_a, z_b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    loss = loss_fn(z_a, z_b, algorithm=algorithm, gather_distributed=gather)
    return (loss.detach(), *torch.autograd.grad(loss, (z_a, z_b)))


def worker(rank):
    z_a, z_b = (local_slice(z, rank) for z in global_views())
    results = {name: run_case(name, z_a, z_b, gather=True) for name in CASES}
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return results_of_ranks(worker, tmp_path_factory, "ddp_redundancy")


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_equals_single_process_on_both_paths(ranks, name):
    single_loss, *single_grads = run_case(name, *global_views(), gather=False)
    assert_ranks_match_single_process([r[name] for r in ranks], single_loss, single_grads)
