"""CAPI's and KoLeo's distributed forms on two gloo processes against one process on the
concatenated batch: CAPI's Sinkhorn balanced over the global batch (``gather_distributed``), and
DINOv3's KoLeo (each rank's rows against every rank's rows, or against their group's), both in
lightly's convention (mean of the ranks' losses = the single-process loss, each rank's gradient
W × the single-process gradient of its rows)."""

import pytest
import torch

import fastssl.functional as fn

from test_distributed import WORLD, results_of_ranks

pytestmark = pytest.mark.distributed

BATCH = 4  # rows per rank: groups of 2 (within a rank), 4 (a rank) and 8 (both ranks)
BACKENDS = ("reference", "torch")
KOLEO_GROUPS = (None, 2, 4, 8)


def global_inputs():
    g = torch.Generator().manual_seed(97531)
    teacher = torch.randn(WORLD * BATCH, 6, 9, generator=g, dtype=torch.float64)
    student = torch.randn(WORLD * BATCH, 3, 9, generator=g, dtype=torch.float64)
    index = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(WORLD * BATCH)])
    rows = torch.randn(WORLD * BATCH, 5, generator=g, dtype=torch.float64)
    return teacher, student, index, rows


def rows_of(tensor, rank):
    return tensor[rank * BATCH:(rank + 1) * BATCH].clone()


def capi_case(backend, teacher, student, index, gather):
    student = student.clone().requires_grad_(True)
    loss = fn.capi(teacher, student, index, gather_distributed=gather, backend=backend)
    return loss.detach(), torch.autograd.grad(loss, student)[0]


def koleo_case(backend, rows, group_size, gather):
    rows = rows.clone().requires_grad_(True)
    loss = fn.koleo(rows, group_size=group_size, gather_distributed=gather, backend=backend)
    return loss.detach(), torch.autograd.grad(loss, rows)[0]


def worker(rank):
    teacher, student, index, rows = (rows_of(t, rank) for t in global_inputs())
    results = {}
    for backend in BACKENDS:
        results["capi", backend] = capi_case(backend, teacher, student, index, True)
        for group_size in KOLEO_GROUPS:
            results["koleo", backend, group_size] = koleo_case(backend, rows, group_size, True)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return results_of_ranks(worker, tmp_path_factory, "ddp_capi_koleo")


def assert_lightly_convention(results, single_loss, single_grad):
    torch.testing.assert_close(sum(loss for loss, _ in results) / WORLD, single_loss, rtol=1e-12, atol=1e-12)
    for rank, (_, grad) in enumerate(results):
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, WORLD * rows_of(single_grad, rank), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capi_ddp_equals_single_process(ranks, backend):
    teacher, student, index, _ = global_inputs()
    single_loss, single_grad = capi_case(backend, teacher, student, index, False)
    assert_lightly_convention([result["capi", backend] for result in ranks], single_loss, single_grad)
    # without the gather, each rank balances its own rows: a different loss (the test can fail)
    local_loss, _ = capi_case(backend, rows_of(teacher, 0), rows_of(student, 0), rows_of(index, 0), False)
    assert not torch.allclose(local_loss, ranks[0]["capi", backend][0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", KOLEO_GROUPS, ids=lambda g: f"G{g}")
def test_koleo_ddp_equals_single_process(ranks, backend, group_size):
    rows = global_inputs()[3]
    unit = torch.nn.functional.normalize(rows, dim=1)
    neighbours = (unit @ unit.T).fill_diagonal_(-2).argmax(dim=1)
    assert (neighbours // BATCH != torch.arange(WORLD * BATCH) // BATCH).any()  # some neighbours on the other rank
    single_loss, single_grad = koleo_case(backend, rows, group_size, False)
    assert_lightly_convention([result["koleo", backend, group_size] for result in ranks], single_loss, single_grad)
