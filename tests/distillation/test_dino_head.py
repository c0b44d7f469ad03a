"""DINOProjectionHead: lightly's modules, state_dict keys and same-seed initialisation, a forward
equal to a float64 formula, and its two halves through the fused DINO loss equal to the head's
outputs through the unfused one."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastssl
from fastssl.distillation import DINOProjectionHead

from helpers import assert_within, gamma, unit_roundoff

SIZES = dict(input_dim=6, hidden_dim=10, bottleneck_dim=4, output_dim=9)


def head(**options):
    with warnings.catch_warnings():  # weight_norm's deprecation, as lightly's head warns
        warnings.simplefilter("ignore", FutureWarning)
        return DINOProjectionHead(**SIZES, **options)


def lightly_draws(batch_norm):
    """lightly's draw order, re-done: the three nn.Linear (default init), then a truncated normal
    for each of their weights in module order, then the last layer's nn.Linear; weight_norm
    makes g = ‖v‖ row-wise, then g = 1. Returns the parameters by lightly's state_dict key."""
    dims = [(6, 10), (10, 10), (10, 4)]
    linears = [nn.Linear(d_in, d_out, bias=i == 2 or not batch_norm) for i, (d_in, d_out) in enumerate(dims)]
    for linear in linears:
        nn.init.trunc_normal_(linear.weight, std=0.02, a=-2.0, b=2.0)
    last = nn.Linear(4, 9, bias=False)
    indices = (0, 3, 6) if batch_norm else (0, 2, 4)  # Linear, [BN], GELU per block
    params = {}
    for index, linear in zip(indices, linears):
        params[f"layers.{index}.weight"] = linear.weight.detach()
        if linear.bias is not None:
            params[f"layers.{index}.bias"] = torch.zeros_like(linear.bias)
    params["last_layer.weight_g"] = torch.ones(9, 1)
    params["last_layer.weight_v"] = last.weight.detach()
    return params


@pytest.mark.parametrize("batch_norm", [False, True])
def test_state_dict_and_same_seed_initialisation_equal_lightlys(batch_norm):
    torch.manual_seed(3)
    state = head(batch_norm=batch_norm).state_dict()
    torch.manual_seed(3)
    expected = lightly_draws(batch_norm)
    batch_norm_keys = {f"layers.{i}.{name}" for i in (1, 4) for name in
                       ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")} if batch_norm else set()
    assert set(state) == set(expected) | batch_norm_keys
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


def test_norm_last_layer_and_freezing():
    assert not head().last_layer.weight_g.requires_grad
    assert head(norm_last_layer=False).last_layer.weight_g.requires_grad
    model = head(freeze_last_layer=2)
    model(torch.randn(3, 6)).sum().backward()
    model.cancel_last_layer_gradients(current_epoch=2)
    assert model.last_layer.weight_v.grad is not None
    model.cancel_last_layer_gradients(current_epoch=1)
    assert model.last_layer.weight_v.grad is None and model.layers[0].weight.grad is not None


def test_forward_equals_float64_formula_and_its_halves():
    torch.manual_seed(0)
    model = head(norm_last_layer=False)
    with torch.no_grad():
        model.last_layer.weight_g.uniform_(0.5, 2.0)  # g ≠ 1: the weight's scale is part of it
    x = torch.randn(5, 6)
    params = {k: v.double() for k, v in model.state_dict().items()}
    hidden = x.double()
    for index in (0, 2):
        hidden = F.gelu(hidden @ params[f"layers.{index}.weight"].T + params[f"layers.{index}.bias"])
    bottleneck = hidden @ params["layers.4.weight"].T + params["layers.4.bias"]
    v = params["last_layer.weight_v"]
    weight = params["last_layer.weight_g"] * v / v.norm(dim=1, keepdim=True)
    expected = F.normalize(bottleneck, dim=1) @ weight.T
    u = unit_roundoff(torch.float32)
    # |outputs| ≤ g·1 (unit rows): the normalisations' and the last product's roundings, a few u each
    bound = (gamma(4, u) + 8 * u) * params["last_layer.weight_g"].abs().max()
    assert_within(model(x), expected, bound, "forward")
    assert_within(model.features(x) @ model.last_layer_weight.T, model(x), bound, "halves")


def test_fused_dino_on_its_halves_equals_dino_on_its_outputs():
    """float64: the fused loss and its gradients to every head parameter equal the unfused one's."""
    torch.manual_seed(1)
    model = head(norm_last_layer=False).double()
    crops = [torch.randn(3, 6, dtype=torch.float64) for _ in range(3)]
    teacher = [torch.randn(3, 9, dtype=torch.float64) for _ in range(2)]
    center = torch.zeros(1, 1, 9, dtype=torch.float64)
    params = [p for p in model.parameters()]
    fused = fastssl.dino(teacher, [model.features(c) for c in crops], center,
                         last_layer_weight=model.last_layer_weight)
    fused_grads = torch.autograd.grad(fused, params)
    unfused = fastssl.dino(teacher, [model(c) for c in crops], center)
    unfused_grads = torch.autograd.grad(unfused, params)
    # two float64 evaluations of one formula, in other orders: each result's error is within γ of
    # the longest sum either makes (a weight gradient's over every student row × prototype, after
    # a logit's D-term product and a K-term LSE) relative to the magnitudes summed (≤ 1 + |result|:
    # probabilities ≤ 1 times unit-norm features)
    u, terms = unit_roundoff(torch.float64), 3 * 3 * SIZES["output_dim"] + SIZES["bottleneck_dim"] + SIZES["output_dim"]
    assert_within(fused, unfused, 2 * gamma(terms, u) * (1 + unfused.abs()), "loss")
    for got, want in zip(fused_grads, unfused_grads):
        assert want.abs().sum() > 0
        assert_within(got, want, 2 * gamma(terms, u) * (1 + want.abs().max()), "gradients")
