"""roi_resample_to_grid (lightly 1.6's cross-view helper for PatchKernelAlignmentLoss, on
torchvision's aligned roi_align) against a float64 transcription of roi_align's per-sample loop,
within a bound derived from the computation; lightly's errors and its own two test cases."""
import pytest
import torch

import fastssl
from fastssl.dense_relational_utils import roi_resample_to_grid

from helpers import FLOAT_DTYPES, assert_within, gamma, unit_roundoff
from oracles import roi_align_aligned64

# boxes on quarter pixels (exact in every dtype): inside, partly outside, wider than the map,
# an output grid finer and coarser than the box (1 and several samples per bin).
BOXES = [
    ([[0.0, 0.0, 7.0, 5.0], [1.25, 0.5, 4.75, 3.25]], 3, 4),
    ([[-1.75, -0.5, 3.25, 6.5], [5.5, 2.25, 9.75, 4.0]], 5, 2),
    ([[2.0, 1.0, 6.0, 3.0], [0.0, 0.0, 7.0, 5.0]], 8, 9),
]


def feature_map(batch, channels, height, width, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=g, dtype=torch.float64).to(dtype)


def axis_error(boxes, axis, out, u):
    """|δ| of a sample coordinate start + p·bin + (i + ½)·bin/G along ``axis`` (0: x, 1: y): about
    eight roundings (half-pixel offsets, extent, bin, the products and sums), each of a quantity
    at most M = |edge₀| + |edge₁| + 1 — per box, (B,)."""
    magnitude = boxes[:, axis].abs() + boxes[:, axis + 2].abs() + 1
    return 3 * gamma(8, u) * magnitude.double()


def max_samples(boxes, out_h, out_w):
    """The most samples per bin along an axis, G = ceil(extent / out), over the boxes."""
    extent_y, extent_x = (boxes[:, 3] - boxes[:, 1]).double(), (boxes[:, 2] - boxes[:, 0]).double()
    return int(torch.ceil(torch.maximum(extent_y / out_h, extent_x / out_w)).max().clamp(min=1).item())


def value_bound(fm, boxes, out_h, out_w, u):
    """out = R F Cᵀ with interpolation matrices whose rows are averages (Σ ≤ 1). A coordinate off by
    δ moves a sample's bilinear value by ≤ 2·max|F|·δ (the interpolant's slope; no sample of these
    boxes sits at the −1 / H cut-off, where it is discontinuous), the weights' own roundings and the
    ≤ 2G-term scatter sums add γ_{2G+3} per axis, the H·W-term contraction γ_{H+W+2}."""
    height, width = fm.shape[-2:]
    samples = max_samples(boxes, out_h, out_w)
    dy, dx = axis_error(boxes, 1, out_h, u), axis_error(boxes, 0, out_w, u)
    per_box = 2 * (dy + dx) + 2 * gamma(2 * samples + 3, u) + gamma(height + width + 2, u)
    return (fm.detach().double().abs().amax(dim=(1, 2, 3)) * per_box)[:, None, None]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("box_list, out_h, out_w", BOXES)
def test_values_and_gradient_match_roi_align64(box_list, out_h, out_w, dtype):
    u = unit_roundoff(dtype)
    boxes = torch.tensor(box_list, dtype=dtype)
    fm = feature_map(2, 3, 5, 7, dtype).requires_grad_(True)
    out = roi_resample_to_grid(fm, boxes, out_h, out_w)
    assert out.shape == (2, out_h * out_w, 3) and out.dtype == dtype
    exact_fm = fm.detach().double().requires_grad_(True)
    exact = roi_align_aligned64(exact_fm, boxes, out_h, out_w)
    assert_within(out, exact, value_bound(fm, boxes, out_h, out_w, u))

    g = torch.Generator().manual_seed(1)
    upstream = torch.randn(exact.shape, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, fm, upstream.to(dtype))
    (exact_grad,) = torch.autograd.grad(exact, exact_fm, upstream)
    # grad = Aᵀg for the linear map out = A F: every entry of A = R ⊗ C is off by ≤ δ_y + δ_x + 2γ
    # (+ their product), and at most out_h·out_w outputs read a pixel; the contraction adds
    # γ_{out_h+out_w+2} of Σ A (the gradient of Σ out).
    (reads,) = torch.autograd.grad(roi_align_aligned64(exact_fm, boxes, out_h, out_w).sum(), exact_fm)
    dy, dx = axis_error(boxes, 1, out_h, u), axis_error(boxes, 0, out_w, u)
    weight_error = gamma(2 * max_samples(boxes, out_h, out_w) + 3, u)
    entry = (dy + dx + 2 * weight_error + (dy + weight_error) * (dx + weight_error))[:, None, None, None]
    bound = upstream.abs().max() * (out_h * out_w * entry + gamma(out_h + out_w + 2, u) * reads)
    assert_within(grad, exact_grad, bound, "gradients")


def test_linear_map_gives_its_value_at_each_bin_centre():
    """Bilinear interpolation of a linear function is exact and a bin's samples are symmetric about
    its centre, so on F(y, x) = a·y + b·x + c an interior box gives F at the bin centres (pixel
    (h, w) sits at (h + ½, w + ½) in box coordinates)."""
    height, width, a, b, c = 6, 8, 0.75, -1.5, 2.0
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    fm = (a * ys + b * xs + c)[None, None]
    x0, y0, x1, y1, out_h, out_w = 1.5, 1.0, 6.5, 5.0, 4, 5
    out = roi_resample_to_grid(fm, torch.tensor([[x0, y0, x1, y1]], dtype=torch.float64), out_h, out_w)
    centre_y = y0 - 0.5 + (torch.arange(out_h, dtype=torch.float64) + 0.5) * (y1 - y0) / out_h
    centre_x = x0 - 0.5 + (torch.arange(out_w, dtype=torch.float64) + 0.5) * (x1 - x0) / out_w
    expected = (a * centre_y[:, None] + b * centre_x[None, :] + c).reshape(1, -1, 1)
    assert_within(out, expected, 64 * unit_roundoff(torch.float64) * (abs(a) * height + abs(b) * width + abs(c)))


def test_lightly_cases():
    """lightly 1.6's own two checks: the output shape, and a box on cell boundaries resampling
    its sub-grid exactly (one sample per bin at a pixel centre)."""
    feat = torch.randn(2, 8, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [4.0, 4.0, 12.0, 12.0]])
    assert roi_resample_to_grid(feat, boxes, out_h=16, out_w=16).shape == (2, 16 * 16, 8)
    grid = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    out = roi_resample_to_grid(grid, torch.tensor([[0.0, 0.0, 2.0, 2.0]]), out_h=2, out_w=2)
    assert torch.equal(out.reshape(1, 2, 2, 1).permute(0, 3, 1, 2), grid[:, :, :2, :2])


def test_gradcheck_float64_and_no_gradient_to_boxes():
    fm = feature_map(2, 2, 4, 5, torch.float64).requires_grad_(True)
    boxes = torch.tensor([[0.25, -0.5, 4.5, 3.75], [1.0, 1.0, 3.0, 2.5]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: roi_resample_to_grid(f, boxes, 3, 2), (fm,))
    roi_resample_to_grid(fm, boxes, 3, 2).sum().backward()
    assert boxes.grad is None  # as torchvision's roi_align, which has no box gradient


def test_empty_box_and_box_outside_give_zeros_and_batch_of_one_works():
    fm = feature_map(1, 3, 4, 4, torch.float32)
    assert torch.equal(roi_resample_to_grid(fm, torch.tensor([[1.0, 1.0, 1.0, 3.0]]), 2, 2), torch.zeros(1, 4, 3))
    assert torch.equal(roi_resample_to_grid(fm, torch.tensor([[-9.0, -9.0, -6.0, -6.0]]), 2, 2), torch.zeros(1, 4, 3))
    assert torch.equal(roi_resample_to_grid(fm, torch.tensor([[0.0, 0.0, 4.0, 4.0]]), 4, 4),
                       fm.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("fm_shape, boxes_shape, message", [
    ((2, 3, 4), (2, 4), r"feature_map must have shape \(B, C, H, W\) but has shape \(2, 3, 4\)\."),
    ((2, 3, 4, 4), (2, 5), r"boxes must have shape \(B, 4\) but has shape \(2, 5\)\."),
    ((2, 3, 4, 4), (3, 4), r"boxes batch size 3 does not match feature_map batch size 2\."),
])
def test_errors_as_lightly(fm_shape, boxes_shape, message):
    with pytest.raises(ValueError, match=message):
        roi_resample_to_grid(torch.randn(fm_shape), torch.zeros(boxes_shape), 2, 2)


def test_exported_where_lightly_has_it():
    assert fastssl.roi_resample_to_grid is roi_resample_to_grid
    assert fastssl.functional.roi_resample_to_grid is roi_resample_to_grid
