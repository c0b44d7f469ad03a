"""VICRegL on two gloo processes: with gather_distributed every variance and covariance term
(global views, and the matched cells of every local VICReg call) uses the gathered batch, matching
is per image, so the mean of the ranks' losses is the single-process loss of the concatenated
batch and each rank's gradients are W × the single-process ones (lightly's convention; see
tests/distributed/test_distributed.py). Both backends, both covariance paths."""

import pytest
import torch

import fastssl.functional as fn

from helpers import vicregl_inputs
from test_distributed import BATCH, WORLD, assert_ranks_match_single_process, local_slice, results_of_ranks

pytestmark = pytest.mark.distributed

CASES = {f"{backend}-{algorithm}": (backend, algorithm) for backend in ("reference", "torch")
         for algorithm in ("gram", "direct")}


def global_inputs():
    """2 global views of 3×3 cells, 2 local views of 2×2, float64; D = 7 > the global batch 6, C = 4 < 6."""
    return vicregl_inputs(batch=WORLD * BATCH, dim=7, local_dim=4, grid_sizes=(3, 3, 2, 2), dtype=torch.float64,
                          seed=77)


def _leaves(inputs):
    return [t for pair in list(inputs[0]) + list(inputs[2]) for t in pair]


def run_case(name, inputs, gather):
    backend, algorithm = CASES[name]
    global_views, global_grids, local_views, local_grids = inputs
    global_views = [tuple(t.clone().requires_grad_() for t in pair) for pair in global_views]
    local_views = [tuple(t.clone().requires_grad_() for t in pair) for pair in local_views]
    loss = fn.vicregl(global_views, global_grids, local_views, local_grids, 2.0, 3.0, 0.5, 0.6, 1e-3, (4, 2),
                      gather_distributed=gather, algorithm=algorithm, backend=backend)
    leaves = _leaves((global_views, None, local_views, None))
    return (loss.detach().reshape(()), *torch.autograd.grad(loss.sum(), leaves))


def _slice(inputs, rank):
    global_views, global_grids, local_views, local_grids = inputs
    return ([tuple(local_slice(t, rank) for t in pair) for pair in global_views], local_slice(global_grids, rank),
            [tuple(local_slice(t, rank) for t in pair) for pair in local_views], local_slice(local_grids, rank))


def worker(rank):
    inputs = _slice(global_inputs(), rank)
    return {name: run_case(name, inputs, gather=True) for name in CASES}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return results_of_ranks(worker, tmp_path_factory, "ddp_vicregl")


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_equals_single_process(ranks, name):
    single_loss, *single_grads = run_case(name, global_inputs(), gather=False)
    assert_ranks_match_single_process([r[name] for r in ranks], single_loss, single_grads)


def test_ddp_without_gather_differs(ranks):
    """The per-rank statistics differ from the gathered ones: the test above can fail."""
    single_loss = run_case("torch-gram", global_inputs(), gather=False)[0]
    per_rank = [run_case("torch-gram", _slice(global_inputs(), rank), gather=False)[0] for rank in range(WORLD)]
    assert not torch.isclose(sum(per_rank) / WORLD, single_loss, rtol=1e-3)
