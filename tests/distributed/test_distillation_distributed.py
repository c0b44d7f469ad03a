"""The fused linear distillation core's Sinkhorn-Knopp centring on two gloo processes
(``linear_distillation_loss(..., centering="sinkhorn", gather_distributed=True)``): DINOv2
all-reduces the prototypes' sums, so each rank's targets are its rows of the targets of the
gathered batch. With equal row counts the ranks' mean loss and DDP-averaged gradients are the
single process's on the concatenated batch; with different counts (iBOT's masked patches) each
rank's loss is the float64 formula on its rows of the gathered targets."""

import pytest
import torch
import torch.nn.functional as F

import fastssl.functional as fn
from fastssl.runtime.registry import MANIFEST

from oracles import dinov2_sinkhorn_teacher64
from test_distributed import WORLD, results_of_ranks

pytestmark = pytest.mark.distributed

BACKENDS = tuple(MANIFEST["linear_distillation"])  # triton under the interpreter here
ROWS, UNEVEN_ROWS, DIM, TEACHER_DIM, K = 3, (2, 5), 4, 3, 13
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.07


def features(rows, seed):
    """(student (rows, DIM), teacher (rows, TEACHER_DIM)) features, float64."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, DIM, generator=g, dtype=torch.float64),
            torch.randn(rows, TEACHER_DIM, generator=g, dtype=torch.float64))


def weights():
    """The student's (K, DIM) and the teacher's (K, TEACHER_DIM) last layers, shared by the ranks."""
    g = torch.Generator().manual_seed(5)
    return (torch.randn(K, DIM, generator=g, dtype=torch.float64),
            torch.randn(K, TEACHER_DIM, generator=g, dtype=torch.float64))


def even_batch():
    """The concatenated batch of WORLD × ROWS rows; rank r holds rows [r·ROWS, (r + 1)·ROWS)."""
    return features(WORLD * ROWS, 11)


def uneven_rows(rank):
    return features(UNEVEN_ROWS[rank], 23 + rank)


def loss_and_gradients(student, teacher, backend, gather_distributed):
    """(loss, ∂student, ∂weight) of the Sinkhorn-centred loss (the teacher's side is constant)."""
    weight, teacher_weight = weights()
    student, weight = student.clone().requires_grad_(True), weight.requires_grad_(True)
    loss = fn.linear_distillation_loss(student, teacher, weight, teacher_weight=teacher_weight,
                                       student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP, centering="sinkhorn",
                                       gather_distributed=gather_distributed, backend=backend)
    loss.backward()
    return loss.detach(), student.grad, weight.grad


def rank_results(rank, backend):
    student, teacher = (x[rank * ROWS:(rank + 1) * ROWS] for x in even_batch())
    even = loss_and_gradients(student, teacher, backend, True)
    student, teacher = uneven_rows(rank)
    uneven, _, _ = loss_and_gradients(student, teacher, backend, True)
    local, _, _ = loss_and_gradients(student, teacher, backend, False)
    return even, uneven, local


def worker(rank):
    return {backend: rank_results(rank, backend) for backend in BACKENDS}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Each rank's results: backend → ((loss, ∂student, ∂weight) of its even rows, its loss on
    its uneven rows gathered, and not gathered)."""
    return results_of_ranks(worker, tmp_path_factory, "ddp_linear_distillation")


def distillation64(student, teacher_logits_of_ranks, teacher_logits):
    """The mean cross-entropy of ``student``'s rows to their DINOv2 targets in the gathered batch."""
    weight, _ = weights()
    targets = dinov2_sinkhorn_teacher64(teacher_logits, TEACHER_TEMP, rows_of_ranks=teacher_logits_of_ranks)
    return -(targets * F.log_softmax(student @ weight.T / STUDENT_TEMP, dim=-1)).sum(-1).mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gathered_sinkhorn_equals_one_process_on_the_concatenated_batch(ranks, backend):
    student, teacher = even_batch()
    single_loss, single_student, single_weight = loss_and_gradients(student, teacher, backend, False)
    teacher_weight = weights()[1]
    logits = teacher @ teacher_weight.T
    torch.testing.assert_close(single_loss, distillation64(student, [logits], logits), rtol=1e-10, atol=1e-12)
    results = [r[backend][0] for r in ranks]
    torch.testing.assert_close(sum(loss for loss, _, _ in results) / WORLD, single_loss, rtol=1e-10, atol=1e-12)
    for rank, (_, grad_student, _) in enumerate(results):  # DDP averages: W × the single process's rows
        assert grad_student.abs().sum() > 0
        torch.testing.assert_close(grad_student, WORLD * single_student[rank * ROWS:(rank + 1) * ROWS],
                                   rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(sum(grad for _, _, grad in results) / WORLD, single_weight, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gathered_sinkhorn_with_other_row_counts_per_rank(ranks, backend):
    """Ranks of 2 and 5 rows: each loss is the formula on its rows of the 7 rows' targets, and
    differs from the loss of its rows alone (the sums did cross the ranks)."""
    teacher_weight = weights()[1]
    logits = [uneven_rows(rank)[1] @ teacher_weight.T for rank in range(WORLD)]
    for rank, result in enumerate(ranks):
        _, uneven, local = result[backend]
        student = uneven_rows(rank)[0]
        torch.testing.assert_close(uneven, distillation64(student, logits, logits[rank]), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(local, distillation64(student, [logits[rank]], logits[rank]),
                                   rtol=1e-10, atol=1e-12)
        assert (uneven - local).abs() > 1e-6
