"""Self-supervised training end to end with fastssl's losses, on real data, in one command.

    python -m fastssl.examples.train --method simclr          # or: fastssl-train --method simclr
    torchrun --nproc_per_node=2 -m fastssl.examples.train --method byol

Methods: simclr, moco (v2: momentum encoder + memory bank), swav (prototypes, multi-crop,
queue), byol, simsiam, barlow_twins, vicreg, dino (multi-crop, teacher EMA), dinov2 (DINO +
iBOT masked patches + KoLeo, on a ViT), mae (masked autoencoder, ViT). Default data:
scikit-learn's digits (1,797 real 8×8 images; pre-training sees only the 70% train split);
``--data DIR`` takes CIFAR-10's python batches or an ImageFolder tree. Prints one line per epoch
(loss, lr, throughput, share of step time spent in the fastssl loss forward + backward, collapse
monitors of the backbone features), then kNN-5 and linear-probe accuracy of the trained backbone
against the same backbone at random initialisation. Given a seed, a CPU run is deterministic.
Under torchrun the batch is split over the processes (gloo on CPU, NCCL on GPU) and the losses
gather across them.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

import fastssl

from . import data as datasets
from .augment import Augment, stream_seed
from .evaluate import collapse_monitors, embed, evaluate
from .methods import COMMON_DEFAULTS, METHODS, hyper_parameters
from .models import ARCHITECTURES, build_backbone

MONITOR_ROWS = 1024  # un-augmented train images whose features the collapse monitors watch
STATISTICS_ROWS = 10_000  # train images the input standardisation's mean and std come from


def method_options() -> Dict[str, Dict[str, object]]:
    """Every method-specific hyper-parameter → {method: its default} (a method may also change a
    common one's default, such as DINO's learning rate)."""
    options: Dict[str, Dict[str, object]] = {}
    for name, method in METHODS.items():
        for key, value in method.defaults.items():
            if key not in COMMON_DEFAULTS:
                options.setdefault(key, {})[name] = value
    return options


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastssl-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(METHODS), default="simclr")
    parser.add_argument("--data", metavar="DIR", help="CIFAR-10 python batches or DIR/<class>/<image> "
                        "(read with Pillow); default: scikit-learn's digits")
    parser.add_argument("--image-size", type=int, default=32, help="side images of an image folder are resized to")
    parser.add_argument("--arch", choices=ARCHITECTURES,
                        help="backbone (default: cnn; dinov2, mae: vit, they need patch tokens)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, … (default: cuda when available)")
    parser.add_argument("--backend", default="auto",
                        help="fastssl loss backend (auto, reference, torch, triton, native)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per process (default 1: the default encoders' ops are too small "
                             "for intra-op threads to pay off, and on a shared CPU spinning threads cost; "
                             "0: torch's default)")
    parser.add_argument("--steps-per-epoch", type=int, help="stop each epoch after this many steps (quick tries)")
    parser.add_argument("--eval-split", choices=("test", "val"), default="test",
                        help="val: pre-train and fit on 70%% of the train split and score on the other 30%%, "
                             "for choosing hyper-parameters without the test split")
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="save DIR/<method>.pt after every epoch")
    parser.add_argument("--resume", metavar="FILE", help="continue from a checkpoint saved by --checkpoint-dir")
    for key, default in COMMON_DEFAULTS.items():
        changed = ", ".join(f"{name} {method.defaults[key]}" for name, method in METHODS.items()
                            if key in method.defaults)
        parser.add_argument("--" + key.replace("_", "-"), type=type(default),
                            help=f"default: {default}" + (f" ({changed})" if changed else ""))
    for key, defaults in method_options().items():
        values = ", ".join(f"{name} {value}" for name, value in defaults.items())
        parser.add_argument("--" + key.replace("_", "-"), type=type(next(iter(defaults.values()))),
                            help=f"default: {values}")
    args = parser.parse_args(argv)
    if args.arch is None:
        args.arch = METHODS[args.method].arch
    for key, defaults in method_options().items():
        if getattr(args, key) is not None and args.method not in defaults:
            parser.error(f"--{key.replace('_', '-')} is not a hyper-parameter of {args.method} "
                         f"(it is one of {', '.join(defaults)})")
    return args


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def init_distributed(device: torch.device) -> None:
    """Join torchrun's process group (NCCL for CUDA devices, gloo otherwise) when launched by it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def learning_rate(step: int, total_steps: int, warmup_steps: int, base: float) -> float:
    """Linear warm-up to ``base`` over ``warmup_steps``, then a cosine decay towards 0 (reached one
    step after the last, so the last step still learns)."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    return fastssl.cosine_schedule(step - warmup_steps, total_steps - warmup_steps + 1, base, 0.0)


def backward_through_loss(method: nn.Module, outputs: Sequence[torch.Tensor], device: torch.device):
    """Backward of ``method.loss(*outputs)`` in two stages, so the loss's own forward and backward
    can be timed: the loss on detached copies first (→ their gradients), then the networks.
    Returns (loss, seconds spent in the loss)."""
    inputs = [out.detach().requires_grad_() if out.requires_grad else out for out in outputs]
    synchronize(device)
    start = time.perf_counter()
    loss = method.loss(*inputs)
    loss.backward()
    synchronize(device)
    seconds = time.perf_counter() - start
    pairs = [(out, inp.grad) for out, inp in zip(outputs, inputs) if out.requires_grad and inp.grad is not None]
    torch.autograd.backward([out for out, _ in pairs], [grad for _, grad in pairs])
    return loss.detach(), seconds


def train_epoch(method: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer, augment: Augment,
                batches: tqdm, generator: torch.Generator, schedule: Sequence[float], first_step: int,
                total_steps: int, epoch: int, device: torch.device):
    """One optimizer step per float batch (N, C, H, W) from the progress bar ``batches``, at
    learning rate ``schedule[i]``; ``model`` is ``method`` or its DDP wrapper.
    Returns (sum of the losses, seconds spent in the loss)."""
    loss_sum, loss_seconds = 0.0, 0.0
    for index, (batch, lr) in enumerate(zip(batches, schedule)):
        for group in optimizer.param_groups:
            group["lr"] = lr
        views = augment(batch, generator)
        method.start_step(first_step + index, total_steps, epoch)
        loss, seconds = backward_through_loss(method, model(views), device)
        method.before_optimizer_step(epoch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise RuntimeError(f"non-finite loss {loss_value} at epoch {epoch + 1}, step {index + 1}")
        loss_sum, loss_seconds = loss_sum + loss_value, loss_seconds + seconds
        batches.set_postfix(loss=f"{loss_value:.4f}")
    return loss_sum, loss_seconds


def format_accuracies(trained: Dict[str, float], random_init: Dict[str, float]) -> str:
    return "; ".join(f"{name} {100 * trained[key]:.1f}% trained vs {100 * random_init[key]:.1f}% at random init "
                     f"({100 * (trained[key] - random_init[key]):+.1f} points)"
                     for key, name in (("knn", "kNN-5"), ("linear", "linear probe")))


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Trains as the command line ``argv`` says; returns the per-epoch history and, on rank 0,
    the final evaluation. The caller's torch thread count is restored afterwards."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return train(args)
    finally:
        torch.set_num_threads(threads)


def train(args: argparse.Namespace) -> Dict[str, object]:
    """The whole run for parsed arguments: data, method, training loop, evaluation."""
    wall_start = time.perf_counter()
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
    init_distributed(device)
    world, rank = fastssl.distributed.world_size(), fastssl.distributed.rank()
    log = print if rank == 0 else (lambda *_, **__: None)
    torch.manual_seed(args.seed)

    dataset = datasets.load(args.data, args.image_size)
    if args.eval_split == "val":
        dataset = datasets.validation_split(dataset)
    pretrain_images = dataset.images[dataset.train_index]
    config = SimpleNamespace(**{key: getattr(args, key) if getattr(args, key) is not None else value
                                for key, value in hyper_parameters(args.method).items()},
                             gather=world > 1, backend=args.backend, seed=args.seed)
    if config.batch_size % world:
        raise ValueError(f"--batch-size ({config.batch_size}) must be a multiple of the number of processes ({world})")
    local_batch = config.batch_size // world
    if local_batch < 2 or local_batch * world > len(pretrain_images):
        raise ValueError(f"--batch-size must give every process at least 2 rows and fit the "
                         f"{len(pretrain_images)} training images, got {config.batch_size} over {world} process(es)")

    sample = datasets.as_float(pretrain_images[:STATISTICS_ROWS])
    mean, std = sample.mean(dim=(0, 2, 3)), sample.std(dim=(0, 2, 3)) + 1e-6
    backbone, feature_dim, any_size = build_backbone(args.arch, dataset.image_shape, mean, std)
    method = METHODS[args.method](backbone, feature_dim, config).to(device)
    image_size = dataset.image_shape[-1]
    augment = Augment(image_size, dataset.natural, global_crops=method.global_crops, local_crops=method.local_crops,
                      local_size=max(4, (3 * image_size) // 4) if any_size else image_size)
    model = method
    if world > 1:
        model = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
    parameters = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)

    sampler = DistributedSampler(range(len(pretrain_images)), num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // local_batch
    if args.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = min(config.warmup_epochs * steps_per_epoch, total_steps - 1)
    pretrain_images = pretrain_images.to(device)
    monitor_images = pretrain_images[:MONITOR_ROWS]

    history: List[Dict[str, float]] = []
    start_epoch, random_init = 0, None
    if args.resume:
        checkpoint = torch.load(args.resume, map_location=device)
        if (checkpoint["method"], checkpoint["arch"]) != (args.method, args.arch):
            raise ValueError(f"--resume {args.resume} holds {checkpoint['method']} with {checkpoint['arch']}, "
                             f"not {args.method} with {args.arch}")
        method.load_state_dict(checkpoint["model"])
        for name, value in checkpoint["non_persistent_buffers"].items():
            method.get_buffer(name).copy_(value)
        optimizer.load_state_dict(checkpoint["optimizer"])
        start_epoch, history, random_init = checkpoint["epoch"], checkpoint["history"], checkpoint["random_init"]
    if rank == 0 and random_init is None:
        random_init = evaluate(method.backbone, dataset, device)

    log(f"{args.method} on {dataset.name}: {len(pretrain_images)} train / {len(dataset.test_index)} "
        f"{args.eval_split} images {dataset.image_shape}, {args.arch} backbone ({feature_dim} features), "
        f"batch {config.batch_size} × {augment.global_crops}+{augment.local_crops} crops, "
        f"{config.epochs} epochs × {steps_per_epoch} steps, loss backend {args.backend} on {device}"
        f"{f', {world} processes' if world > 1 else ''}")
    generator = torch.Generator(device=device)
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, config.epochs):
        method.train()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        generator.manual_seed(stream_seed(args.seed, epoch, rank))  # a resumed run replays the views
        epoch_start = time.perf_counter()
        batches = (datasets.as_float(pretrain_images[order[i * local_batch:(i + 1) * local_batch]])
                   for i in range(steps_per_epoch))
        schedule = [learning_rate(s, total_steps, warmup_steps, config.lr) for s in range(step, step + steps_per_epoch)]
        progress = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                        disable=True if rank else None)
        loss_sum, loss_seconds = train_epoch(method, model, optimizer, augment, progress, generator, schedule, step,
                                             total_steps, epoch, device)
        step, lr = step + steps_per_epoch, schedule[-1]
        synchronize(device)
        epoch_seconds = time.perf_counter() - epoch_start
        epoch_loss = torch.tensor([loss_sum / steps_per_epoch], dtype=torch.float64, device=device)  # NCCL: on device
        epoch_loss = float(fastssl.distributed.all_reduce_no_grad(epoch_loss, "sum")) / world
        record = {"epoch": epoch + 1, "loss": epoch_loss, "lr": lr,
                  "images_per_second": steps_per_epoch * config.batch_size / epoch_seconds,
                  "loss_time_share": loss_seconds / epoch_seconds, "seconds": epoch_seconds}
        if rank == 0:
            record["feature_std"], record["effective_rank"] = collapse_monitors(embed(method.backbone, monitor_images,
                                                                                      device))
            log(f"epoch {epoch + 1:3d}/{config.epochs}  loss {epoch_loss:.4f}  lr {lr:.2e}  "
                f"{record['images_per_second']:6.0f} img/s  loss kernels {100 * record['loss_time_share']:4.1f}%  "
                f"feature std {record['feature_std']:.4f} (1/√D {feature_dim ** -0.5:.4f})  "
                f"eff. rank {record['effective_rank']:5.1f}/{feature_dim}  {epoch_seconds:.1f} s")
        history.append(record)
        if args.checkpoint_dir and rank == 0:
            save_checkpoint(Path(args.checkpoint_dir) / f"{args.method}.pt", {
                "method": args.method, "arch": args.arch, "args": vars(args), "epoch": epoch + 1,
                "model": method.state_dict(), "non_persistent_buffers": non_persistent_buffers(method),
                "optimizer": optimizer.state_dict(), "history": history,
                "random_init": random_init})

    result: Dict[str, object] = {"history": history}
    if world > 1:
        # Every parameter, momentum teachers included: DDP and the EMA must keep the replicas equal.
        fingerprint = sum(float(p.detach().double().sum()) for p in method.parameters())
        print(f"rank {rank}/{world}: parameter fingerprint {fingerprint:.10e}", flush=True)
        result["parameter_fingerprint"] = fingerprint
    if rank == 0:
        trained = evaluate(method.backbone, dataset, device)
        result.update(trained=trained, random_init=random_init, seconds=time.perf_counter() - wall_start)
        log(f"{args.method} on {dataset.name} ({args.eval_split} split): {format_accuracies(trained, random_init)}; "
            f"{result['seconds']:.0f} s in all")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def non_persistent_buffers(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Buffers ``state_dict`` leaves out (the memory banks, non-persistent as in lightly), which a
    resumed run needs to continue bit for bit."""
    saved = module.state_dict()
    return {name: buffer for name, buffer in module.named_buffers() if name not in saved}


def save_checkpoint(path: Path, state: Dict[str, object]) -> None:
    """Write via a temporary file, so an interrupted save never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``fastssl-train`` console script."""
    run(argv)


if __name__ == "__main__":
    main()
