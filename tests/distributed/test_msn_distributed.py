"""MSN / PMSN on two gloo processes with ``gather_distributed``: lightly all-reduces only the
Sinkhorn's sums, so each rank's targets are its rows of the targets of the gathered batch
(one process on the concatenation, for equal batches), while the cross-entropy and the mean
anchor distribution stay local. Checked against lightly's iteration with its all-reduces
written out (tests/oracles.py), for unequal batches too (lightly scales each rank's columns by
its own batch)."""

import pytest
import torch

import fastssl.functional as fn

from oracles import lightly_msn_loss, lightly_msn_targets
from test_distributed import results_of_ranks

pytestmark = pytest.mark.distributed

DIM, PROTOTYPES, VIEWS = 6, 5, 2
BACKENDS = ("reference", "torch")
BATCHES = {"equal": (3, 3), "unequal": (2, 4)}
LOSSES = {"msn": (fn.msn, {}, "msn"), "pmsn": (fn.pmsn, {"power_law_exponent": 0.5}, 0.5)}


def rank_inputs(batches):
    """Per rank: anchors (V·B_r, D) and targets (B_r, D); prototypes (K, D) shared; float64."""
    g = torch.Generator().manual_seed(97)
    targets = [torch.randn(b, DIM, generator=g, dtype=torch.float64) for b in batches]
    anchors = [t.repeat(VIEWS, 1) + 0.5 * torch.randn(VIEWS * t.shape[0], DIM, generator=g, dtype=torch.float64)
               for t in targets]
    return anchors, targets, torch.randn(PROTOTYPES, DIM, generator=g, dtype=torch.float64)


def run_case(loss, backend, anchors, targets, prototypes):
    function, arguments, _ = LOSSES[loss]
    anchors, prototypes = anchors.clone().requires_grad_(), prototypes.clone().requires_grad_()
    value = function(anchors, targets, prototypes, gather_distributed=True, backend=backend, **arguments)
    codes = fn.msn_targets(targets, prototypes.detach(), gather_distributed=True, backend=backend)
    return (value.detach(), codes, *torch.autograd.grad(value, (anchors, prototypes)))


def worker(rank):
    results = {}
    for batches_name, batches in BATCHES.items():
        anchors, targets, prototypes = rank_inputs(batches)
        for loss in LOSSES:
            for backend in BACKENDS:
                results[batches_name, loss, backend] = run_case(loss, backend, anchors[rank], targets[rank],
                                                                prototypes)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return results_of_ranks(worker, tmp_path_factory, "ddp_msn")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("batches", BATCHES)
def test_msn_ddp_equals_lightlys_gather(ranks, batches, loss, backend):
    anchors, targets, prototypes = rank_inputs(BATCHES[batches])
    _, _, regularization = LOSSES[loss]
    codes = lightly_msn_targets(targets, prototypes)
    if batches == "equal":  # the gathered targets are one process's on the concatenated batch
        single = fn.msn_targets(torch.cat(targets), prototypes, backend=backend)
        torch.testing.assert_close(torch.cat(codes), single, rtol=1e-12, atol=1e-15)
    for rank, (value, got_codes, *grads) in enumerate(result[batches, loss, backend] for result in ranks):
        leaves = [anchors[rank].clone().requires_grad_(), prototypes.clone().requires_grad_()]
        expected = lightly_msn_loss(leaves[0], codes[rank], leaves[1], regularization=regularization)
        # float64 on both sides: the log-domain and linear-domain iterations agree to a few ulps
        torch.testing.assert_close(got_codes, codes[rank], rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-14)
        for got, want in zip(grads, torch.autograd.grad(expected, leaves)):
            assert want.abs().sum() > 0
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
