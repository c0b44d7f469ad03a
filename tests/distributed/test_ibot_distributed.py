"""iBOT's and DINO's all-reduces on two gloo processes: the iBOT center update averages the ranks'
batch means (lightly's ``center_mean``), and DINOv2's Sinkhorn-Knopp teacher sums its prototype and
total masses over the ranks, each rank getting its rows of the codes of all ranks' rows — also with
a different number of masked patches per rank (DINOv2 all-reduces that count)."""

import pytest
import torch

import fastssl
import fastssl.functional as fn

from oracles import dinov2_sinkhorn_teacher64, ibot_from_targets64, lightly_dino64
from test_distributed import WORLD, results_of_ranks

pytestmark = pytest.mark.distributed

K = 13
BACKENDS = ("reference", "torch")


def rank_inputs(rank):
    """Rank ``rank``'s (M_r, K) teacher and student rows of its masked patches (M_0 ≠ M_1), its
    (2, 3, 4) mask, and two DINO teacher and student crops (3, K)."""
    g = torch.Generator().manual_seed(97 + rank)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask.view(-1)[torch.randperm(24, generator=g)[:5 + 4 * rank]] = True
    rows = int(mask.sum())
    teacher = 0.3 * torch.randn(rows, K, generator=g, dtype=torch.float64)
    student = torch.randn(rows, K, generator=g, dtype=torch.float64)
    crops = [0.3 * torch.randn(3, K, generator=g, dtype=torch.float64) for _ in range(2)]
    students = [torch.randn(3, K, generator=g, dtype=torch.float64) for _ in range(3)]
    return teacher, student, mask, crops, students


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's results: backend → (mean-mode loss, its updated center, Sinkhorn-mode iBOT
    loss, Sinkhorn-mode DINO loss)."""
    return results_of_ranks(worker, tmp_path_factory, "ddp_ibot")


def rank_losses(rank, backend):
    teacher, student, mask, crops, students = rank_inputs(rank)
    criterion = fastssl.IBOTPatchLoss(output_dim=K, center_momentum=0.7, backend=backend).double()
    mean_loss = criterion(teacher, student, mask).detach()
    sinkhorn_loss = fn.ibot_patch(teacher, student, None, mask, 0.07, 0.1, center_mode="sinkhorn_knopp",
                                  backend=backend)
    dino_loss = fn.dino(crops, students, None, 0.07, center_mode="sinkhorn_knopp", backend=backend)
    return mean_loss, criterion.center.value.clone(), sinkhorn_loss, dino_loss


def worker(rank):
    return {backend: rank_losses(rank, backend) for backend in BACKENDS}


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_center_and_sinkhorn_teachers_over_ranks(ranks, backend):
    inputs = [rank_inputs(rank) for rank in range(WORLD)]
    assert inputs[0][0].shape[0] != inputs[1][0].shape[0]  # the ranks hold different counts
    mean_of_means = sum(teacher.mean(dim=0, keepdim=True) for teacher, *_ in inputs) / WORLD
    teachers = [teacher for teacher, *_ in inputs]
    dino_rows = [torch.cat(crops) for *_, crops, _ in inputs]
    for rank, result in enumerate(ranks):
        mean_loss, center, sinkhorn_loss, dino_loss = result[backend]
        teacher, student, mask, crops, students = inputs[rank]
        # the loss itself is local; the center is the all-reduced mean (float64: to rounding)
        torch.testing.assert_close(mean_loss, ibot_from_targets64(torch.softmax(teacher / 0.04, -1), student, mask,
                                                                  0.1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(center, 0.3 * mean_of_means, rtol=1e-12, atol=1e-14)
        codes = dinov2_sinkhorn_teacher64(teacher, 0.07, rows_of_ranks=teachers)
        torch.testing.assert_close(sinkhorn_loss, ibot_from_targets64(codes, student, mask, 0.1),
                                   rtol=1e-10, atol=1e-12)
        dino_codes = dinov2_sinkhorn_teacher64(dino_rows[rank], 0.07, rows_of_ranks=dino_rows).view(2, 3, K)
        # lightly_dino64 on targets: a softmax at temperature 1 of their logs gives them back
        expected = lightly_dino64(list(dino_codes.log()), students, torch.zeros(K, dtype=torch.float64), 1.0, 0.1)
        torch.testing.assert_close(dino_loss, expected, rtol=1e-10, atol=1e-12)
        # a single process on this rank's rows alone gives other codes: the sums did cross ranks
        alone = fn.ibot_patch(teacher, student, None, mask, 0.07, 0.1, center_mode="sinkhorn_knopp", backend=backend)
        assert (alone - sinkhorn_loss).abs() > 1e-6
