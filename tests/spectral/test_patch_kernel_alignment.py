"""PatchKernelAlignmentLoss on every backend against lightly 1.6's formula in float64, within a
bound derived from the computation; lightly's token subsampling and errors."""
import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl import PatchKernelAlignmentLoss

from helpers import FLOAT_DTYPES, U32, assert_within, backend_params, gamma, unit_roundoff
from oracles import lightly_patch_kernel_alignment64


def features(b, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    teacher = 0.7 * student + 0.5 * torch.randn(b, n, d, generator=g, dtype=torch.float64)
    return student.to(dtype).requires_grad_(True), teacher.to(dtype)


def alignment_bounds(student, teacher, mask, u=U32):
    """(|δL|, normwise gradient bound). The centred rows X_c = (X − μ)w are off by γ_{N+2}(|X| + |μ|)
    entrywise (an N-term mean, a difference), so every inner product ⟨K_a, K_b⟩ (from N×N or D×D
    products alike) is off by κ = 2γ_{max(N,D)+4} + 2γ_{N+2} + γ_{N²} times ⟨M_a M_aᵀ, M_b M_bᵀ⟩,
    M = (|X| + |μ|)w; CKA = ⟨K_s, K_t⟩/(‖K_s‖‖K_t‖) by that over ‖K_s‖‖K_t‖ plus |CKA| times half
    the relative errors of the two squared norms; the mean over images adds γ_B."""
    s, t = student.detach().double(), teacher.detach().double()
    b, n, d = s.shape
    w = torch.ones(b, n, dtype=torch.float64) if mask is None else (~mask).double()
    count = w.sum(dim=1, keepdim=True).clamp(min=1)
    kappa = 2 * gamma(max(n, d) + 4, u) + 2 * gamma(n + 2, u) + gamma(n * n, u)

    def parts(x):
        mean = (x * w[:, :, None]).sum(dim=1, keepdim=True) / count[:, :, None]
        centred, magnitude = (x - mean) * w[:, :, None], (x.abs() + mean.abs()) * w[:, :, None]
        return centred @ centred.transpose(1, 2), magnitude @ magnitude.transpose(1, 2)

    (k_s, m_s), (k_t, m_t) = parts(s), parts(t)
    inner = lambda a, c: (a * c).sum(dim=(1, 2))  # noqa: E731
    norms = inner(k_s, k_s).sqrt() * inner(k_t, k_t).sqrt()
    cka = inner(k_s, k_t) / norms
    relative = (kappa * (inner(m_s, m_t) / norms + 0.5 * cka.abs() * (inner(m_s, m_s) / inner(k_s, k_s)
                                                                       + inner(m_t, m_t) / inner(k_t, k_t))))
    value = relative.mean().item() + gamma(b, u) * (1 - cka).abs().mean().item() + 2 * u
    return value, 4 * relative.max().item()


@pytest.mark.parametrize("backend", backend_params("patch_kernel_alignment"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(3, 10, 6), (2, 7, 16)], ids=["D<N", "N<D"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["all-tokens", "masked"])
def test_patch_kernel_alignment_equals_float64(backend, dtype, shape, with_mask):
    student, teacher = features(*shape, dtype)
    mask = (torch.rand(*shape[:2], generator=torch.Generator().manual_seed(1)) < 0.3) if with_mask else None
    loss = PatchKernelAlignmentLoss(backend=backend)(student, teacher, mask)
    exact_student = student.detach().double().requires_grad_(True)
    exact = lightly_patch_kernel_alignment64(exact_student, teacher, mask)
    value_bound, kappa = alignment_bounds(student, teacher, mask, unit_roundoff(dtype))
    assert_within(loss, exact, value_bound, "loss")
    (grad,) = torch.autograd.grad(loss, (student,))
    (exact_grad,) = torch.autograd.grad(exact, (exact_student,))
    assert_within(grad, exact_grad, kappa * exact_grad.abs().max().item(), "gradient")


@pytest.mark.parametrize("backend", backend_params("patch_kernel_alignment"))
def test_token_subsampling_draws_as_lightly_and_too_few_tokens_give_a_differentiable_zero(backend):
    student, teacher = features(2, 12, 5)
    torch.manual_seed(7)
    loss = PatchKernelAlignmentLoss(max_tokens=6, backend=backend)(student, teacher)
    torch.manual_seed(7)  # lightly's draw: torch.rand(B, N), the max_tokens smallest scores per image
    kept = torch.rand(2, 12).topk(6, dim=1, largest=False).indices[:, :, None].expand(-1, -1, 5)
    exact = lightly_patch_kernel_alignment64(torch.gather(student.detach(), 1, kept), torch.gather(teacher, 1, kept))
    assert_within(loss, exact, alignment_bounds(torch.gather(student.detach(), 1, kept),
                                                torch.gather(teacher, 1, kept), None)[0], "loss")
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 0] = False  # one valid token per image: no kernel to compare
    empty = PatchKernelAlignmentLoss(backend=backend)(student, teacher, mask)
    empty.backward()
    assert empty.item() == 0.0 and student.grad.abs().max() == 0


BAD_INPUTS = [
    pytest.param(lambda: PatchKernelAlignmentLoss(max_tokens=1), r"max_tokens must be >= 2 or None but is 1",
                 id="max_tokens"),
    pytest.param(lambda: fn.patch_kernel_alignment(torch.randn(4, 5), torch.randn(4, 5)),
                 r"student_features must have shape \(B, N, D\)", id="2d"),
    pytest.param(lambda: fn.patch_kernel_alignment(torch.randn(2, 4, 5), torch.randn(2, 4, 6)),
                 r"must have the same shape", id="shapes"),
    pytest.param(lambda: fn.patch_kernel_alignment(torch.randn(2, 4, 5), torch.randn(2, 4, 5), torch.zeros(2, 4)),
                 r"mask must have dtype torch.bool", id="mask-dtype"),
    pytest.param(lambda: fn.patch_kernel_alignment(torch.randn(2, 4, 5), torch.randn(2, 4, 5),
                                                   torch.zeros(2, 3, dtype=torch.bool)),
                 r"mask must have shape \(2, 4\)", id="mask-shape"),
]


@pytest.mark.parametrize("call,message", BAD_INPUTS)
def test_bad_input_raises_lightlys_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
    assert fastssl.PatchKernelAlignmentLoss is PatchKernelAlignmentLoss
