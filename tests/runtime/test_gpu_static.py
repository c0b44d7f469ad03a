"""Static GPU checks of the Triton kernels, compiled here for sm_90 and sm_80: every choice the
launchers can make fits the card's shared memory, spills no registers beyond a stated bound, and
uses tensor cores where its dtype allows (float64 has DMMA on both). Skipped where ptxas is not
available. Issue 17 extends this table to every kernel."""
import pytest
import torch

from gpu_static import SHARED_MEMORY_LIMIT, compile_in_subprocess, ptxas_unavailable_reason

pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(ptxas_unavailable_reason() is not None, reason=str(ptxas_unavailable_reason()))]

TRITON_TYPE = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Spill bytes per thread (stores + loads) allowed: ptxas emits up to 32 B of local-memory traffic
# at 16-wide tiles whatever the warp count (at 48-96 registers: not register pressure); the
# regression this guards against is the KB-sized spilling of 4-warp 64-wide tiles (up to 1.9 KB).
SPILL_BOUND_BYTES = 64
CAPABILITIES = (90, 80)
# (input dtype, statistics dtype): what the redundancy launchers pass (half inputs: float32 statistics)
PRODUCT_DTYPES = ((torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float32))


def _product_spec(input_dtype, stats_dtype, gram, capability, block):
    """``_product_frobenius_kernel`` as ``squared_norms`` launches it at tile side ``block``."""
    from kernels import redundancy

    constexprs = dict(U_ROW=0, V_ROW=1, GRAM=gram, TWO_PRODUCTS=True, SYMMETRIC=False, SCALED=True,
                      BLOCK=block, BLOCK_REDUCED=redundancy.BLOCK_REDUCED)
    signature = {"u_ptr": "*" + TRITON_TYPE[input_dtype], "v_ptr": "*" + TRITON_TYPE[input_dtype],
                 "stats_ptr": "*" + TRITON_TYPE[stats_dtype], "partial_ptr": "*" + TRITON_TYPE[stats_dtype],
                 "batch": "i32", "dim": "i32", "columns": "i32", **{name: "constexpr" for name in constexprs}}
    return {"module": "kernels.redundancy", "kernel": "_product_frobenius_kernel", "signature": signature,
            "constexprs": constexprs, "capability": capability, "options": redundancy.product_launch_options(block)}


def _tiles(stats_dtype):
    """Every tile side ``squared_norms`` can pick for this dtype, smallest first."""
    from kernels import redundancy

    return sorted({redundancy._tile(size, stats_dtype) for size in (1, 17, 33, 1 << 20)})


def _cases(largest_only):
    return [(dtypes, gram, capability, block) for dtypes in PRODUCT_DTYPES for gram in (True, False)
            for capability in CAPABILITIES for block in _tiles(dtypes[1])[-1 if largest_only else 0:]]


def _check(case, compiled):
    (_, stats_dtype), _, capability, _ = case
    assert compiled.shared_bytes <= SHARED_MEMORY_LIMIT[capability], compiled.shared_bytes
    assert compiled.spill_bytes <= SPILL_BOUND_BYTES, compiled.spill_bytes
    if stats_dtype == torch.float64:  # fp32 products are IEEE FMA by design (issue 17 item 5: TF32 behind a switch)
        assert compiled.uses_tensor_cores


def test_redundancy_product_kernel_fits_the_card_at_its_largest_tile():
    """The largest tile of each dtype: the most shared memory and registers (the default suite)."""
    cases = _cases(largest_only=True)
    for case, compiled in zip(cases, compile_in_subprocess([_product_spec(*c[0], *c[1:]) for c in cases])):
        _check(case, compiled)


@pytest.mark.slow
def test_redundancy_product_kernel_fits_the_card_at_every_tile():
    cases = _cases(largest_only=False)
    for case, compiled in zip(cases, compile_in_subprocess([_product_spec(*c[0], *c[1:]) for c in cases])):
        _check(case, compiled)
