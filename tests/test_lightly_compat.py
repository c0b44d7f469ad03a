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
]


@pytest.mark.parametrize("make,argument", GATHERING)
def test_gathering_without_torch_distributed_raises_like_lightly(make, argument, monkeypatch):
    make()  # this torch has torch.distributed
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"{argument} is True but torch.distributed is not available"):
        make()
