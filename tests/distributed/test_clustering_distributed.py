"""Distributed Sinkhorn of the fused backends (both paths of the torch backend, and the Triton
passes under the interpreter), SwAV with fused prototypes and the mini-batch k-means update:
two gloo processes against one process on the concatenated batch (test_distributed.py covers
the default backend)."""

import pytest
import torch

import fastssl.functional as fn
from fastssl import backends

from test_distributed import results_of_ranks

pytestmark = pytest.mark.distributed

WORLD = 2
BATCH = 5  # rows per rank: odd on purpose
PROTOTYPES = 13


def fused_backends():
    return ["torch"] + ([] if backends.triton_import_reasons() else ["triton"])


def global_inputs():
    g = torch.Generator().manual_seed(4321)
    uniform = torch.rand(WORLD * BATCH, PROTOTYPES, generator=g, dtype=torch.float64) * 2 - 1
    return {
        "cosine": uniform,  # the torch backend's matrix-vector path
        "wide": uniform * 50,  # its log-domain path: scores/ε span 2000
        "col_marginals": torch.rand(WORLD * BATCH, generator=g, dtype=torch.float64) + 0.5,
        "row_marginals": torch.rand(PROTOTYPES, generator=g, dtype=torch.float64) + 0.5,
        "crops": [torch.randn(WORLD * BATCH, 6, generator=g, dtype=torch.float64) for _ in range(3)],
        "prototypes": torch.randn(PROTOTYPES, 6, generator=g, dtype=torch.float64),
        "counts": torch.tensor([0, 3, 1, 0, 2, 7, 0]),  # 7 centroids: some never reached
    }


def sinkhorn_cases(d, backend, gather):
    """name → codes, for every case, on the rows in ``d``."""
    cases = {}
    # SeLA-style custom marginals with a tolerance: the cosine scores stop after 16 iterations,
    # the wide ones (near-hard assignments) run all 10.
    for scores, iterations in (("cosine", 500), ("wide", 10)):
        cases[f"{backend}-{scores}-uniform"] = fn.sinkhorn_knopp(d[scores], 5, 0.05, gather_distributed=gather,
                                                                backend=backend)
        cases[f"{backend}-{scores}-marginals"] = fn.sinkhorn_knopp(
            d[scores], iterations, 0.3, row_marginals=d["row_marginals"], col_marginals=d["col_marginals"],
            tolerance=1e-7, gather_distributed=gather, backend=backend)
    return cases


def swav_with_prototypes(d, gather):
    crops = [c.clone().requires_grad_(True) for c in d["crops"]]
    prototypes = d["prototypes"].clone().requires_grad_(True)
    loss = fn.swav(crops[:2], crops[2:], prototypes=prototypes, sinkhorn_gather_distributed=gather, backend="torch")
    return loss.detach(), torch.autograd.grad(loss, crops + [prototypes])


def kmeans_step(d, gather):
    centroids = d["prototypes"][:7]
    return fn.kmeans_update(d["crops"][0], centroids, d["counts"], gather_distributed=gather)


def local_slice(value, rank):
    if isinstance(value, list):
        return [local_slice(v, rank) for v in value]
    if value.shape[0] != WORLD * BATCH:
        return value  # shared by every rank (prototypes, row marginals)
    return value[rank * BATCH:(rank + 1) * BATCH].clone()


def worker(rank):
    local = {k: local_slice(v, rank) for k, v in global_inputs().items()}
    results = {}
    for backend in fused_backends():
        results.update(sinkhorn_cases(local, backend, gather=True))
    results["swav"] = swav_with_prototypes(local, gather=True)
    results["kmeans"] = kmeans_step(local, gather=True)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return results_of_ranks(worker, tmp_path_factory, "ddp_clustering")


@pytest.mark.parametrize("backend", fused_backends())
def test_ddp_sinkhorn_codes_are_slices_of_global_codes(ranks, backend):
    single = sinkhorn_cases(global_inputs(), backend, gather=False)
    for name, codes in single.items():
        gathered = torch.cat([r[name] for r in ranks])
        torch.testing.assert_close(gathered, codes, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # The cases differ from each other, so equality above is not trivial.
    assert not torch.allclose(single[f"{backend}-cosine-uniform"], single[f"{backend}-cosine-marginals"])


def test_ddp_swav_with_fused_prototypes(ranks):
    single_loss, single_grads = swav_with_prototypes(global_inputs(), gather=False)
    torch.testing.assert_close(sum(r["swav"][0] for r in ranks) / WORLD, single_loss, rtol=1e-10, atol=1e-12)
    for rank, result in enumerate(ranks):
        for got, want in zip(result["swav"][1][:-1], single_grads[:-1]):
            torch.testing.assert_close(got, WORLD * local_slice(want, rank), rtol=1e-8, atol=1e-10)
    # DDP averages the prototypes' gradient over ranks: the mean is the single-process gradient.
    mean_prototype_grad = sum(r["swav"][1][-1] for r in ranks) / WORLD
    torch.testing.assert_close(mean_prototype_grad, single_grads[-1], rtol=1e-8, atol=1e-10)
    assert single_grads[-1].abs().sum() > 0


def test_ddp_kmeans_update_adds_every_rank(ranks):
    centroids, counts = kmeans_step(global_inputs(), gather=False)
    assert (counts > global_inputs()["counts"]).any()
    for result in ranks:
        torch.testing.assert_close(result["kmeans"][0], centroids, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result["kmeans"][1], counts, rtol=0, atol=0)
