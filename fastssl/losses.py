"""Loss modules: drop-in replacements for lightly 1.6's, holding only hyper-parameters (and the
state lightly keeps: a memory bank, DINO's center) and calling ``fastssl.functional``.

Constructor arguments and defaults match lightly's, so ``from lightly.loss import NTXentLoss``
→ ``from fastssl import NTXentLoss`` keeps the numbers; fastssl's extras are keyword-only.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed, functional, redundancy, reference
from .validation import check_choice, check_float_tensor, check_int_at_least, check_non_negative, check_positive

Tensor = torch.Tensor


class MemoryBankModule(nn.Module):
    """A FIFO queue of past embeddings (MoCo's queue, lightly's ``MemoryBankModule``).

    The bank holds ``size`` rows of dimension D, created at the first call with random
    L2-normalised vectors (D taken from that call's input, unless ``size`` is a (rows, D)
    tuple). ``forward(output, update=True)`` returns ``output`` and a copy of the bank *before*
    ``output`` (detached, gathered from all ranks when ``gather_distributed``) is enqueued. Unlike
    lightly, a batch that crosses the end of the bank wraps around to its start instead of being
    cut, so it is a true FIFO.

    Args:
        size: number of rows, or (rows, D). 0 disables the bank (forward returns None for it).
        gather_distributed: enqueue the batch of every rank.
        feature_dim_first: return the bank as (D, size) (lightly's default) instead of (size, D).
    Shapes: output (B, D) → (output, bank (D, size) or (size, D)).
    """

    def __init__(self, size: Union[int, Sequence[int]] = 65536, gather_distributed: bool = False,
                 feature_dim_first: bool = True):
        super().__init__()
        rows = size if isinstance(size, int) else size[0]
        check_int_at_least("size", rows, 0)
        self.size = (rows,) if isinstance(size, int) else tuple(size)
        self.gather_distributed = gather_distributed
        self.feature_dim_first = feature_dim_first
        self.register_buffer("bank", torch.empty(0), persistent=True)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=True)
        if len(self.size) == 2:
            self._init_bank(self.size[1], torch.device("cpu"), torch.float32)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A bank not yet created (first forward not run) takes the checkpoint's shape.
        saved = state_dict.get(prefix + "bank")
        if saved is not None and self.bank.numel() == 0:
            self.bank = torch.empty_like(saved, device=self.bank_ptr.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _init_bank(self, dim: int, device: torch.device, dtype: torch.dtype) -> None:
        self.bank = F.normalize(torch.randn(self.size[0], dim, device=device, dtype=dtype), dim=-1)
        self.bank_ptr.zero_()

    @torch.no_grad()
    def enqueue(self, batch: Tensor) -> None:
        """Write ``batch`` (B, D) over the oldest rows, wrapping around the end of the bank."""
        if self.gather_distributed:
            batch = distributed.gather_no_grad(batch)
        batch = batch.detach()[-self.size[0]:]  # a batch larger than the bank keeps its newest rows
        start = int(self.bank_ptr)
        rows = (torch.arange(batch.shape[0], device=self.bank.device) + start) % self.size[0]
        self.bank[rows] = batch.to(self.bank.dtype)
        self.bank_ptr[0] = (start + batch.shape[0]) % self.size[0]

    def queue(self, output: Tensor, update: bool = False) -> Optional[Tensor]:
        """The bank (size, D) before ``output`` is enqueued (when ``update``); None if size 0."""
        if self.size[0] == 0:
            return None
        check_float_tensor("output", output, ndim=2)
        if self.bank.numel() == 0:
            self._init_bank(output.shape[1], output.device, output.dtype)
        if self.bank.shape[1] != output.shape[1]:
            raise ValueError(f"output must be (B, {self.bank.shape[1]}) to match the memory bank, "
                             f"got {tuple(output.shape)}")
        bank = self.bank.clone()
        if update:
            self.enqueue(output)
        return bank

    def forward(self, output: Tensor, update: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        bank = self.queue(output, update)
        if bank is not None and self.feature_dim_first:
            bank = bank.T
        return output, bank


class NTXentLoss(nn.Module):
    """NT-Xent / InfoNCE (SimCLR; MoCo with ``memory_bank_size``), as lightly's ``NTXentLoss``.

    ``forward(out0, out1, *more_views, labels=None)`` on (B, D) views; see
    :func:`fastssl.functional.nt_xent` for the formula, ``mode`` ("simclr", "simcse",
    "symmetric"), ``convention`` ("mean", "sum", "mocov3"), SupCon ``labels`` and more than two
    views. With ``memory_bank_size > 0`` the loss is MoCo's: ``out0`` are the queries, ``out1``
    the positive keys, the bank the negatives; ``out1`` (normalised) is enqueued after use
    whenever ``out0`` requires a gradient, as in lightly.

    Example::

        >>> criterion = NTXentLoss(temperature=0.5)
        >>> loss = criterion(model(x0), model(x1))
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, mode: str = "simclr", convention: str = "mean",
                 normalize: bool = True, backend: str = "auto"):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        check_choice("mode", mode, functional.NT_XENT_MODES)
        check_choice("convention", convention, functional.NT_XENT_CONVENTIONS)
        self.memory_bank = MemoryBankModule(memory_bank_size, gather_distributed, feature_dim_first=False)
        self.gather_distributed = gather_distributed
        self.mode, self.convention, self.normalize, self.backend = mode, convention, normalize, backend

    def forward(self, out0: Tensor, out1: Tensor, *more_views: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if self.memory_bank.size[0] == 0:
            return self._loss(out0, out1, *more_views, labels=labels)
        functional.check_views(("out0", "out1"), (out0, out1))
        keys = reference.l2_normalize(out1) if self.normalize else out1
        loss = self._loss(out0, out1, *more_views, labels=labels, negatives=self.memory_bank.queue(keys))
        if out0.requires_grad:  # lightly's rule: a loss without gradient leaves the bank as it is
            self.memory_bank.enqueue(keys)
        return loss

    def _loss(self, *views: Tensor, labels: Optional[Tensor], negatives: Optional[Tensor] = None) -> Tensor:
        return functional.nt_xent(
            *views, temperature=self.temperature, labels=labels, negatives=negatives, mode=self.mode,
            convention=self.convention, gather_distributed=self.gather_distributed,
            normalize=self.normalize, backend=self.backend)


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins, as lightly's ``BarlowTwinsLoss``; see :func:`fastssl.functional.barlow_twins`.

    Example::

        >>> loss = BarlowTwinsLoss()(z_a, z_b)   # z: (N, D)
    """

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False, *,
                 distributed_convention: str = "global", scale_loss: float = 1.0, algorithm: str = "auto",
                 backend: str = "auto"):
        super().__init__()
        self.lambda_param = check_non_negative("lambda_param", lambda_param)
        check_choice("distributed_convention", distributed_convention, ("global", "lightly"))
        self.algorithm = check_choice("algorithm", algorithm, redundancy.ALGORITHMS)
        self.gather_distributed = gather_distributed
        self.distributed_convention, self.scale_loss, self.backend = distributed_convention, scale_loss, backend

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return functional.barlow_twins(
            z_a, z_b, self.lambda_param, gather_distributed=self.gather_distributed,
            distributed_convention=self.distributed_convention, scale_loss=self.scale_loss,
            algorithm=self.algorithm, backend=self.backend)


class VICRegLoss(nn.Module):
    """VICReg, as lightly's ``VICRegLoss``; see :func:`fastssl.functional.vicreg`.

    Example::

        >>> loss = VICRegLoss()(z_a, z_b)   # z: (B, D) or (B, ..., D)
    """

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
                 gather_distributed: bool = False, eps: float = 0.0001, *, algorithm: str = "auto",
                 backend: str = "auto"):
        super().__init__()
        self.lambda_param = check_non_negative("lambda_param", lambda_param)
        self.mu_param = check_non_negative("mu_param", mu_param)
        self.nu_param = check_non_negative("nu_param", nu_param)
        self.eps = check_non_negative("eps", eps)
        self.algorithm = check_choice("algorithm", algorithm, redundancy.ALGORITHMS)
        self.gather_distributed, self.backend = gather_distributed, backend

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return functional.vicreg(z_a, z_b, self.lambda_param, self.mu_param, self.nu_param, self.eps,
                                 gather_distributed=self.gather_distributed, algorithm=self.algorithm,
                                 backend=self.backend)


class SwaVLoss(nn.Module):
    """SwAV's swapped prediction with Sinkhorn-Knopp codes, as lightly's ``SwaVLoss``.

    ``forward(high_resolution_outputs, low_resolution_outputs, queue_outputs=None)`` on lists of
    (B, K) prototype scores; see :func:`fastssl.functional.swav`.

    Example::

        >>> loss = SwaVLoss()([p_hi1, p_hi2], [p_lo1, p_lo2, p_lo3, p_lo4])
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        self.sinkhorn_iterations = check_int_at_least("sinkhorn_iterations", sinkhorn_iterations, 0)
        self.sinkhorn_epsilon = check_positive("sinkhorn_epsilon", sinkhorn_epsilon)
        self.sinkhorn_gather_distributed, self.backend = sinkhorn_gather_distributed, backend

    def forward(self, high_resolution_outputs: Sequence[Tensor], low_resolution_outputs: Sequence[Tensor],
                queue_outputs: Optional[Sequence[Tensor]] = None) -> Tensor:
        return functional.swav(
            high_resolution_outputs, low_resolution_outputs, queue_outputs, temperature=self.temperature,
            sinkhorn_iterations=self.sinkhorn_iterations, sinkhorn_epsilon=self.sinkhorn_epsilon,
            sinkhorn_gather_distributed=self.sinkhorn_gather_distributed, backend=self.backend)


class NegativeCosineSimilarity(nn.Module):
    """−mean cosine similarity (BYOL / SimSiam), as lightly's ``NegativeCosineSimilarity``.

    Example::

        >>> criterion = NegativeCosineSimilarity()
        >>> loss = 0.5 * (criterion(p0, z1.detach()) + criterion(p1, z0.detach()))
    """

    def __init__(self, dim: int = 1, eps: float = 1e-8, *, backend: str = "auto"):
        super().__init__()
        self.dim, self.eps, self.backend = dim, check_positive("eps", eps), backend

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        return functional.negative_cosine_similarity(x0, x1, self.dim, self.eps, backend=self.backend)


class DINOLoss(nn.Module):
    """DINO's loss with teacher centring and temperature warm-up, as lightly's ``DINOLoss``.

    The teacher temperature rises linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over
    the first ``warmup_teacher_temp_epochs`` epochs (``forward(..., epoch=e)``) unless
    ``teacher_temp`` is given to ``forward``. After the loss, the center (1, 1, output_dim) is
    updated with the (all-reduced) mean of the teacher outputs; see
    :func:`fastssl.functional.dino` and :func:`fastssl.functional.dino_center`.

    Example::

        >>> criterion = DINOLoss(output_dim=65536)
        >>> loss = criterion([t1, t2], [s1, s2, s3, s4], epoch=epoch)
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 *, backend: str = "auto"):
        super().__init__()
        check_int_at_least("output_dim", output_dim, 1)
        self.warmup_teacher_temp = check_positive("warmup_teacher_temp", warmup_teacher_temp)
        self.teacher_temp = check_positive("teacher_temp", teacher_temp)
        self.warmup_teacher_temp_epochs = check_int_at_least("warmup_teacher_temp_epochs",
                                                             warmup_teacher_temp_epochs, 0)
        self.student_temp = check_positive("student_temp", student_temp)
        self.center_momentum = check_non_negative("center_momentum", center_momentum)
        self.backend = backend
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.teacher_temp_schedule = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)

    def teacher_temperature(self, epoch: Optional[int] = None) -> float:
        """The scheduled teacher temperature at ``epoch`` (``teacher_temp`` after the warm-up)."""
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return float(self.teacher_temp_schedule[epoch])
        return self.teacher_temp

    def forward(self, teacher_out: Sequence[Tensor], student_out: Sequence[Tensor],
                teacher_temp: Optional[float] = None, epoch: Optional[int] = None) -> Tensor:
        temperature = teacher_temp if teacher_temp is not None else self.teacher_temperature(epoch)
        loss = functional.dino(teacher_out, student_out, self.center, temperature, self.student_temp,
                               backend=self.backend)
        self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Sequence[Tensor]) -> None:
        self.center.copy_(functional.dino_center(teacher_out, self.center, self.center_momentum))
