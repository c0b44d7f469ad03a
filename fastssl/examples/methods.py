"""The SSL methods of the example trainers, each built on fastssl's public losses and helpers.

A method is one ``nn.Module`` holding its trainable networks, any momentum teacher (frozen, EMA
of the student through :func:`fastssl.update_momentum`) and its fastssl loss module (with the
loss's state: MoCo's memory bank, DINO's center, SwAV's queues). The trainer calls:

* ``start_step(step, total_steps, epoch)`` before the forward (momentum updates, schedules);
* ``forward(views)`` → a tuple of tensors, the loss's inputs; those computed by trainable
  networks carry a gradient, teacher outputs do not;
* ``loss(*outputs)`` → the 0-dim loss (only fastssl calls: what "loss-kernel time" measures);
* ``before_optimizer_step(epoch)`` after the backward (SwAV freezes its prototypes at first).

``defaults`` holds each method's hyper-parameters for the embedded digits (chosen with
``--eval-split val``, never on the test split), on top of ``COMMON_DEFAULTS``; every one can be
overridden on the command line.
"""
from __future__ import annotations

import copy
import itertools
from types import SimpleNamespace
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import fastssl

from .augment import stream_seed
from .models import CosineLinear, MAEDecoder, VisionTransformer, mlp

Tensor = torch.Tensor

# Hyper-parameters every method uses; per-method ``defaults`` override and extend them.
COMMON_DEFAULTS = dict(epochs=40, batch_size=64, lr=2e-3, weight_decay=1e-4, warmup_epochs=3)


def encode(network: nn.Module, views: Sequence[Tensor]) -> List[Tensor]:
    """``network`` on every view, one call per run of views of the same size (fewer, larger
    calls), outputs returned in view order."""
    outputs = []
    for _, group in itertools.groupby(views, key=lambda view: view.shape):
        group = list(group)
        outputs += network(torch.cat(group)).chunk(len(group))
    return outputs


def projection_head(feature_dim: int, config: SimpleNamespace) -> nn.Module:
    """feature_dim → 2·feature_dim → projection_dim: SimCLR's head, also MoCo v2's, SwAV's and BYOL's."""
    return mlp(feature_dim, 2 * feature_dim, config.projection_dim)


def frozen_copy(network: nn.Module) -> nn.Module:
    """A momentum teacher: a copy of ``network`` that the optimizer never touches."""
    teacher = copy.deepcopy(network)
    teacher.requires_grad_(False)
    return teacher


class Method(nn.Module):
    """Base class: holds ``backbone`` (what the evaluation embeds) and the hyper-parameters."""

    defaults: Dict[str, object] = {}
    global_crops, local_crops = 2, 0
    arch = "cnn"  # the default backbone

    def __init__(self, backbone: nn.Module, feature_dim: int, config: SimpleNamespace):
        super().__init__()
        self.backbone, self.config = backbone, config
        self.epoch = 0

    def start_step(self, step: int, total_steps: int, epoch: int) -> None:
        self.epoch = epoch

    def before_optimizer_step(self, epoch: int) -> None:
        pass

    def loss(self, *outputs: Tensor) -> Tensor:
        raise NotImplementedError


class MomentumMethod(Method):
    """A method whose ``teacher`` follows ``student`` by EMA, the momentum rising from
    ``config.momentum`` to 1 on a cosine schedule (BYOL, MoCo, DINO)."""

    student: nn.Module
    teacher: nn.Module

    def start_step(self, step: int, total_steps: int, epoch: int) -> None:
        super().start_step(step, total_steps, epoch)
        momentum = fastssl.cosine_schedule(step, total_steps, self.config.momentum, 1.0)
        fastssl.update_momentum(self.student, self.teacher, momentum)


class TwoViewMethod(Method):
    """Backbone → projector on two views, the loss on the two projections: subclasses give
    ``projector(feature_dim, config)`` and ``make_criterion(config)``."""

    def __init__(self, backbone, feature_dim, config):
        super().__init__(backbone, feature_dim, config)
        self.encoder = nn.Sequential(backbone, self.projector(feature_dim, config))
        self.criterion = self.make_criterion(config)

    def forward(self, views):
        return tuple(encode(self.encoder, views))

    def loss(self, z0, z1):
        return self.criterion(z0, z1)


class SimCLR(TwoViewMethod):
    """SimCLR: NT-Xent between the projections of two views, the rest of the batch as negatives."""

    defaults = dict(temperature=0.2, projection_dim=64)

    projector = staticmethod(projection_head)

    @staticmethod
    def make_criterion(config):
        return fastssl.NTXentLoss(config.temperature, gather_distributed=config.gather, backend=config.backend)


class MoCo(MomentumMethod):
    """MoCo v2: queries against momentum-encoder keys, negatives from a FIFO memory bank.

    Symmetric: the queries of both views go in one NT-Xent call (view 0's positive key is view
    1's and vice versa), so the bank receives both views' keys once, after use.
    """

    defaults = dict(temperature=0.2, projection_dim=64, memory_bank_size=2048, momentum=0.99)

    def __init__(self, backbone, feature_dim, config):
        super().__init__(backbone, feature_dim, config)
        self.student = nn.Sequential(backbone, projection_head(feature_dim, config))
        self.teacher = frozen_copy(self.student)
        self.criterion = fastssl.NTXentLoss(
            config.temperature, memory_bank_size=(config.memory_bank_size, config.projection_dim),
            gather_distributed=config.gather, backend=config.backend)

    def forward(self, views):
        q0, q1 = encode(self.student, views)
        with torch.no_grad():
            k0, k1 = encode(self.teacher, views)
        return torch.cat([q0, q1]), torch.cat([k1, k0])

    def loss(self, queries, keys):
        return self.criterion(queries, keys)


class SwAV(Method):
    """SwAV: swapped prediction of Sinkhorn codes over learnable prototypes, with multi-crop and,
    once it is full, a queue of past projections per global crop appended to the Sinkhorn input."""

    defaults = dict(temperature=0.2, projection_dim=64, prototypes=64, local_crops=2, queue_size=256,
                    freeze_prototypes_epochs=1)

    def __init__(self, backbone, feature_dim, config):
        super().__init__(backbone, feature_dim, config)
        self.local_crops = config.local_crops
        self.encoder = nn.Sequential(backbone, projection_head(feature_dim, config))
        self.prototypes = CosineLinear(config.projection_dim, config.prototypes)
        self.queues = nn.ModuleList(
            fastssl.MemoryBankModule((config.queue_size, config.projection_dim), gather_distributed=config.gather,
                                     feature_dim_first=False)
            for _ in range(self.global_crops if config.queue_size else 0))
        self.register_buffer("queued_rows", torch.zeros((), dtype=torch.long))
        self.criterion = fastssl.SwaVLoss(config.temperature, sinkhorn_gather_distributed=config.gather,
                                          backend=config.backend)

    def forward(self, views):
        projections = [F.normalize(z, dim=1) for z in encode(self.encoder, views)]
        scores = [self.prototypes(z) for z in projections]
        queue_scores = []
        if len(self.queues):
            # Queue rows start as random vectors: use the queue only once real rows fill it.
            full = int(self.queued_rows) >= self.config.queue_size
            banks = [queue.queue(z, update=self.training) for queue, z in zip(self.queues, projections)]
            if self.training:
                self.queued_rows += projections[0].shape[0] * fastssl.distributed.world_size()
            if full:
                with torch.no_grad():
                    queue_scores = [self.prototypes(bank) for bank in banks]
        return tuple(scores + queue_scores)

    def loss(self, *scores):
        crops = self.global_crops + self.local_crops
        high, low, queue = scores[:self.global_crops], scores[self.global_crops:crops], scores[crops:]
        return self.criterion(list(high), list(low), list(queue) or None)

    def before_optimizer_step(self, epoch):
        if epoch < self.config.freeze_prototypes_epochs:
            self.prototypes.weight.grad = None


class BYOL(MomentumMethod):
    """BYOL: an online network with a predictor regresses a momentum target's projections."""

    defaults = dict(projection_dim=64, momentum=0.98)

    def __init__(self, backbone, feature_dim, config):
        super().__init__(backbone, feature_dim, config)
        self.student = nn.Sequential(backbone, projection_head(feature_dim, config))
        self.predictor = mlp(config.projection_dim, 2 * feature_dim, config.projection_dim)
        self.teacher = frozen_copy(self.student)
        self.criterion = fastssl.NegativeCosineSimilarity(backend=config.backend)

    def forward(self, views):
        p0, p1 = self.predictor(torch.cat(encode(self.student, views))).chunk(2)
        with torch.no_grad():
            t0, t1 = encode(self.teacher, views)
        return p0, p1, t0, t1

    def loss(self, p0, p1, t0, t1):
        return 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))


class SimSiam(Method):
    """SimSiam: BYOL without a teacher; the target is the other view's projection, stop-gradient."""

    defaults = dict(projection_dim=256)

    def __init__(self, backbone, feature_dim, config):
        super().__init__(backbone, feature_dim, config)
        dim = config.projection_dim
        self.encoder = nn.Sequential(backbone, mlp(feature_dim, dim, dim, last_batch_norm=True))
        self.predictor = mlp(dim, dim // 4, dim)
        self.criterion = fastssl.NegativeCosineSimilarity(backend=config.backend)

    def forward(self, views):
        z0, z1 = encode(self.encoder, views)
        p0, p1 = self.predictor(torch.cat([z0, z1])).chunk(2)
        return p0, p1, z0.detach(), z1.detach()

    def loss(self, p0, p1, z0, z1):
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class BarlowTwins(TwoViewMethod):
    """Barlow Twins: the cross-correlation of the two views' batch-normalised projections → I."""

    defaults = dict(projection_dim=512, lambda_param=5e-3)

    @staticmethod
    def projector(feature_dim, config):
        return mlp(feature_dim, config.projection_dim, config.projection_dim, config.projection_dim)

    @staticmethod
    def make_criterion(config):
        return fastssl.BarlowTwinsLoss(config.lambda_param, gather_distributed=config.gather, backend=config.backend)


class VICReg(TwoViewMethod):
    """VICReg: invariance, variance and covariance terms on the two views' projections."""

    defaults = dict(projection_dim=512)

    projector = staticmethod(BarlowTwins.projector)

    @staticmethod
    def make_criterion(config):
        return fastssl.VICRegLoss(gather_distributed=config.gather, backend=config.backend)


class DINO(MomentumMethod):
    """DINO: the student matches the centred, sharpened momentum teacher across crops; the
    teacher sees the global crops, the student every crop."""

    defaults = dict(lr=1e-3, projection_dim=64, output_dim=256, local_crops=2, momentum=0.9, teacher_temp=0.04,
                    warmup_teacher_temp_epochs=10)

    def __init__(self, backbone, feature_dim, config):
        super().__init__(backbone, feature_dim, config)
        self.local_crops = config.local_crops
        head = nn.Sequential(mlp(feature_dim, 2 * feature_dim, 2 * feature_dim, config.projection_dim),
                             CosineLinear(config.projection_dim, config.output_dim))
        self.student = nn.Sequential(backbone, head)
        self.teacher = frozen_copy(self.student)
        self.criterion = fastssl.DINOLoss(
            config.output_dim, teacher_temp=config.teacher_temp,
            warmup_teacher_temp_epochs=config.warmup_teacher_temp_epochs, backend=config.backend)

    def forward(self, views):
        with torch.no_grad():
            teacher = encode(self.teacher, views[:self.global_crops])
        return tuple(teacher + encode(self.student, views))

    def loss(self, *outputs):
        teacher, student = outputs[:self.global_crops], outputs[self.global_crops:]
        return self.criterion(list(teacher), list(student), epoch=self.epoch)


def patch_backbone(backbone: nn.Module, method: str) -> VisionTransformer:
    if not isinstance(backbone, VisionTransformer):
        raise ValueError(f"{method} needs patch tokens: --arch vit, got a {type(backbone).__name__} backbone")
    return backbone


class MaskingMethod(Method):
    """Draws its patch masks from its own generator, seeded per (seed, step, rank): a resumed run
    masks what the uninterrupted one masked, and every process masks differently."""

    def start_step(self, step, total_steps, epoch):
        super().start_step(step, total_steps, epoch)
        self.step = step

    def masking_generator(self, device: torch.device) -> torch.Generator:
        generator = torch.Generator(device=device)
        return generator.manual_seed(stream_seed(self.config.seed, self.step, fastssl.distributed.rank()))


class DINOv2(MaskingMethod, MomentumMethod):
    """DINOv2-style: DINO on the class tokens (teacher: global crops; student: every crop), plus
    iBOT's masked-patch loss (the student sees the global crops with some patches replaced by the
    mask token and predicts the teacher's head output at those patches; shared head, as iBOT),
    plus KoLeo on the student's class tokens of each global crop. A share ``mask_probability`` of
    each global crop's images is masked, with ratios spread over [mask_ratio_min, mask_ratio_max]
    as in DINOv2. ``centering``: the teacher of both losses, "mean" (DINO's EMA centre) or
    "sinkhorn_knopp" (DINOv2's)."""

    arch = "vit"
    # weight_decay 0.04 (DINO's starting value): val kNN-5 of the class token 95.5% → 96.6% over 1e-4.
    defaults = dict(lr=1e-3, weight_decay=0.04, projection_dim=64, output_dim=256, local_crops=2, momentum=0.9,
                    teacher_temp=0.04, warmup_teacher_temp_epochs=10, ibot_weight=1.0, koleo_weight=0.1,
                    mask_probability=0.5, mask_ratio_min=0.1, mask_ratio_max=0.5, centering="mean")

    def __init__(self, backbone, feature_dim, config):
        super().__init__(backbone, feature_dim, config)
        vit = patch_backbone(backbone, "dinov2")
        self.local_crops = config.local_crops
        head = nn.Sequential(mlp(vit.dim, 2 * vit.dim, 2 * vit.dim, config.projection_dim),
                             CosineLinear(config.projection_dim, config.output_dim))
        self.student = nn.ModuleDict(dict(backbone=vit, head=head))
        self.teacher = frozen_copy(self.student)
        self.dino = fastssl.DINOLoss(config.output_dim, teacher_temp=config.teacher_temp,
                                     warmup_teacher_temp_epochs=config.warmup_teacher_temp_epochs,
                                     center_mode=config.centering, backend=config.backend)
        self.ibot = fastssl.IBOTPatchLoss(config.output_dim, teacher_temp=config.teacher_temp,
                                          center_mode=config.centering, backend=config.backend)
        self.koleo = fastssl.KoLeoLoss(backend=config.backend)

    def draw_masks(self, images: Tensor) -> Tensor:
        """(N, h, w) bool patch masks for the global crops ``images`` (N, C, H, W)."""
        vit = self.student["backbone"]
        n, grid = len(images), images.shape[-1] // vit.patch_size
        masked_images = int(round(self.config.mask_probability * n))
        ratios = torch.linspace(self.config.mask_ratio_min, self.config.mask_ratio_max, masked_images)
        counts = torch.zeros(n, dtype=torch.long)
        counts[:masked_images] = (ratios * grid * grid).long()
        noise = torch.rand(n, grid * grid, generator=self.masking_generator(images.device), device=images.device)
        rank_of_patch = noise.argsort(dim=1).argsort(dim=1)
        return (rank_of_patch < counts.to(images.device).unsqueeze(1)).reshape(n, grid, grid)

    def forward(self, views):
        global_images = torch.cat(views[:self.global_crops])
        mask = self.draw_masks(global_images)
        flat_mask = mask.flatten(1)
        with torch.no_grad():
            tokens = self.teacher["backbone"].tokens(global_images)
            teacher_classes = self.teacher["head"](tokens[:, 0]).chunk(self.global_crops)
            teacher_patches = self.teacher["head"](tokens[:, 1:][flat_mask])
        tokens = self.student["backbone"].tokens(global_images, mask=mask)
        classes = [tokens[:, 0]]
        local_views = views[self.global_crops:]
        if local_views:
            classes.append(self.student["backbone"].tokens(torch.cat(local_views))[:, 0])
        student_classes = self.student["head"](torch.cat(classes)).chunk(len(views))
        student_patches = self.student["head"](tokens[:, 1:][flat_mask])
        return (*teacher_classes, *student_classes, teacher_patches, student_patches, mask,
                *tokens[:, 0].chunk(self.global_crops))

    def loss(self, *outputs):
        crops = self.global_crops + self.local_crops
        teacher, student = outputs[:self.global_crops], outputs[self.global_crops:self.global_crops + crops]
        teacher_patches, student_patches, mask = outputs[self.global_crops + crops:self.global_crops + crops + 3]
        class_features = outputs[self.global_crops + crops + 3:]
        loss = self.dino(list(teacher), list(student), epoch=self.epoch)
        if mask.any():
            # iBOT's teacher follows DINO's temperature warm-up, as in DINOv2.
            loss = loss + self.config.ibot_weight * self.ibot(teacher_patches, student_patches, mask,
                                                              self.dino.teacher_temperature(self.epoch))
        return loss + self.config.koleo_weight * sum(self.koleo(features) for features in class_features)


class MAE(MaskingMethod):
    """MAE: the ViT encodes a random ``1 − mask_ratio`` of one view's patches, a light decoder
    predicts every patch's pixels, the loss is the (per-patch normalised) pixel MSE on the masked
    patches (:class:`fastssl.MAELoss`)."""

    global_crops, arch = 1, "vit"
    defaults = dict(lr=1e-3, mask_ratio=0.5, decoder_dim=64, decoder_depth=2, norm_pix_loss=0)

    def __init__(self, backbone, feature_dim, config):
        super().__init__(backbone, feature_dim, config)
        self.encoder = patch_backbone(backbone, "mae")
        vit = self.encoder
        channels = vit.patch_embed.in_channels
        self.decoder = MAEDecoder(vit.dim, vit.grid ** 2, channels * vit.patch_size ** 2, config.decoder_dim,
                                  config.decoder_depth)
        self.criterion = fastssl.MAELoss(vit.patch_size, norm_pix_loss=bool(config.norm_pix_loss),
                                         backend=config.backend)

    def forward(self, views):
        (images,) = views
        patches = self.encoder.grid ** 2
        kept = patches - int(round(self.config.mask_ratio * patches))
        noise = torch.rand(len(images), patches, generator=self.masking_generator(images.device), device=images.device)
        keep = noise.argsort(dim=1)[:, :kept]
        mask = torch.ones(len(images), patches, device=images.device).scatter_(1, keep, 0.0)
        predicted = self.decoder(self.encoder.tokens(images, keep=keep), keep)
        return predicted, self.encoder.standardize(images), mask

    def loss(self, predicted, target, mask):
        return self.criterion(predicted, target, mask)


METHODS = {"simclr": SimCLR, "moco": MoCo, "swav": SwAV, "byol": BYOL, "simsiam": SimSiam,
           "barlow_twins": BarlowTwins, "vicreg": VICReg, "dino": DINO, "dinov2": DINOv2,
           "mae": MAE}


def hyper_parameters(method: str) -> Dict[str, object]:
    """The method's defaults on top of the common ones."""
    return {**COMMON_DEFAULTS, **METHODS[method].defaults}

