"""WMSELoss and Whitening2d on every backend against lightly 1.6's formulas in float64, within bounds
derived from the computation; lightly's buffers, momentum updates, eval mode, random draws and errors."""
import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl import WMSELoss, Whitening2d

from helpers import (FLOAT_DTYPES, HALF_DTYPES, assert_within, backend_params, half_error_within_twice_reference,
                     unit_roundoff, whitening_error, wmse_bounds)
from oracles import lightly_whitening64, lightly_wmse64


def views(batch, dim, num_samples=2, dtype=torch.float32, seed=0):
    """(num_samples · batch, dim): correlated views with correlated, unevenly scaled features."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5 + torch.eye(dim, dtype=torch.float64)
    base = torch.randn(batch, dim, generator=g, dtype=torch.float64) @ mixing
    stacked = torch.cat([base + 0.5 * torch.randn(batch, dim, generator=g, dtype=torch.float64)
                         for _ in range(num_samples)])
    return (stacked + 0.3).to(dtype).requires_grad_(True)


def sub_batches(input, permutations, num_samples, w_size):
    """(I, S, V, w, D), as lightly fills z: sub-batch rows index + v·B of each iteration's permutation."""
    batch = input.shape[0] // num_samples
    return torch.stack([torch.stack([torch.stack([input[index + v * batch] for v in range(num_samples)])
                                     for index in permutation.view(-1, w_size)]) for permutation in permutations])


def lightly_permutations(batch, w_iter, seed):
    torch.manual_seed(seed)
    return torch.stack([torch.randperm(batch) for _ in range(w_iter)])


@pytest.mark.parametrize("backend", backend_params("wmse"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("batch,dim,num_samples,w_iter,w_size,eps",
                         [(24, 5, 2, 1, 12, 0.0), (30, 7, 3, 2, 15, 0.1), (22, 11, 2, 3, 22, 0.0)],
                         ids=["two-subbatches", "three-views-eps", "one-subbatch"])
def test_wmse_equals_float64_with_lightlys_draws(backend, dtype, batch, dim, num_samples, w_iter, w_size, eps):
    input = views(batch, dim, num_samples, dtype)
    criterion = WMSELoss(embedding_dim=dim, eps=eps, w_iter=w_iter, w_size=w_size, num_samples=num_samples,
                         backend=backend).to(dtype)
    torch.manual_seed(11)
    loss = criterion(input)
    after = torch.rand(3)
    permutations = lightly_permutations(batch, w_iter, 11)
    assert torch.equal(torch.rand(3), after), "lightly draws exactly one randperm(B) per iteration"
    exact_input = input.detach().double().requires_grad_(True)
    exact, statistics = lightly_wmse64(exact_input, permutations, num_samples, w_size, eps)
    value_bound, kappa = wmse_bounds(sub_batches(input.detach(), permutations, num_samples, w_size), eps,
                                     u=unit_roundoff(dtype))
    assert_within(loss, exact, value_bound, "loss")
    (grad,) = torch.autograd.grad(loss, (input,))
    (exact_grad,) = torch.autograd.grad(exact, (exact_input,))
    assert_within(grad, exact_grad, kappa * exact_grad.norm().item(), "gradient")
    # lightly's momentum update, once per whitening call, in its order
    momentum, running_mean, running_variance = 0.01, torch.zeros(dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64)
    for mean, covariance in statistics:
        running_mean = momentum * mean + (1 - momentum) * running_mean
        running_variance = momentum * covariance + (1 - momentum) * running_variance
    bound = 4 * unit_roundoff(dtype) * len(statistics) * (running_variance.abs().max() + 1) + 1e-6 * momentum
    assert_within(criterion.whitening.running_mean.view(-1), running_mean, bound, "running_mean")
    assert_within(criterion.whitening.running_variance, running_variance, bound, "running_variance")


@pytest.mark.parametrize("backend", backend_params("whitening"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_whitening2d_train_and_eval_equal_float64(backend, dtype, eps):
    layer = Whitening2d(6, momentum=0.3, eps=eps, backend=backend).to(dtype)
    assert list(layer.state_dict()) == ["running_mean", "running_variance"]
    assert layer.running_mean.shape == (1, 6, 1, 1) and torch.equal(layer.running_variance, torch.eye(6, dtype=dtype))
    x = views(17, 6, 1, dtype)
    buffer = layer.running_variance
    y = layer(x)
    assert layer.running_variance is buffer, "lightly updates its buffers in place"
    exact_x = x.detach().double().requires_grad_(True)
    exact, mean, covariance = lightly_whitening64(exact_x, eps)
    u = unit_roundoff(dtype)
    error = whitening_error(x, eps, u=u)
    assert_within(y, exact, error, "whitened")
    weights = torch.randn(17, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (grad,) = torch.autograd.grad((y.double() * weights).sum(), (x,))
    (exact_grad,) = torch.autograd.grad((exact * weights).sum(), (exact_x,))
    relative = error / torch.linalg.matrix_norm(exact.detach(), ord=2).item()
    assert_within(grad, exact_grad, 4 * relative * exact_grad.norm().item(), "gradient")
    mean64, variance64 = 0.3 * mean.detach(), 0.3 * covariance.detach() + 0.7 * torch.eye(6, dtype=torch.float64)
    assert_within(layer.running_mean.view(-1), mean64, 4 * u * (mean64.abs().max() + 1), "running_mean")
    assert_within(layer.running_variance, variance64, 4 * u * (variance64.abs().max() + 1), "running_variance")
    layer.eval()  # the running statistics whiten, and stay
    z = views(9, 6, 1, dtype, seed=4)
    before = layer.running_variance.clone()
    exact_eval, _, _ = lightly_whitening64(z.detach(), eps, layer.running_mean, layer.running_variance)
    assert_within(layer(z), exact_eval, whitening_error(z, eps, layer.running_mean, layer.running_variance, u), "eval")
    assert torch.equal(layer.running_variance, before)


def test_whitening2d_without_running_stats_has_no_buffers_and_whitens_by_the_batch():
    layer = Whitening2d(4, track_running_stats=False).eval()
    assert list(layer.state_dict()) == [] and not hasattr(layer, "running_mean")
    x = views(12, 4, 1)
    exact, _, _ = lightly_whitening64(x.detach())
    assert_within(layer(x), exact, whitening_error(x), "whitened")


@pytest.mark.parametrize("backend", backend_params("wmse"))
def test_wmse_eval_mode_whitens_with_the_running_statistics(backend):
    criterion = WMSELoss(embedding_dim=4, w_size=10, momentum=0.5, backend=backend)
    assert list(criterion.state_dict()) == ["whitening.running_mean", "whitening.running_variance"]
    assert (criterion.w_iter, criterion.w_size, criterion.num_samples, criterion.num_pairs) == (1, 10, 2, 1)
    assert criterion.loss_f is fn.norm_mse_loss and criterion.whitening.momentum == 0.5
    input = views(20, 4)
    torch.manual_seed(0)
    criterion(input)
    criterion.eval()
    running = (criterion.whitening.running_mean.clone(), criterion.whitening.running_variance.clone())
    torch.manual_seed(1)
    loss = criterion(input)
    exact, _ = lightly_wmse64(input.detach(), lightly_permutations(20, 1, 1), 2, 10, 0.0, *running)
    bound, _ = wmse_bounds(sub_batches(input.detach(), lightly_permutations(20, 1, 1), 2, 10), running=running)
    assert_within(loss, exact, bound, "loss")
    assert torch.equal(criterion.whitening.running_variance, running[1])


@pytest.mark.parametrize("backend", backend_params("wmse"))
def test_a_custom_loss_fn_sees_lightlys_row_order(backend):
    seen = []

    def first_rows(x0, x1):  # depends on the order of the rows: only lightly's z order gives lightly's value
        seen.append((x0.shape, x1.shape))
        return (x0[:3] - x1[:3]).square().sum()

    input = views(12, 3)
    torch.manual_seed(5)
    loss = WMSELoss(embedding_dim=3, w_size=6, loss_fn=first_rows, backend=backend)(input)
    permutation = lightly_permutations(12, 1, 5)[0]
    z = torch.empty(24, 3, dtype=torch.float64)
    for index in permutation.view(-1, 6):
        for v in range(2):
            z[index + v * 12] = lightly_whitening64(input.detach()[index + v * 12])[0]
    exact = (z[:3] - z[12:15]).square().sum()
    bound = 4 * sum(whitening_error(input.detach()[index + v * 12]) for index in permutation.view(-1, 6)
                    for v in range(2)) * z.abs().max().item() * 3 + 1e-6 * exact.item()
    assert_within(loss, exact, bound, "custom loss")
    assert seen == [(torch.Size([12, 3]), torch.Size([12, 3]))]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs_within_twice_the_references_own_error(dtype):
    input = views(16, 4, dtype=dtype)
    permutations = lightly_permutations(16, 1, 0)
    loss, _, _ = fn.wmse(input, w_size=8, permutations=permutations, backend="torch")
    rounded = input.detach().double()
    exact, _ = lightly_wmse64(rounded, permutations, 2, 8)
    reference_half, _, _ = fn.wmse(input.detach(), w_size=8, permutations=permutations, backend="reference")
    assert loss.dtype == torch.float32
    half_error_within_twice_reference(loss, reference_half, exact)


def test_gradcheck_through_whitening_and_the_fused_pairs():
    input = views(12, 3, dtype=torch.float64)
    permutations = torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(s)) for s in range(2)])
    for backend in ("reference", "torch"):
        assert torch.autograd.gradcheck(
            lambda x: fn.wmse(x, w_iter=2, w_size=6, eps=0.1, permutations=permutations, backend=backend)[0], (input,))
        assert torch.autograd.gradcheck(lambda x: fn.whiten(x[:12], backend=backend)[0], (input,))


BAD_INPUTS = [
    pytest.param(lambda: WMSELoss(embedding_dim=8, w_size=15), ValueError,
                 r"w_size should be at least twice the size of embedding_dim to avoid instabiliy", id="w_size"),
    pytest.param(lambda: WMSELoss(embedding_dim=2, w_size=4)(torch.randn(9, 2)), RuntimeError,
                 r"input batch size must be divisible by num_samples", id="divisible"),
    pytest.param(lambda: WMSELoss(embedding_dim=2, w_size=8)(torch.randn(12, 2)), ValueError,
                 r"batch size must be greater than or equal to w_size", id="batch-below-w_size"),
    pytest.param(lambda: WMSELoss(embedding_dim=2, w_size=4)(torch.randn(12, 2)), RuntimeError,
                 r"shape '\[-1, 4\]' is invalid for input of size 6", id="w_size-does-not-divide"),
    pytest.param(lambda: WMSELoss(embedding_dim=2, w_size=4, num_samples=1), ValueError, r"num_samples must be >= 2",
                 id="one-sample"),
    pytest.param(lambda: WMSELoss(embedding_dim=2, w_size=4)(torch.randn(8, 3)), ValueError,
                 r"input must be \(num_samples · B, embedding_dim\)", id="dim"),
    pytest.param(lambda: Whitening2d(3)(torch.randn(5, 3, 1)), ValueError, r"x must have 2 dimensions", id="3d"),
    pytest.param(lambda: fn.whiten(torch.randn(5, 3), running_mean=torch.zeros(3)), ValueError,
                 r"running_mean and running_variance must be given together", id="half-running"),
    pytest.param(lambda: fn.wmse(torch.randn(8, 2), w_size=4, permutations=torch.arange(3)[None]), ValueError,
                 r"permutations must have shape \(4,\)", id="permutations"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_input_raises_lightlys_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_a_singular_sub_batch_raises_lightlys_linalg_error():
    input = torch.ones(8, 2)  # zero covariance: no Cholesky factor, as in lightly
    with pytest.raises(torch.linalg.LinAlgError):
        WMSELoss(embedding_dim=2, w_size=4)(input)
    from fastssl.wmse_loss import Whitening2d as at_lightlys_path, norm_mse_loss
    assert fastssl.WMSELoss is WMSELoss and at_lightlys_path is Whitening2d and norm_mse_loss is fn.norm_mse_loss


def test_the_closed_form_gradient_refuses_a_double_backward():
    x = views(10, 3, 1, torch.float64)
    with pytest.raises(RuntimeError, match="fastssl::whitening is differentiable once"):
        torch.autograd.grad(fn.whiten(x, backend="torch")[0].sum(), (x,), create_graph=True)
