"""The clustering family's ``torch.library`` ops: schemas and fakes, written once (the codes and
assignments carry no gradient)."""
from __future__ import annotations

from typing import Callable

import torch

from ..runtime import library
from ..runtime.dtypes import compute_dtype


def define_sinkhorn_op(name: str, impl: Callable) -> Callable:
    """Register ``fastssl::<name>`` with ``reference.sinkhorn``'s signature (codes carry no gradient)."""
    # The fake is contiguous, whatever the layout of the scores, as every backend's codes are.
    return library.define(
        name, "(Tensor scores, int iterations, float epsilon, Tensor? row_marginals, Tensor? col_marginals, "
              "float tolerance, bool gather_distributed) -> Tensor", impl, lambda scores, *_: scores.new_empty(scores.shape))


def define_kmeans_assign_op(name: str, impl: Callable) -> Callable:
    """Register ``fastssl::<name>`` with ``reference.kmeans_assign``'s signature."""

    def fake(x, centroids):
        return x.new_empty(x.shape[0], dtype=torch.long), x.new_empty(x.shape[0], dtype=compute_dtype(x, centroids))

    return library.define(name, "(Tensor x, Tensor centroids) -> (Tensor, Tensor)", impl, fake)
