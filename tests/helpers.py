"""Helpers shared by the tests."""
import os

import pytest
import torch

BACKENDS_ON_CPU = ["reference", "torch"]


def backend_params(op: str):
    """One ``pytest.param`` per backend the registry's manifest lists for ``op``, id = backend:
    triton ones marked ``triton`` (run under the interpreter here), native ones ``native`` (the
    extension is built once per session, or the test is skipped with the reason)."""
    from fastssl.runtime.registry import MANIFEST

    marks = {"triton": [pytest.mark.triton], "native": [pytest.mark.native]}
    return [pytest.param(backend, id=backend, marks=marks.get(backend, [])) for backend in MANIFEST[op]]

# (dtype, rtol, atol) against float64 formulas, with readable ids.
DTYPE_TOLERANCES = [
    pytest.param(torch.float32, 1e-5, 1e-6, id="fp32"),
    pytest.param(torch.float64, 1e-10, 1e-12, id="fp64"),
]
HALF_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


def half_error_within_twice_reference(result_half, result_ref_half, exact, factor=2.0, floor=1e-6):
    """flash-attention's rule: |fastssl(half) − exact| ≤ factor · |reference(half) − exact| (+ floor).

    ``result_half``: the backend run on half-precision inputs; ``result_ref_half``: the reference
    computed in that dtype (inputs and arithmetic); ``exact``: float64 on the same (rounded) inputs.
    """
    err = (result_half.double() - exact).abs().max().item()
    ref_err = (result_ref_half.double() - exact).abs().max().item()
    assert err <= factor * ref_err + floor, f"error {err:.3g} > {factor} × reference error {ref_err:.3g}"


def one_intra_op_thread_unless_asked():
    """Module fixture body: run on one intra-op thread (tiny tensors only pay synchronisation on a
    shared 2-core machine, 10-50× for long Sinkhorn loops), unless OMP_NUM_THREADS names a count,
    as ``.ci/portability`` does to run these tests on other thread counts too."""
    if os.environ.get("OMP_NUM_THREADS"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
