"""DetConB and DetConS on two gloo processes with ``gather_distributed`` (lightly's default: the
targets of every rank are the keys, gathered with gradient; positives and exclusions stay within
each rank's own images): the mean of the ranks' losses is the single-process loss on the
concatenated batch, and each rank's gradients are W × the single-process gradients of its rows."""
import pytest
import torch

import fastssl

from test_distributed import BATCH, WORLD, assert_ranks_match_single_process, local_slice, results_of_ranks

pytestmark = pytest.mark.distributed

REGIONS, DIM = 5, 6


def global_inputs():
    g = torch.Generator().manual_seed(41)
    base = torch.randn(WORLD * BATCH, REGIONS, DIM, generator=g, dtype=torch.float64)
    views = [base + 0.6 * torch.randn(base.shape, generator=g, dtype=torch.float64) for _ in range(4)]
    masks = [torch.randint(0, 3, (WORLD * BATCH, REGIONS), generator=g) for _ in range(2)]
    return views, masks


def run_case(name, views, masks, gather):
    views = [v.clone().requires_grad_() for v in views]
    if name == "detconb":
        loss = fastssl.DetConBLoss(0.2, gather_distributed=gather)(*views, *masks)
    else:
        views = views[:2]
        loss = fastssl.DetConSLoss(0.2, gather_distributed=gather)(*views, *masks)
    return (loss.detach(), *torch.autograd.grad(loss, views))


def worker(rank):
    views, masks = global_inputs()
    local = [local_slice(v, rank) for v in views], [local_slice(m, rank) for m in masks]
    return {name: run_case(name, *local, gather=True) for name in ("detconb", "detcons")}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return results_of_ranks(worker, tmp_path_factory, "ddp_detcon")


@pytest.mark.parametrize("name", ["detconb", "detcons"])
def test_detcon_ddp_equals_single_process(ranks, name):
    single_loss, *single_grads = run_case(name, *global_inputs(), gather=False)
    assert_ranks_match_single_process([r[name] for r in ranks], single_loss, single_grads)
