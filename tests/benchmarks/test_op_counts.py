"""The aten ops one training step (forward + backward) of a fused path dispatches, pinned: per-call
overhead must not grow silently. Counted as ``python -m bench.op_counts`` counts (``bench.op_counts``:
profiler ``aten::`` events without an ``aten::`` ancestor, after a warm-up step), for the torch
backend at sizes that take the fused op (contrastive: 400 rows, above the plain-code crossover
``PLAIN_MAX_LOGITS``; BYOL: 300 × 256 entries, above ``PLAIN_MAX_ENTRIES``; redundancy: N < D for the Gram path, N > D for the direct one). The counts
depend on shapes and code paths only: the same with ``ATEN_CPU_CAPABILITY=default`` and any
thread count. A change that lowers a count lowers its pin here."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is a folder of the repository

from bench import core, op_counts, sweep  # noqa: E402
import fastssl.contrastive  # noqa: E402
from fastssl.contrastive import torch_backend as contrastive  # noqa: E402
from fastssl.cosine import torch_backend as cosine  # noqa: E402

# (family, rows per view, D) -> {loss: aten ops of one fwd+bwd}
PINNED = {
    ("contrastive", 200, 16): {"nt_xent": 239, "dcl": 241, "dclw": 279, "directclr": 243, "co2": 56},
    ("contrastive", 800, 16): {"macl": 309},  # above MACL's own dense-path crossover (MACL_PLAIN_MAX_ROWS)
    ("redundancy", 16, 64): {"barlow_twins": 101, "vicreg": 165},
    ("redundancy", 64, 16): {"barlow_twins": 78, "vicreg": 155},
    ("byol", 300, 256): {"negative_cosine_similarity": 26},
    ("regularizers", 128, 32): {"koleo": 36},  # the closed-form op
}


@pytest.mark.parametrize("family, rows, dim", list(PINNED))
def test_fused_paths_dispatch_the_pinned_number_of_aten_ops(family, rows, dim):
    if family == "contrastive":
        assert (2 * rows) ** 2 > contrastive.PLAIN_MAX_LOGITS  # the fused op, not the plain code
        assert "macl" not in PINNED[family, rows, dim] or 2 * rows > fastssl.contrastive.MACL_PLAIN_MAX_ROWS
    if family == "byol":
        assert rows * dim > cosine.PLAIN_MAX_ENTRIES
    counted = {}
    for case in sweep.sweep_cases(family, rows, dim, tuple(PINNED[family, rows, dim])):
        args, leaves = core.make_inputs(case, torch.device("cpu"), torch.float32)
        counted[case.loss] = sum(op_counts.aten_ops(case.make_loss("torch"), args, leaves).values())
    grown = {loss: (count, PINNED[family, rows, dim][loss]) for loss, count in counted.items()
             if count > PINNED[family, rows, dim][loss]}
    assert not grown, f"aten ops per step grew (counted, pinned): {grown}"
    assert counted == PINNED[family, rows, dim], "fewer ops than pinned: lower the pins to the counts"
