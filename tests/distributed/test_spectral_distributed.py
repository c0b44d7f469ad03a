"""TiCo on two gloo processes: with ``gather_distributed`` each rank's loss, covariance state and
gradients are those of one process on the concatenated batch (gradients W × the rank's rows,
which DDP's averaging turns back into the single-process ones), as lightly's gather does."""

import pytest
import torch

import fastssl.functional as fn

from test_distributed import BATCH, WORLD, local_slice, results_of_ranks

pytestmark = pytest.mark.distributed

DIM = 9
BACKENDS = ("reference", "torch")


def global_views():
    g = torch.Generator().manual_seed(2468)
    base = torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64)
    covariance = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
    return (base + 0.5 * torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64),
            base + 0.5 * torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64),
            covariance @ covariance.T / DIM)


def run_case(backend, z_a, z_b, covariance, gather):
    z_a, z_b = z_a.clone().requires_grad_(), z_b.clone().requires_grad_()
    loss, state = fn.tico(z_a, z_b, covariance, 0.7, 4.0, gather_distributed=gather, backend=backend)
    return (loss.detach(), state, *torch.autograd.grad(loss, (z_a, z_b)))


def worker(rank):
    z_a, z_b, covariance = global_views()
    results = {backend: run_case(backend, local_slice(z_a, rank), local_slice(z_b, rank), covariance, gather=True)
               for backend in BACKENDS}
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return results_of_ranks(worker, tmp_path_factory, "ddp_spectral")


@pytest.mark.parametrize("backend", BACKENDS)
def test_tico_ddp_equals_single_process(ranks, backend):
    single_loss, single_state, *single_grads = run_case(backend, *global_views(), gather=False)
    for rank, result in enumerate(ranks):
        loss, state, *grads = result[backend]
        # float64: the gathered rows are the same numbers in the same order as the concatenation
        torch.testing.assert_close(loss, single_loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(state, single_state, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, single_grads):
            assert got.abs().sum() > 0
            torch.testing.assert_close(got, WORLD * local_slice(want, rank), rtol=1e-10, atol=1e-12)
