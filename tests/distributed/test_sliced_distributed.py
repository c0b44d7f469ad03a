"""SIGReg, LeJEPA, LeWM and VISReg on two gloo processes with ``gather_distributed``: the mean over
ranks of the losses is the single-process loss on the concatenated batch and each rank's gradient
is W × the single-process gradient of its rows (lightly's convention, fastssl.runtime.distributed).
SIGReg's slices come from rank 0 (lightly broadcasts them): the ranks seed their generators
differently here and still match one process seeded as rank 0."""

import pytest
import torch

import fastssl
from fastssl.sliced import random_unit_columns

from test_distributed import BATCH, WORLD, results_of_ranks

pytestmark = pytest.mark.distributed

DIM = 5
BACKENDS = ("reference", "torch")
RANK0_SEED = 100


def global_inputs():
    g = torch.Generator().manual_seed(97531)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {"proj": rand(WORLD * BATCH, DIM), "views": rand(2, WORLD * BATCH, DIM),
            "local": rand(3, WORLD * BATCH, DIM), "global": rand(2, WORLD * BATCH, DIM),
            "embeddings": rand(WORLD * BATCH, 4, DIM), "predicted": rand(WORLD * BATCH, 3, DIM)}


BATCH_DIM = {"proj": 0, "views": 1, "local": 1, "global": 1, "embeddings": 0, "predicted": 0}


def local_part(name, value, rank):
    return value.narrow(BATCH_DIM[name], rank * BATCH, BATCH).clone()


def cases(backend):
    """name → (the inputs it differentiates, loss(inputs, gather))."""
    return {
        "sigreg": (("proj",), lambda d, g: fastssl.SIGReg(num_vectors=6, gather_distributed=g, backend=backend)(
            d["proj"])),
        "sigreg_views": (("views",), lambda d, g: fastssl.SIGReg(knots=7, num_vectors=4, gather_distributed=g,
                                                                 backend=backend)(d["views"])),
        "lejepa": (("local", "global"), lambda d, g: fastssl.LeJEPALoss(
            0.4, gather_distributed=g, sigreg_num_vectors=6, backend=backend)(local_proj=d["local"],
                                                                              global_proj=d["global"])),
        "lewm": (("embeddings", "predicted"), lambda d, g: fastssl.LeWMLoss(
            0.3, gather_distributed=g, sigreg_num_vectors=6, backend=backend)(
                predicted=d["predicted"], target=d["embeddings"][:, 1:], embeddings=d["embeddings"])),
        "visreg": (("local", "global"), lambda d, g: fastssl.VISRegLoss(
            0.6, num_slices=9, gather_distributed=g, backend=backend)(local_proj=d["local"], global_proj=d["global"])),
    }


def run_case(data, backend, name, gather, seed):
    names, loss_fn = cases(backend)[name]
    inputs = {key: value.clone().requires_grad_(key in names) for key, value in data.items()}
    torch.manual_seed(seed)
    loss = loss_fn(inputs, gather)
    return (loss.detach(), *torch.autograd.grad(loss, [inputs[key] for key in names]))


def seed_of(name, rank):
    """SIGReg's slices are broadcast: ranks may differ. VISReg draws per rank (lightly's design):
    equal seeds give every rank the slices of one process."""
    return RANK0_SEED if name == "visreg" else RANK0_SEED + rank


def worker(rank):
    data = {key: local_part(key, value, rank) for key, value in global_inputs().items()}
    results = {(backend, name): run_case(data, backend, name, True, seed_of(name, rank))
               for backend in BACKENDS for name in cases(backend)}
    torch.manual_seed(RANK0_SEED + rank)
    results["slices"] = random_unit_columns(DIM, 6, data["proj"], shared=True)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return results_of_ranks(worker, tmp_path_factory, "ddp_sliced")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(cases("torch")))
def test_ddp_equals_single_process(ranks, backend, name):
    single_loss, *single_grads = run_case(global_inputs(), backend, name, False, RANK0_SEED)
    names = cases(backend)[name][0]
    mean_loss = sum(result[(backend, name)][0] for result in ranks) / WORLD
    torch.testing.assert_close(mean_loss, single_loss, rtol=1e-10, atol=1e-12)
    for rank, result in enumerate(ranks):
        if name.startswith("sigreg"):  # every rank's loss is the global one (all-reduced sums)
            torch.testing.assert_close(result[(backend, name)][0], single_loss, rtol=1e-10, atol=1e-12)
        for key, got, want in zip(names, result[(backend, name)][1:], single_grads):
            assert got.abs().sum() > 0
            torch.testing.assert_close(got, WORLD * local_part(key, want, rank), rtol=1e-8, atol=1e-10)


def test_ddp_sigreg_slices_come_from_rank_zero(ranks):
    torch.manual_seed(RANK0_SEED)
    rank0 = random_unit_columns(DIM, 6, torch.zeros(1, dtype=torch.float64))
    for result in ranks:
        assert torch.equal(result["slices"], rank0)
    torch.manual_seed(RANK0_SEED + 1)
    assert not torch.equal(random_unit_columns(DIM, 6, torch.zeros(1, dtype=torch.float64)), rank0)
