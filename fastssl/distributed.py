"""``torch.distributed`` helpers with the gradients the losses need (re-exported from
``fastssl.runtime.distributed``, where they live; the example trainers use them)."""
from .runtime.distributed import all_reduce_no_grad, all_reduce_sum, gather, gather_no_grad, is_initialized, rank, world_size

__all__ = ["is_initialized", "world_size", "rank", "gather", "gather_no_grad", "all_reduce_sum", "all_reduce_no_grad"]
