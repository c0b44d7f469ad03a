"""DCL and DCLW on two gloo processes with ``gather_distributed`` (negatives from every rank).

DCL: the mean of the ranks' losses is the single-process loss on the concatenated batch, and each
rank's gradients are W × the single-process gradients of its rows (lightly's gather). DCLW's
weights are each rank's own (lightly calls ``weight_fn`` on the local rows), so its rank losses
are checked against that formula in float64: rank r's loss L_r, and its gradients the rows of
∇ Σ_r L_r (the gather's backward sums every rank's)."""
import functools

import pytest
import torch

import torch.nn.functional as F

import fastssl

from oracles import mises_fisher_weights64
from test_distributed import BATCH, WORLD, assert_ranks_match_single_process, local_slice, results_of_ranks

pytestmark = pytest.mark.distributed

DIM = 7
LOSSES = {"dcl": lambda gather: fastssl.DCLLoss(0.3, gather_distributed=gather),  # τ, σ as rank_loss64's
          "dclw": lambda gather: fastssl.DCLWLoss(0.3, sigma=0.4, gather_distributed=gather)}


def global_views():
    g = torch.Generator().manual_seed(97)
    base = torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64)
    return [base + 0.6 * torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64) for _ in range(2)]


def run_case(name, out0, out1, gather):
    out0, out1 = out0.clone().requires_grad_(), out1.clone().requires_grad_()
    loss = LOSSES[name](gather)(out0, out1)
    return (loss.detach(), *torch.autograd.grad(loss, (out0, out1)))


def worker(rank):
    out0, out1 = (local_slice(v, rank) for v in global_views())
    return {name: run_case(name, out0, out1, gather=True) for name in LOSSES}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return results_of_ranks(worker, tmp_path_factory, "ddp_dcl")


def rank_loss64(out0, out1, rank, temperature=0.3, sigma=0.4):
    """lightly's DCLW loss on rank ``rank``: its rows against both gathered views, its own weights."""
    x0, x1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    own = torch.arange(BATCH) + rank * BATCH

    def side(a, b):
        same, other = a[rows] @ a.T / temperature, a[rows] @ b.T / temperature
        positive = -other[torch.arange(BATCH), own] * functools.partial(mises_fisher_weights64, sigma=sigma)(
            a[rows], b[rows])
        same[torch.arange(BATCH), own] = float("-inf")
        other[torch.arange(BATCH), own] = float("-inf")
        return (positive + torch.logsumexp(torch.cat([same, other], dim=1), dim=1)).mean()

    return 0.5 * (side(x0, x1) + side(x1, x0))


def test_dclw_ddp_uses_each_ranks_weights(ranks):
    out0, out1 = (v.clone().requires_grad_() for v in global_views())
    losses = [rank_loss64(out0, out1, rank) for rank in range(WORLD)]
    grads = torch.autograd.grad(sum(losses), (out0, out1))
    for rank, result in enumerate(ranks):
        loss, *rank_grads = result["dclw"]
        torch.testing.assert_close(loss, losses[rank].detach(), rtol=1e-10, atol=1e-12)
        for got, want in zip(rank_grads, grads):
            torch.testing.assert_close(got, local_slice(want, rank), rtol=1e-8, atol=1e-10)


def test_dcl_ddp_equals_single_process(ranks):
    single_loss, *single_grads = run_case("dcl", *global_views(), gather=False)
    assert_ranks_match_single_process([r["dcl"] for r in ranks], single_loss, single_grads)
