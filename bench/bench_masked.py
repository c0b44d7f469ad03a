"""Masked prediction: MAE's norm-pix loss, wav2vec 2.0's contrastive + diversity loss, HuBERT's
masked cluster prediction, against the plain official-style torch code (peer ``official``: MAE's
``forward_loss`` with its einsum patchify; fairseq's ``sample_negatives`` + ``compute_preds`` /
``compute_nce`` with their cross-entropy), typed here from the official code so the comparison
runs without those repositories:

    python -m bench.versus --family masked --set quick --peer official

Sizes (quick = the issue's): MAE ViT-B/16 at 224² (L = 196 patches of P = 768) with a batch of
64 and 75 % masked; wav2vec 2.0 B = 16 utterances of T = 375 masked frames, C = 256, K = 100
distractors (the official (K + 1)·B·T·C gathered tensor: ~620 MB), G·V = 2·320 codes; HuBERT
6,000 frames × D = 256 against 504 codes, half of them masked.

GEMM floor: MAE does none; wav2vec 2.0's per-utterance Grams x̂ŷᵀ (2BT²C) forward and two of that
size backward; HuBERT's N×V logits (2NVD) forward and two of that size backward.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

import fastssl

from . import core


def _official_mae(pred, images, mask, patch_size=16):
    n, c, h, w = images.shape
    x = images.reshape(n, c, h // patch_size, patch_size, w // patch_size, patch_size)
    target = torch.einsum("nchpwq->nhwpqc", x).reshape(n, -1, patch_size * patch_size * c)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    target = (target - mean) / (var + 1.e-6) ** .5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def _official_wav2vec2(x, y, codevector_logits, num_negatives=100, logit_temp=0.1):
    bsz, tsz, fsz = y.shape
    with torch.no_grad():
        tszs = torch.arange(tsz).unsqueeze(-1).expand(-1, num_negatives).flatten()
        neg_idxs = torch.randint(low=0, high=tsz - 1, size=(bsz, num_negatives * tsz))
        neg_idxs[neg_idxs >= tszs] += 1
        neg_idxs = neg_idxs + (torch.arange(bsz) * tsz)[:, None]
    negs = y.reshape(-1, fsz)[neg_idxs.view(-1)].view(bsz, tsz, num_negatives, fsz).permute(2, 0, 1, 3)
    neg_is_pos = (y == negs).all(-1)
    targets = torch.cat([y.unsqueeze(0), negs], dim=0)
    logits = torch.cosine_similarity(x.float(), targets.float(), dim=-1).type_as(x) / logit_temp
    logits = torch.cat([logits[:1], logits[1:].masked_fill(neg_is_pos, float("-inf"))])
    logits = logits.transpose(0, 2).reshape(-1, logits.size(0))
    loss = F.cross_entropy(logits, logits.new_zeros(logits.size(0), dtype=torch.long), reduction="sum")
    groups, entries = codevector_logits.shape[-2:]
    avg_probs = torch.softmax(codevector_logits.reshape(-1, groups, entries).float(), dim=-1).mean(dim=0)
    perplexity = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-7), dim=-1)).sum()
    return loss / logits.size(0) + 0.1 * (groups * entries - perplexity) / (groups * entries)


def _official_hubert(features, targets, codes, mask, logit_temp=0.1):
    proj_x, target = features[mask], targets[mask]
    pos = torch.index_select(codes, 0, target)
    negs = codes.unsqueeze(1).expand(-1, proj_x.size(0), -1)
    neg_is_pos = (pos == negs).all(-1)
    candidates = torch.cat([pos.unsqueeze(0), negs], dim=0)
    logits = torch.cosine_similarity(proj_x.float(), candidates.float(), dim=-1).type_as(proj_x) / logit_temp
    logits = torch.cat([logits[:1], logits[1:].masked_fill(neg_is_pos, float("-inf"))]).transpose(0, 1)
    loss = F.cross_entropy(logits, logits.new_zeros(logits.size(0), dtype=torch.long), reduction="sum")
    return loss / target.numel()


def _mae_case(batch: int, image: int, patch: int) -> core.Case:
    patches, values = (image // patch) ** 2, patch * patch * 3

    def inputs(device, dtype):
        pred = core.randn((batch, patches, values), device, dtype)
        images = core.randn((batch, 3, image, image), device, dtype, False)
        mask = (torch.rand(batch, patches, device=device) < 0.75).to(dtype)
        return (pred, images, mask), [pred]

    return core.Case(
        family="masked", loss="mae", name=f"mae-b{batch}-l{patches}-p{values}",
        sizes={"batch": batch, "patches": patches, "dim": values}, make_inputs=inputs,
        make_loss=lambda backend: fastssl.MAELoss(patch_size=patch, backend=backend),
        peers={"official": lambda: lambda p, i, m: _official_mae(p, i, m, patch)},
        gemm_flops=None, series=((f"MAE, P={values}", "batch"),))


def _wav2vec2_case(batch: int, frames: int, dim: int, negatives: int = 100) -> core.Case:
    def inputs(device, dtype):
        x, y = core.randn((batch, frames, dim), device, dtype), core.randn((batch, frames, dim), device, dtype)
        codes = core.randn((batch * frames, 2, 320), device, dtype)
        return (x, y, codes), [x, y, codes]

    gram = 2 * batch * frames * frames * dim
    return core.Case(
        family="masked", loss="wav2vec2", name=f"wav2vec2-b{batch}-t{frames}-c{dim}-k{negatives}",
        sizes={"batch": batch, "frames": frames, "dim": dim},
        make_inputs=inputs,
        make_loss=lambda backend: fastssl.Wav2Vec2ContrastiveLoss(num_negatives=negatives, backend=backend),
        peers={"official": lambda: lambda x, y, c: _official_wav2vec2(x, y, c, negatives)},
        gemm_flops={"fwd": gram, "bwd": 2 * gram}, series=((f"wav2vec 2.0, C={dim}", "frames"),))


def _hubert_case(frames: int, dim: int, codes: int = 504) -> core.Case:
    def inputs(device, dtype):
        features, embeddings = core.randn((frames, dim), device, dtype), core.randn((codes, dim), device, dtype)
        targets = torch.randint(0, codes, (frames,), device=device)
        mask = torch.rand(frames, device=device) < 0.5
        return (features, targets, embeddings, mask), [features, embeddings]

    logits = 2 * frames * codes * dim
    return core.Case(
        family="masked", loss="hubert", name=f"hubert-n{frames}-d{dim}-v{codes}",
        sizes={"batch": frames, "dim": dim}, make_inputs=inputs,
        make_loss=lambda backend: fastssl.HuBERTLoss(backend=backend),
        peers={"official": lambda: _official_hubert},
        gemm_flops={"fwd": logits, "bwd": 2 * logits}, series=((f"HuBERT, V={codes}", "batch"),))


def cases(size_set: str) -> List[core.Case]:
    if size_set == "smoke":
        return [_mae_case(2, 32, 16), _wav2vec2_case(2, 12, 8, 5), _hubert_case(20, 8, 11)]
    result = [_mae_case(64, 224, 16), _wav2vec2_case(16, 375, 256), _hubert_case(6000, 256)]
    if size_set == "full":
        result += [_mae_case(256, 224, 16), _wav2vec2_case(8, 750, 256), _hubert_case(24000, 256)]
    return result


def test_masked(benchmark, bench_job):
    core.benchmark_job(benchmark, bench_job)
