"""lightly 1.6's constructor behaviour that is not a formula: checks that raise like lightly's."""
import pytest
import torch

import fastssl

GATHERING = [
    pytest.param(lambda: fastssl.NTXentLoss(gather_distributed=True), "gather_distributed", id="NTXentLoss"),
    pytest.param(lambda: fastssl.BarlowTwinsLoss(gather_distributed=True), "gather_distributed", id="BarlowTwinsLoss"),
    pytest.param(lambda: fastssl.VICRegLoss(gather_distributed=True), "gather_distributed", id="VICRegLoss"),
    pytest.param(lambda: fastssl.SwaVLoss(sinkhorn_gather_distributed=True), "sinkhorn_gather_distributed",
                 id="SwaVLoss"),
    pytest.param(lambda: fastssl.VICRegLLoss(gather_distributed=True), "gather_distributed", id="VICRegLLoss"),
    pytest.param(lambda: fastssl.MSNLoss(gather_distributed=True), "gather_distributed", id="MSNLoss"),
    pytest.param(lambda: fastssl.PMSNLoss(gather_distributed=True), "gather_distributed", id="PMSNLoss"),
    pytest.param(lambda: fastssl.PMSNCustomLoss(lambda m: m, gather_distributed=True), "gather_distributed",
                 id="PMSNCustomLoss"),
]


@pytest.mark.parametrize("make,argument", GATHERING)
def test_gathering_without_torch_distributed_raises_like_lightly(make, argument, monkeypatch):
    make()  # this torch has torch.distributed
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"{argument} is True but torch.distributed is not available"):
        make()


def center_mean64(x, dim):
    """lightly's center_mean: the mean over ``dim``, kept (one process)."""
    return x.double().mean(dim=dim, keepdim=True)


def test_center_module_is_lightlys():
    center = fastssl.Center(size=(1, 1, 6), momentum=0.8)
    assert center.dim == (0, 1) and center.value.shape == (1, 1, 6) and list(center.state_dict()) == ["center"]
    x = torch.randn(3, 5, 6)
    center.update(x)
    torch.testing.assert_close(center.value.double(), 0.2 * center_mean64(x, (0, 1)), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"Unknown mode 'median'. Valid modes are \['mean'\]."):
        fastssl.Center(size=(1, 6), mode="median")


def test_dino_center_mode_and_update_center_take_lightlys_inputs():
    loss = fastssl.DINOLoss(output_dim=4, center_momentum=0.5)
    assert loss.center_mode == "mean" and list(loss.state_dict()) == ["center"]
    # lightly's message, listing the modes fastssl accepts (beyond lightly: DINOv2's Sinkhorn-Knopp)
    with pytest.raises(ValueError, match=r"Unknown mode 'max'. Valid modes are \['mean', 'sinkhorn_knopp'\]."):
        fastssl.DINOLoss(center_mode="max")
    stacked = torch.randn(2, 3, 4)
    loss.update_center(stacked)
    torch.testing.assert_close(loss.center.double(), 0.5 * center_mean64(stacked, (0, 1)), rtol=1e-6, atol=1e-7)
    flat = torch.randn(3, 4)  # lightly averages over the first two dims of whatever it is given
    before = loss.center.clone()
    loss.update_center(flat)
    torch.testing.assert_close(loss.center.double(), 0.5 * before.double() + 0.5 * flat.double().mean(),
                               rtol=1e-6, atol=1e-7)


def test_dino_with_one_view_raises_lightlys_error():
    with pytest.raises(ValueError, match=r"DINOLoss requires at least two views in total .* but got 1 teacher "
                                         r"view\(s\) and 1 student view\(s\)"):
        fastssl.DINOLoss(output_dim=4)([torch.randn(3, 4)], [torch.randn(3, 4)])


def test_ntxent_has_lightlys_public_attributes():
    loss = fastssl.NTXentLoss(temperature=0.3)
    assert loss.eps == 1e-8 and isinstance(loss.cross_entropy, torch.nn.CrossEntropyLoss)
    assert loss.cross_entropy.reduction == "mean" and loss.temperature == 0.3


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_results_exactly_zero_in_lightly_are_exactly_zero(backend):
    # One sample, two views: each NT-Xent row's only candidate is its positive (−log 1 = 0); a
    # one-class DINO head: the softmax is exactly 1. lightly returns an exact 0 (and 0 gradients).
    out0, out1 = torch.randn(1, 8, requires_grad=True), torch.randn(1, 8, requires_grad=True)
    loss = fastssl.NTXentLoss(backend=backend)(out0, out1)
    loss.backward()
    assert loss.item() == 0.0 and str(loss.item()) == "0.0" and out0.grad.abs().max() == 0
    students = [torch.randn(3, 1, requires_grad=True) for _ in range(2)]
    loss = fastssl.DINOLoss(output_dim=1, backend=backend)([torch.randn(3, 1) for _ in range(2)], students)
    loss.backward()
    assert loss.item() == 0.0 and str(loss.item()) == "0.0" and students[0].grad.abs().max() == 0
