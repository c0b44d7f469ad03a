"""DSERegularizer on every backend against lightly 1.6's formula in float64 (its k-means and random
draws re-implemented), within bounds derived from the computation; lightly's errors and edge cases."""
import pytest
import torch

import fastssl.functional as fn
from fastssl.regularizer import DSERegularizer
from fastssl.regularizers.kmeans import kmeans
from fastssl.regularizers.torch_backend import effective_dimensionality

from helpers import (FLOAT_DTYPES, HALF_DTYPES, assert_within, backend_params, dse_bounds,
                     half_error_within_twice_reference, unit_roundoff)
from oracles import lightly_dse64, lightly_kmeans64


def tokens(b, n, d, dtype=torch.float32, seed=0):
    """(B, N, D) tokens around a few shared directions, so the clusters mean something."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, d, generator=g, dtype=torch.float64)
    picks = torch.randint(4, (b, n), generator=g)
    x = centres[picks] + 0.4 * torch.randn(b, n, d, generator=g, dtype=torch.float64)
    return x.to(dtype).requires_grad_(True)


SETTINGS = [
    pytest.param((4, 10, 6), dict(local_clusters=2, global_clusters=6), id="N>D-ragged-groups"),
    pytest.param((3, 7, 16), dict(), id="D>N-defaults"),
    pytest.param((2, 12, 5), dict(normalize=False, weight=0.3, max_kmeans_iters=2), id="unnormalised"),
]


@pytest.mark.parametrize("backend", backend_params("dse"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,settings", SETTINGS)
def test_dse_equals_float64_with_lightlys_draws(backend, dtype, shape, settings):
    representations = tokens(*shape, dtype)
    torch.manual_seed(7)
    loss = DSERegularizer(**settings, backend=backend)(representations)
    after = torch.rand(4)
    exact_representations = representations.detach().double().requires_grad_(True)
    torch.manual_seed(7)
    exact, parts = lightly_dse64(exact_representations, **settings)
    assert torch.equal(torch.rand(4), after), "lightly's k-means draws, in its order and number"
    value_bound, grad_bound = dse_bounds(representations, parts, settings.get("weight", 1.0),
                                         settings.get("normalize", True), unit_roundoff(dtype))
    assert_within(loss, exact, value_bound, "loss")
    (grad,) = torch.autograd.grad(loss, (representations,))
    (exact_grad,) = torch.autograd.grad(exact, (exact_representations,))
    assert_within(grad, exact_grad, grad_bound, "gradient")


def test_kmeans_reseeds_empty_clusters_with_lightlys_draws():
    points = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 0.0]] * 5)  # two distinct points, three clusters
    torch.manual_seed(1)
    centroids, labels = kmeans(points, 3, 5, 1e-4)
    after = torch.rand(2)
    torch.manual_seed(1)
    exact_centroids, exact_labels = lightly_kmeans64(points.double(), 3, 5, 1e-4)
    assert torch.equal(torch.rand(2), after)
    assert torch.equal(labels, exact_labels) and torch.equal(centroids.double(), exact_centroids)


@pytest.mark.parametrize("backend", backend_params("dse"))
def test_one_token_and_zero_weight_are_lightlys(backend):
    single = torch.randn(1, 1, 5, requires_grad=True)
    loss = DSERegularizer(backend=backend)(single)  # no cluster of two tokens, no other centroid
    loss.backward()
    assert loss.item() == -1.0 and torch.isfinite(single.grad).all()  # exp(H) / min(1, D) with H = 0
    zero = DSERegularizer(weight=0, backend=backend)(single)
    assert zero.item() == 0.0 and not zero.requires_grad  # lightly's new_zeros(())


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs_within_twice_the_references_own_error(dtype):
    representations = tokens(2, 9, 6, dtype)
    settings = dict(local_clusters=2, global_clusters=4)
    torch.manual_seed(3)
    loss = fn.dse(representations, **settings, backend="torch")
    torch.manual_seed(3)
    exact, _ = lightly_dse64(representations.detach().double(), **settings)
    torch.manual_seed(3)
    reference_half = fn.dse(representations.detach(), **settings, backend="reference")
    assert loss.dtype == torch.float32
    half_error_within_twice_reference(loss, reference_half, exact)


def test_effective_dimensionality_op_and_its_gradient():
    for shape in ((7, 4), (3, 6)):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(effective_dimensionality.op, (x,))
        assert torch.autograd.gradcheck(effective_dimensionality, (x,))


BAD_INPUTS = [
    pytest.param(lambda: DSERegularizer(weight=-1), r"weight must be >= 0, got -1.", id="weight"),
    pytest.param(lambda: DSERegularizer(local_clusters=0), r"local_clusters must be >= 1, got 0.", id="local"),
    pytest.param(lambda: DSERegularizer(global_clusters=0), r"global_clusters must be >= 1, got 0.", id="global"),
    pytest.param(lambda: DSERegularizer(max_kmeans_iters=0), r"max_kmeans_iters must be >= 1, got 0.", id="iters"),
    pytest.param(lambda: DSERegularizer(tol=0), r"tol must be > 0, got 0.", id="tol"),
    pytest.param(lambda: DSERegularizer()(torch.randn(2, 4, 3, 3)),
                 r"representations must have shape \(batch_size, num_tokens, dim\), got torch.Size\(\[2, 4, 3, 3\]\).",
                 id="feature-map-unflattened"),
    pytest.param(lambda: DSERegularizer()(torch.randn(2, 0, 3)),
                 r"representations must have non-empty batch, token, and feature dimensions", id="empty"),
]


@pytest.mark.parametrize("call,message", BAD_INPUTS)
def test_bad_input_raises_lightlys_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_feature_map_flattened_as_lightlys_docstring_shows_is_its_tokens():
    features = torch.randn(2, 5, 3, 4)  # (B, C, H, W)
    torch.manual_seed(0)
    from_map = DSERegularizer(global_clusters=6)(features.flatten(2).transpose(1, 2))
    torch.manual_seed(0)
    from_tokens = DSERegularizer(global_clusters=6)(features.permute(0, 2, 3, 1).reshape(2, 12, 5))
    assert torch.equal(from_map, from_tokens)
