"""lightly's ``lightly.loss.msn_loss`` path: ``MSNLoss`` and the module's public helpers
``prototype_probabilities``, ``sharpen`` and ``sinkhorn``, with lightly's signatures and results."""
import torch
import torch.nn.functional as F
from torch import Tensor

from .distillation import MSNLoss
from .distillation.msn import balanced_probabilities
from .runtime.validation import check_float_tensor, check_int_at_least, check_positive

__all__ = ["MSNLoss", "prototype_probabilities", "sharpen", "sinkhorn"]


def prototype_probabilities(queries: Tensor, prototypes: Tensor, temperature: float) -> Tensor:
    """softmax(queries · prototypesᵀ / temperature) over the prototypes: queries (B, D),
    prototypes (K, D) → (B, K) rows summing to 1, in the inputs' dtype (lightly's formula)."""
    check_float_tensor("queries", queries, ndim=2)
    check_float_tensor("prototypes", prototypes, ndim=2)
    if queries.shape[1] != prototypes.shape[1]:
        raise ValueError(f"queries and prototypes must have the same feature dimension, got queries "
                         f"{tuple(queries.shape)} and prototypes {tuple(prototypes.shape)}")
    return F.softmax(torch.matmul(queries, prototypes.T) / temperature, dim=1)


def sharpen(probabilities: Tensor, temperature: float) -> Tensor:
    """p^(1/temperature) renormalised over each row: (B, K) → (B, K), temperature in (0, 1]
    (lower sharpens more), in the input's dtype (lightly's formula)."""
    check_float_tensor("probabilities", probabilities, ndim=2)
    check_positive("temperature", temperature)
    sharpened = probabilities ** (1.0 / temperature)
    return sharpened / sharpened.sum(dim=1, keepdim=True)


@torch.no_grad()
def sinkhorn(probabilities: Tensor, iterations: int = 3, gather_distributed: bool = False) -> Tensor:
    """MSN's Sinkhorn balancing of (B, K) probabilities: ``iterations`` rounds of each prototype's
    mass to 1/K then each row's to 1; ``iterations`` ≤ 0 returns the input unchanged, as lightly
    does. With ``gather_distributed`` the sums run over every rank's rows. Returns (B, K) rows
    summing to 1 in the input's dtype (computed in the log domain, float32 or float64)."""
    check_float_tensor("probabilities", probabilities, ndim=2)
    if iterations <= 0:
        return probabilities
    check_int_at_least("iterations", iterations, 1)
    return balanced_probabilities(probabilities.log(), iterations, gather_distributed).to(probabilities.dtype)
