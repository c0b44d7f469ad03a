"""VICRegL: values and gradients against a float64 formula of lightly 1.6's VICRegLLoss
(tests/oracles.py), the nearest-neighbour op against brute force, half precision, lightly's
module surface and its errors."""
import math

import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl import VICRegLLoss
from fastssl.redundancy import reference, torch_backend
from fastssl.runtime import blocks

from helpers import (BACKENDS_ON_CPU, HALF_DTYPES, as_leaves64, assert_within, half_error_within_twice_reference,
                     vicregl_bounds, vicregl_inputs)
from oracles import lightly_vicregl64, lightly_vicregl_terms64

DEFAULTS = dict(lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=1e-4)

# (batch, global dim, local dim, grid sizes, global views): ragged sizes, grids of two sizes,
# B < D and B > D (both paths of the covariance op), counts above and below num_matches.
SHAPES = [
    pytest.param(dict(batch=6, dim=11, local_dim=5, grid_sizes=(4, 4, 2, 2, 2)), id="B6-D11-C5-2x4x4+3x2x2"),
    pytest.param(dict(batch=13, dim=7, local_dim=9, grid_sizes=(5, 5, 3)), id="B13-D7-C9-2x5x5+3x3"),
    pytest.param(dict(batch=5, dim=9, local_dim=3, grid_sizes=(3, 3, 3), n_global=3), id="B5-D9-C3-3x3x3"),
    pytest.param(dict(batch=4, dim=6, local_dim=4, grid_sizes=(3, 3)), id="B4-D6-C4-no-local"),
    # globals of two sizes, locals alternating: runs of one view each for the batched search
    pytest.param(dict(batch=7, dim=5, local_dim=6, grid_sizes=(4, 3, 2, 3, 2)), id="B7-D5-C6-4x4+3x3+2x2+3x3+2x2"),
]
PARAMS = [
    pytest.param(dict(DEFAULTS, alpha=0.75, num_matches=(20, 4)), id="lightly-defaults"),
    pytest.param(dict(lambda_param=2.0, mu_param=3.0, nu_param=4.0, eps=1e-3, alpha=0.3, num_matches=(5, 2)),
                 id="weights-matches5-2"),
    pytest.param(dict(DEFAULTS, alpha=0.0, num_matches=(None, -1)), id="local-only-all-cells"),
]


def _call(inputs, params, backend, **options):
    return fn.vicregl(*inputs, **params, backend=backend, **options)


def _leaves(inputs):
    """The differentiable tensors of VICRegL's inputs, in a fixed order."""
    global_views, _, local_views, _ = inputs
    return [t for pair in list(global_views) + list(local_views) for t in pair]


def _as64(inputs):
    """The same inputs as float64 leaves (grids as float64 constants)."""
    global_views, global_grids, local_views, local_grids = inputs
    leaves = iter(as_leaves64(_leaves(inputs)))
    return ([(next(leaves), next(leaves)) for _ in global_views], [g.double() for g in global_grids],
            [(next(leaves), next(leaves)) for _ in local_views], [g.double() for g in local_grids])


def _assert_within_oracle(loss, inputs, params, grads=None):
    inputs64 = _as64(inputs)
    loss_params = {k: params[k] for k in DEFAULTS}
    terms = lightly_vicregl_terms64(*inputs64, **params)
    expected = lightly_vicregl64(*inputs64, **params)
    leaves64 = _leaves(inputs64)
    value_bound, grad_bounds = vicregl_bounds(leaves64, terms, loss_params)
    assert_within(loss, expected, value_bound, "loss")
    if grads is not None:
        exact = torch.autograd.grad(expected.sum(), leaves64)
        for got, want, bound in zip(grads, exact, grad_bounds):
            assert got.dtype == torch.float32
            assert_within(got, want, bound, "gradient")


# ============================================================================================
# Values and gradients
# ============================================================================================
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_vicregl_fp32_equals_float64_formula(shape, params, backend):
    inputs = vicregl_inputs(**shape, grad=True)
    loss = _call(inputs, params, backend)
    assert loss.dtype == torch.float32 and loss.shape == (1,)
    _assert_within_oracle(loss, inputs, params, torch.autograd.grad(loss.sum(), _leaves(inputs)))


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("algorithm", ["gram", "direct"])
def test_vicregl_both_covariance_paths(algorithm, backend):
    inputs = vicregl_inputs(batch=7, dim=10, local_dim=12, grid_sizes=(3, 3, 2), grad=True)
    params = dict(DEFAULTS, alpha=0.5, num_matches=(4, 2))
    loss = _call(inputs, params, backend, algorithm=algorithm)
    _assert_within_oracle(loss, inputs, params, torch.autograd.grad(loss.sum(), _leaves(inputs)))


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_vicregl_float64_in_float64_out(backend):
    inputs = vicregl_inputs(dtype=torch.float64, grad=True)
    loss = _call(inputs, dict(DEFAULTS), backend)
    assert loss.dtype == torch.float64 and loss.shape == (1,)
    expected = lightly_vicregl64(*inputs)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0.0)
    for got, want in zip(torch.autograd.grad(loss.sum(), _leaves(inputs)),
                         torch.autograd.grad(expected.sum(), _leaves(inputs))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * want.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_vicregl_gradcheck(backend):
    inputs = vicregl_inputs(batch=3, dim=4, local_dim=3, grid_sizes=(3, 2, 2), dtype=torch.float64, grad=True)
    global_views, global_grids, local_views, local_grids = inputs
    leaves = _leaves(inputs)

    def loss(*tensors):
        pairs = [tuple(tensors[i:i + 2]) for i in range(0, len(tensors), 2)]
        return fn.vicregl(pairs[:len(global_views)], global_grids, pairs[len(global_views):], local_grids, 2.0, 3.0,
                          0.5, 0.6, 1e-3, (3, 2), backend=backend)

    assert torch.autograd.gradcheck(loss, leaves)


def test_vicregl_terms_are_separable():
    """α = 1 keeps the global VICReg of the views alone, α = 0 the local matches alone: a swapped
    weight or a missing half shows."""
    inputs = vicregl_inputs(dtype=torch.float64)
    whole = fn.vicregl(*inputs, alpha=0.3)
    global_only, local_only = fn.vicregl(*inputs, alpha=1.0), fn.vicregl(*inputs, alpha=0.0)
    assert global_only > 0 and local_only > 0 and not torch.isclose(global_only, local_only)
    torch.testing.assert_close(whole, 0.3 * global_only + 0.7 * local_only, rtol=1e-12, atol=0.0)


def test_vicregl_local_view_order_does_not_matter():
    global_views, global_grids, local_views, local_grids = vicregl_inputs(dtype=torch.float64)
    order = [2, 0, 1]
    loss = fn.vicregl(global_views, global_grids, local_views, local_grids)
    permuted = fn.vicregl(global_views, global_grids, [local_views[i] for i in order], [local_grids[i] for i in order])
    torch.testing.assert_close(permuted, loss, rtol=1e-12, atol=0.0)


def test_vicregl_location_matching_uses_the_grids():
    """Moving one local view's crop changes only which cells are matched by location."""
    global_views, global_grids, local_views, local_grids = vicregl_inputs(dtype=torch.float64)
    moved = [local_grids[0].flip(1)] + local_grids[1:]
    loss = fn.vicregl(global_views, global_grids, local_views, local_grids)
    moved_loss = fn.vicregl(global_views, global_grids, local_views, moved)
    assert not torch.isclose(loss, moved_loss, rtol=1e-6)
    torch.testing.assert_close(moved_loss, lightly_vicregl64(global_views, global_grids, local_views, moved),
                               rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_vicregl_a_view_given_twice_is_skipped_like_lightly(backend):
    """lightly pairs views by identity (``is not``): the same tensors twice as global views give no
    pair with each other; with no local view that is no pair at all, and lightly's 0/0 is NaN."""
    (first, second), grids, local_views, local_grids = vicregl_inputs(dtype=torch.float64)
    twice = [first, first, second]
    loss = fn.vicregl(twice, grids + grids[:1], local_views, local_grids, backend=backend)
    torch.testing.assert_close(loss, lightly_vicregl64(twice, grids + grids[:1], local_views, local_grids),
                               rtol=1e-12, atol=0.0)
    assert torch.isnan(fn.vicregl([first], grids[:1], backend=backend)).all()
    assert torch.isnan(fn.vicregl([first, first], grids[:1] * 2, backend=backend)).all()


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_vicregl_batch_of_two_and_one_cell(backend):
    """The smallest batch VICReg's unbiased variance allows, and 1×1 feature maps (one match)."""
    inputs = vicregl_inputs(batch=2, dim=5, local_dim=3, grid_sizes=(1, 2, 1), grad=True)
    params = dict(DEFAULTS, alpha=0.75, num_matches=(20, 4))
    loss = _call(inputs, params, backend)
    _assert_within_oracle(loss, inputs, params, torch.autograd.grad(loss.sum(), _leaves(inputs)))


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_vicregl_half_inputs(dtype, backend):
    # The grids stay float32, as the transform makes them (autocast touches only the model's
    # outputs): pixel coordinates in bf16 are whole numbers, whose tied distances would let two
    # correct searches pick different cells.
    inputs = vicregl_inputs(batch=9, dim=13, local_dim=6, grid_sizes=(4, 4, 2, 2), dtype=dtype, grad=True,
                            grid_dtype=torch.float32)
    loss = fn.vicregl(*inputs, backend=backend)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    grads = torch.autograd.grad(loss.sum(), _leaves(inputs))
    for g, x in zip(grads, _leaves(inputs)):
        assert g.dtype == dtype and torch.isfinite(g).all()
    inputs64 = _as64(inputs)
    exact = lightly_vicregl64(*inputs64)
    exact_grads = torch.autograd.grad(exact.sum(), _leaves(inputs64))
    in_dtype = lightly_vicregl64(*inputs)  # lightly's own arithmetic in the half dtype
    in_dtype_grads = torch.autograd.grad(in_dtype.sum(), _leaves(inputs))
    half_error_within_twice_reference(loss, in_dtype, exact.detach())
    for g, ref, e in zip(grads, in_dtype_grads, exact_grads):
        half_error_within_twice_reference(g, ref, e)


# ============================================================================================
# The nearest-neighbour op
# ============================================================================================
def _brute_force_neighbors(a, b):
    """Each a point's nearest point of each set of b (and back) by exhaustive float64 search, image
    by image and set by set, ties to the lowest index."""
    results = [[], [], [], []]
    for s in range(b.shape[1]):
        d = ((a.double()[:, :, None] - b[:, s].double()[:, None]) ** 2).sum(-1)
        for result, value in zip(results, (d.argmin(dim=2), d.min(dim=2).values, d.argmin(dim=1), d.min(dim=1).values)):
            result.append(value)
    return [torch.stack(result, dim=1) for result in results]


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("coordinates,offset", [pytest.param(2, 300.0, id="grid-C2-pixels-far-from-0"),
                                                pytest.param(37, 0.0, id="features-C37"),
                                                pytest.param(37, 50.0, id="features-C37-offset50")])
def test_mutual_nearest_neighbors_equal_brute_force(coordinates, offset, backend, monkeypatch):
    """Every block of images (tiny blocks forced), both directions, three sets of b at once, on
    points whose common offset would cancel digits in the matmul form ‖a‖² + ‖b‖² − 2ab were it
    not removed first."""
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 64)
    g = torch.Generator().manual_seed(3)
    a = offset + torch.randn(11, 9, coordinates, generator=g, dtype=torch.float64)
    b = offset + torch.randn(11, 3, 14, coordinates, generator=g, dtype=torch.float64)
    a, b = a.float(), b.float()
    search = reference.mutual_nearest_neighbors if backend == "reference" else torch_backend.mutual_nearest_neighbors
    got = search(a, b)
    want = _brute_force_neighbors(a, b)
    for index, exact in (got[0], want[0]), (got[2], want[2]):
        assert index.dtype == torch.long
        torch.testing.assert_close(index, exact, rtol=0, atol=0)
    for distance, exact in (got[1], want[1]), (got[3], want[3]):
        assert distance.dtype == torch.float32
        # a C-term sum of squares of rounded differences, each within 2u of (|a| + |b|)
        scale = (a.double().abs().amax() + b.double().abs().amax()) ** 2 * coordinates
        assert_within(distance, exact, 8 * coordinates * 2.0 ** -24 * scale, "distance")


# ============================================================================================
# lightly's module surface
# ============================================================================================
def test_vicregl_module_defaults_and_attributes_are_lightlys():
    loss = VICRegLLoss()
    assert (loss.lambda_param, loss.mu_param, loss.nu_param, loss.alpha, loss.gather_distributed, loss.eps,
            loss.num_matches) == (25.0, 25.0, 1.0, 0.75, False, 1e-4, (20, 4))
    assert isinstance(loss.vicreg_loss, fastssl.VICRegLoss) and list(loss.state_dict()) == []
    assert (loss.vicreg_loss.lambda_param, loss.vicreg_loss.mu_param, loss.vicreg_loss.nu_param,
            loss.vicreg_loss.eps, loss.vicreg_loss.gather_distributed) == (25.0, 25.0, 0.5, 1e-4, False)
    # lightly's positional order
    loss = VICRegLLoss(1.0, 2.0, 3.0, 0.4, False, 0.01, (5, 3))
    assert (loss.lambda_param, loss.mu_param, loss.nu_param, loss.alpha, loss.eps, loss.num_matches) == (
        1.0, 2.0, 3.0, 0.4, 0.01, (5, 3))


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_vicregl_module_equals_functional_with_lightlys_keywords(backend):
    global_views, global_grids, local_views, local_grids = vicregl_inputs()
    module = VICRegLLoss(2.0, 3.0, 4.0, 0.4, eps=1e-3, num_matches=(6, 3), backend=backend)
    got = module(global_view_features=global_views, global_view_grids=global_grids,
                 local_view_features=local_views, local_view_grids=local_grids)
    want = fn.vicregl(global_views, global_grids, local_views, local_grids, 2.0, 3.0, 4.0, 0.4, 1e-3, (6, 3),
                      backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert module(global_views, global_grids).shape == (1,)


# ============================================================================================
# Errors (lightly's ValueErrors word for word; InputError where lightly asserts)
# ============================================================================================
def test_length_mismatches_raise_lightlys_errors():
    global_views, global_grids, local_views, local_grids = vicregl_inputs()
    loss = VICRegLLoss()
    with pytest.raises(ValueError, match=r"^global_view_features and global_view_grids must have same length but "
                                         r"found 2 and 1\.$"):
        loss(global_views, global_grids[:1])
    with pytest.raises(ValueError, match=r"^local_view_features and local_view_grids must have same length but "
                                         r"found 3 and 2\.$"):
        loss(global_views, global_grids, local_views, local_grids[:2])
    with pytest.raises(ValueError, match=r"^local_view_features and local_view_grids must either both be set or "
                                         r"None but found <class 'list'> and <class 'NoneType'>\.$"):
        loss(global_views, global_grids, local_views)


def test_batch_of_one_raises_like_lightlys_assert():
    global_views, global_grids, local_views, local_grids = vicregl_inputs(batch=1)
    with pytest.raises(AssertionError, match=r"global_view_features\[0\]\[0\].*\(1, 11\)"):
        fn.vicregl(global_views, global_grids, local_views, local_grids)


@pytest.mark.parametrize("change,match", [
    pytest.param(lambda v: ([(v[0][0][0], v[0][0][1][:, :3])] + v[0][1:], v[1], v[2], v[3]),
                 r"global_view_grids\[0\] must have the \(batch, height, width\) of global_view_features\[0\]\[1\]",
                 id="grid-of-another-size"),
    pytest.param(lambda v: (v[0], v[1], [(v[2][0][0][:, :4], v[2][0][1])] + v[2][1:], v[3]),
                 r"global_view_features\[0\]\[0\] and local_view_features\[0\]\[0\] must have the same shape",
                 id="global-dims-differ"),
    pytest.param(lambda v: (v[0], v[1], [(v[2][0][0], v[2][0][1][..., :3])] + v[2][1:], v[3]),
                 r"local_view_features\[0\]\[1\] must have the batch .* and the feature dimension",
                 id="local-dims-differ"),
    pytest.param(lambda v: ([(v[0][0][0], v[0][0][1][0])] + v[0][1:], v[1], v[2], v[3]),
                 r"global_view_features\[0\]\[1\] must have 4 dimensions", id="local-map-not-4d"),
    pytest.param(lambda v: ([], [], v[2], v[3]), r"global_view_features must hold at least one view",
                 id="no-global-view"),
])
def test_bad_shapes_raise_naming_the_argument(change, match):
    with pytest.raises(ValueError, match=match):
        fn.vicregl(*change(vicregl_inputs()))


def test_non_pair_view_raises_type_error():
    global_views, global_grids, _, _ = vicregl_inputs()
    with pytest.raises(TypeError, match=r"global_view_features\[1\] must be a \(global_features, local_features\)"):
        fn.vicregl([global_views[0], global_views[1][0]], global_grids)


@pytest.mark.parametrize("num_matches,error", [pytest.param((0, 4), ValueError, id="zero"),
                                               pytest.param((20, -2), ValueError, id="minus-two"),
                                               pytest.param((20, 2.5), TypeError, id="float"),
                                               pytest.param(20, TypeError, id="not-a-pair")])
def test_bad_num_matches_raise(num_matches, error):
    with pytest.raises(error, match="num_matches"):
        VICRegLLoss(num_matches=num_matches)
    with pytest.raises(error, match="num_matches"):
        fn.vicregl(*vicregl_inputs(), num_matches=num_matches)


@pytest.mark.parametrize("name", ["lambda_param", "mu_param", "nu_param", "eps"])
def test_negative_hyper_parameter_raises(name):
    with pytest.raises(ValueError, match=name):
        VICRegLLoss(**{name: -1.0})
    with pytest.raises(ValueError, match=name):
        fn.vicregl(*vicregl_inputs(), **{name: -1.0})


def test_non_finite_alpha_and_unknown_backend_raise():
    with pytest.raises(ValueError, match="alpha"):
        VICRegLLoss(alpha=math.inf)
    with pytest.raises(ValueError, match="backend"):
        fn.vicregl(*vicregl_inputs(), backend="no-such-backend")


def test_exports():
    assert fastssl.VICRegLLoss is VICRegLLoss and fastssl.vicregl is fn.vicregl
    assert "VICRegLLoss" in fastssl.__all__ and "vicregl" in fastssl.__all__ and "vicregl" in fn.__all__
    assert fastssl.reference.mutual_nearest_neighbors is reference.mutual_nearest_neighbors
