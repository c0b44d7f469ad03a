"""torch.distributed helpers with the gradients the losses need.

Convention (the same as lightly's): every rank computes its own loss L_r, and the gathers
deliver to each rank the gradient of Σ_r L_r with respect to its local inputs. DDP then averages
parameter gradients over the W ranks, so training sees the gradient of mean_r L_r — the
single-process loss on the concatenated global batch when every rank holds the same number of rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every rank and returns the local slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.batch = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


class _AllReduceSumWithGrad(torch.autograd.Function):
    """all_reduce(SUM) whose backward is an all_reduce(SUM) of the gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (B, ...) from all ranks along dim 0 → (W·B, ...), autograd-correct.

    Every rank must hold the same B. Outside a process group this returns ``tensor`` unchanged.
    """
    if world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0 (labels, queue entries); no gradient."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks with gradient (backward all-reduces the gradient); identity on one process."""
    if world_size() == 1:
        return tensor
    return _AllReduceSumWithGrad.apply(tensor)


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX} if dist.is_available() else {}


@torch.no_grad()
def all_reduce_no_grad(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``op``: "sum" or "max") of a tensor that needs no gradient; returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=_REDUCE_OPS[op])
    return tensor


@torch.no_grad()
def broadcast_no_grad(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast from rank ``src`` of a tensor that needs no gradient (random draws every
    rank must share); returns it. Identity on one process."""
    if world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor
