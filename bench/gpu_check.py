"""Validate a CUDA card in one go: ``python -m bench.gpu_check`` (budgeted for ≤ 8 minutes on one H100).

1. Every op of the registry (``fastssl.runtime.registry.MANIFEST``) × dtype (float32, float16,
   bfloat16, float64) × backend on the card, against the op's reference in float64 (values and
   gradients), on the samples of ``tests/runtime/test_ops.py`` (one or more per op; that test
   requires one for every registered op, so a new op is covered here too). Bound: twice the
   reference's own error in the same dtype, or n·eps(dtype) (n: elements of the largest input)
   where the reference is exact.
2. The large cases of issue 17: a 4M-row × 768 bfloat16 NT-Xent (more than 2³¹ elements: int64
   indexing), Barlow Twins N=256 D=8192 (float32, bfloat16) and float64 N=64, Sinkhorn
   4096×3000, DINO's 2 + 12 crops × 64 × 65,536 crop pairs: each backend timed (CUDA events)
   beside the torch backend (and lightly where it imports), checked against float64.
3. An autotune pass (``FASTSSL_TRITON_AUTOTUNE=1``) against the heuristic's tiles.

Writes ``gpu_check.md`` and ``gpu_check.json`` to ``bench/results/<machine key>/``; exits 1 if a
check failed. ``--dry-run`` runs the same code on the CPU under ``TRITON_INTERPRET=1`` with tiny
shapes and writes to a temporary folder (``--out`` to choose), so the script is known to work
before a card is lent.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")

# (dry-run shape, card shape) of each large case
SIZES = {
    "nt_xent_4m": ((32, 8), (2 * 1024 * 1024, 768)),  # rows per view: 2 views = 4M rows
    "barlow_twins": ((16, 32), (256, 8192)),
    "barlow_twins_float64": ((8, 32), (64, 8192)),
    "sinkhorn": ((16, 24), (4096, 3000)),
    "dino_pairs": ((2, 3, 4, 64), (2, 14, 64, 65_536)),  # targets, students (2 + 12), batch, classes
    "autotune_nt_xent": ((32, 16), (8192, 128)),
}


def _floating(value) -> bool:
    import torch

    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _cast(args: Sequence, dtype, device) -> list:
    """The sample's arguments on ``device``, floating tensors in ``dtype`` (gradients kept)."""
    out = []
    for value in args:
        if _floating(value):
            out.append(value.detach().to(device, dtype).requires_grad_(value.requires_grad))
        elif hasattr(value, "to"):
            out.append(value.to(device))
        else:
            out.append(value)
    return out


def _outputs(result) -> list:
    return [t for t in (result if isinstance(result, (tuple, list)) else [result]) if _floating(t)]


def _cotangents(outputs: Sequence) -> list:
    """A fixed random weight (float64, the same for every call) per output: the gradients checked
    are those of Σ w·o. Plain Σ o is degenerate for ops whose outputs sum to a constant — the rows
    of a whitening are centred, so ∂Σy/∂x = 0 exactly and its float64 "truth" is rounding noise
    (≈ 1e-17), against which any backend's relative error is 1e8."""
    import torch

    generator = torch.Generator().manual_seed(2)
    return [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.device) for o in outputs]


def _evaluate(fn: Callable, args: Sequence, differentiable: Optional[Sequence[bool]] = None):
    """(float outputs and the gradients (float64) of their weighted sum (``_cotangents``) for
    every input requiring one, which outputs were summed): those requiring a gradient, or the
    ``differentiable`` ones (the reference's: an output it detaches, a backend's op may not)."""
    import torch

    outputs = _outputs(fn(*args))
    differentiable = [o.requires_grad for o in outputs] if differentiable is None else differentiable
    leaves = [a for a in args if _floating(a) and a.requires_grad]
    summed = [o for o, use in zip(outputs, differentiable) if use and o.requires_grad]
    grads = []
    if leaves and summed:
        weighted = sum((o.double() * w).sum() for o, w in zip(summed, _cotangents(summed)))
        grads = torch.autograd.grad(weighted, leaves, allow_unused=True)
    return [o.detach() for o in outputs] + [g for g in grads if g is not None], differentiable


def _perturbed(args: Sequence, dtype) -> list:
    """The arguments (float64) with every floating input moved by one rounding of ``dtype``
    (relative ±eps/2, fixed signs): the reference's change is the error any implementation in
    ``dtype`` may make from rounding its inputs alone (the problem's conditioning)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    half_eps = torch.finfo(dtype).eps / 2
    out = []
    for value in args:
        if _floating(value):
            signs = torch.randint(0, 2, value.shape, generator=generator).to(value.device, torch.float64) * 2 - 1
            out.append((value.detach() * (1 + half_eps * signs)).requires_grad_(value.requires_grad))
        else:
            out.append(value)
    return out


def _relative_error(values: Sequence, exact: Sequence) -> float:
    worst = 0.0
    for value, truth in zip(values, exact):
        truth = truth.double()
        scale = truth.abs().max().item() if truth.numel() else 0.0
        diff = (value.double() - truth).abs().max().item() if truth.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def check_ops(device, log) -> List[Dict[str, object]]:
    """Section 1: one row per (op, sample, dtype, backend)."""
    import torch

    from fastssl import backends

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from runtime.test_ops import _op_samples  # noqa: E402 - the tests' sample per registered op

    rows = []
    for index, (op, sample) in enumerate(_op_samples(torch.float64)):
        reference = backends.implementation(op, "reference").fn
        for dtype_name in DTYPE_NAMES:
            dtype = getattr(torch, dtype_name)
            args = _cast(sample, dtype, device)
            exact, differentiable = _evaluate(reference, _cast(args, torch.float64, device))
            own_error = _relative_error(_evaluate(reference, _perturbed(_cast(args, torch.float64, device), dtype),
                                                  differentiable)[0], exact)
            try:
                own_error = max(own_error, _relative_error(
                    _evaluate(reference, _cast(args, dtype, device), differentiable)[0], exact))
            except Exception:  # noqa: BLE001 - the reference may lack a kernel in this dtype on this device
                pass
            elements = max((a.numel() for a in args if _floating(a)), default=1)
            bound = max(2 * own_error, elements * torch.finfo(dtype).eps)
            for backend in backends.MANIFEST[op]:
                row = {"section": "ops", "op": op, "sample": index, "dtype": dtype_name, "backend": backend,
                       "bound": bound}
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                reasons = backends.unavailable_reasons(op, backend, tensors)
                if reasons:
                    row.update(status="unavailable", reason="; ".join(reasons))
                else:
                    try:
                        error = _relative_error(_evaluate(backends.implementation(op, backend).fn,
                                                          _cast(args, dtype, device), differentiable)[0], exact)
                    except Exception as failure:  # noqa: BLE001 - any failure is a finding
                        row.update(status="failed", reason=f"{type(failure).__name__}: {failure}"[:300])
                    else:
                        row.update(error=error, status="ok" if error <= bound else "failed",
                                   reason="" if error <= bound else f"error {error:.3g} > bound {bound:.3g}")
                rows.append(row)
        log(f"ops: {op} (sample {index}) done")
    return rows


def _time_ms(step: Callable[[], object], device, leaves: Sequence = (), once: bool = False) -> float:
    """Median milliseconds of ``step``: CUDA events through ``triton.testing.do_bench`` (or one run
    with ``once``: cases of minutes); one wall-clock run on the CPU (dry run: the number is no timing)."""
    import torch

    if device.type == "cuda" and not once:
        from triton.testing import do_bench

        return do_bench(step, warmup=25, rep=100, grad_to_none=list(leaves))
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    step()
    synchronize()
    return (time.perf_counter() - start) * 1e3


def _peak_bytes(device) -> Optional[int]:
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _backend_rows(case: str, op: str, make_args: Callable[[object], list], dtypes: Sequence[str], device,
                  log) -> List[Dict[str, object]]:
    """One row per (dtype, backend) of ``op``: its time (forward + backward) and its error against
    the float64 reference on the same inputs."""
    import torch

    from fastssl import backends

    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        args = make_args(dtype)
        exact, differentiable = _evaluate(backends.implementation(op, "reference").fn,
                                          _cast(args, torch.float64, device))
        for backend in backends.MANIFEST[op]:
            row = {"section": "large", "case": case, "op": op, "dtype": dtype_name, "backend": backend}
            reasons = backends.unavailable_reasons(op, backend, [a for a in args if isinstance(a, torch.Tensor)])
            if reasons:
                row.update(status="unavailable", reason="; ".join(reasons))
                rows.append(row)
                continue
            fn = backends.implementation(op, backend).fn
            try:
                error = _relative_error(_evaluate(fn, args, differentiable)[0], exact)
                step = (lambda: _evaluate(fn, args, differentiable)) if any(differentiable) else (lambda: fn(*args))
                milliseconds = _time_ms(step, device, [a for a in args if _floating(a)])
            except Exception as failure:  # noqa: BLE001 - out of memory, a launch failure: a finding
                row.update(status="failed", reason=f"{type(failure).__name__}: {failure}"[:300])
            else:
                row.update(status="ok", error=error, median_ms=milliseconds)
            rows.append(row)
        log(f"{case} {dtype_name} done")
    return rows


def large_cases(device, dry: bool, log) -> List[Dict[str, object]]:
    """Section 2 (with the lightly rows where lightly imports)."""
    import torch

    import fastssl.functional as fn

    pick = 0 if dry else 1
    generator = torch.Generator(device).manual_seed(0)

    def randn(*shape, dtype=torch.float32, grad=True):
        return torch.randn(*shape, generator=generator, device=device, dtype=dtype).requires_grad_(grad)

    rows = []
    rows_per_view, dim = SIZES["nt_xent_4m"][pick]
    a, b = randn(rows_per_view, dim, dtype=torch.bfloat16), randn(rows_per_view, dim, dtype=torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row = {"section": "large", "case": "nt_xent_4m", "op": "info_nce_self", "dtype": "bfloat16", "backend": "auto",
           "shape": [2 * rows_per_view, dim], "int64_indexing": 2 * rows_per_view * dim >= 2**31}
    try:
        def step():
            loss = fn.nt_xent(a, b)
            loss.backward()
            return loss

        milliseconds = _time_ms(step, device, once=True)
        loss = fn.nt_xent(a.detach(), b.detach())
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(a.grad).all()) and bool(torch.isfinite(b.grad).all())
        # random views: every logit is near 0, so the loss is near log(2N − 1)
        near = abs(loss.item() - math.log(2 * rows_per_view - 1)) < 1.0
        row.update(status="ok" if finite and near else "failed", median_ms=milliseconds, loss=loss.item(),
                   peak_memory_bytes=_peak_bytes(device), reason="" if finite and near else "non-finite or off loss")
    except Exception as failure:  # noqa: BLE001
        row.update(status="failed", reason=f"{type(failure).__name__}: {failure}"[:300])
    rows.append(row)
    a = b = None
    log("nt_xent_4m done")

    batch, dim = SIZES["barlow_twins"][pick]
    rows += _backend_rows("barlow_twins", "barlow_twins",
                          lambda dtype: [randn(batch, dim, dtype=dtype), randn(batch, dim, dtype=dtype), 5e-3],
                          ("float32", "bfloat16"), device, log)
    batch, dim = SIZES["barlow_twins_float64"][pick]
    rows += _backend_rows("barlow_twins_float64", "barlow_twins",
                          lambda dtype: [randn(batch, dim, dtype=dtype), randn(batch, dim, dtype=dtype), 5e-3],
                          ("float64",), device, log)
    batch, prototypes = SIZES["sinkhorn"][pick]
    rows += _backend_rows("sinkhorn", "sinkhorn",
                          lambda dtype: [randn(batch, prototypes, dtype=dtype, grad=False), 3, 0.05, None, None, 0.0,
                                         False], ("float32", "bfloat16"), device, log)
    targets, students, batch, classes = SIZES["dino_pairs"][pick]
    rows += _backend_rows("dino_pairs", "soft_cross_entropy_pairs",
                          lambda dtype: [torch.softmax(randn(targets, batch, classes, grad=False) * 10, -1).to(dtype),
                                         randn(students, batch, classes, dtype=dtype), 10.0],
                          ("float32", "bfloat16"), device, log)
    rows += _lightly_rows(device, pick, randn, log)
    return rows


def _lightly_rows(device, pick: int, randn, log) -> List[Dict[str, object]]:
    """lightly's Barlow Twins and SwAV Sinkhorn at the same shapes (skipped where lightly is missing)."""
    from bench import peers

    try:
        peers.lightly_module()
    except ImportError as missing:
        return [{"section": "large", "case": "lightly", "backend": "lightly", "status": "unavailable",
                 "reason": f"lightly is not importable ({missing})"}]
    rows = []
    batch, dim = SIZES["barlow_twins"][pick]
    z_a, z_b = randn(batch, dim), randn(batch, dim)
    barlow = peers.lightly("BarlowTwinsLoss")()
    rows.append({"section": "large", "case": "barlow_twins", "op": "barlow_twins", "dtype": "float32",
                 "backend": "lightly", "status": "ok",
                 "median_ms": _time_ms(lambda: barlow(z_a, z_b).backward(), device, [z_a, z_b])})
    batch, prototypes = SIZES["sinkhorn"][pick]
    scores = randn(batch, prototypes, grad=False)
    sinkhorn = peers.lightly_sinkhorn(iterations=3, epsilon=0.05)()
    rows.append({"section": "large", "case": "sinkhorn", "op": "sinkhorn", "dtype": "float32", "backend": "lightly",
                 "status": "ok", "median_ms": _time_ms(lambda: sinkhorn(scores), device)})
    log("lightly done")
    return rows


def autotune_pass(device, dry: bool, log) -> List[Dict[str, object]]:
    """Section 3: NT-Xent (half inputs on the triton backend) with the heuristic's tiles, then with
    ``FASTSSL_TRITON_AUTOTUNE=1`` (each candidate timed once per shape)."""
    import torch

    import fastssl.functional as fn
    from fastssl import backends

    rows_per_view, dim = SIZES["autotune_nt_xent"][0 if dry else 1]
    dtype = torch.float32 if dry else torch.float16  # the interpreter: no half arithmetic worth the time
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(rows_per_view, dim, generator=generator, device=device, dtype=dtype).requires_grad_()
            for _ in range(2))
    rows = []
    for autotune in ("0", "1"):
        row = {"section": "autotune", "case": "autotune_nt_xent", "dtype": str(dtype).split(".")[1],
               "backend": "triton", "autotune": autotune == "1"}
        reasons = backends.unavailable_reasons("info_nce_self", "triton", [a, b])
        if reasons:
            row.update(status="unavailable", reason="; ".join(reasons))
            rows.append(row)
            continue
        with _environment("FASTSSL_TRITON_AUTOTUNE", autotune), _cpu_candidate_timer(device):
            try:
                def step():
                    fn.nt_xent(a, b, backend="triton").backward()

                step()  # the tuning run (timed once per candidate), outside the measurement
                row.update(status="ok", median_ms=_time_ms(step, device, [a, b]))
            except Exception as failure:  # noqa: BLE001
                row.update(status="failed", reason=f"{type(failure).__name__}: {failure}"[:300])
        rows.append(row)
    log("autotune done")
    return rows


@contextlib.contextmanager
def _cpu_candidate_timer(device):
    """On the CPU (dry run) the autotuner's ``triton.testing.do_bench`` has no CUDA events: one
    wall-clock run per candidate instead, so the tuning path itself runs."""
    if device.type == "cuda":
        yield
        return
    from triton import testing

    saved = testing.do_bench
    testing.do_bench = lambda fn, *args, **kwargs: _time_ms(fn, device)
    try:
        yield
    finally:
        testing.do_bench = saved


@contextlib.contextmanager
def _environment(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name)
        else:
            os.environ[name] = saved


def markdown(result: dict) -> str:
    info = result["machine"]
    lines = [f"# GPU check on {info['device_name']}", "",
             f"{'Dry run (CPU, TRITON_INTERPRET=1, tiny shapes): times are no measurement. ' if result['dry_run'] else ''}"
             f"torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, commit {info['commit']}, "
             f"{info['date_utc']} UTC; {result['seconds']:.0f} s.", ""]
    ops = [r for r in result["rows"] if r["section"] == "ops"]
    counts = {status: sum(r["status"] == status for r in ops) for status in ("ok", "failed", "unavailable")}
    lines += ["## Every op × dtype × backend against float64", "",
              f"{counts['ok']} ok, {counts['failed']} failed, {counts['unavailable']} unavailable "
              "(the reasons are in gpu_check.json).", ""]
    failed = [r for r in ops if r["status"] == "failed"]
    if failed:
        lines += ["| op | sample | dtype | backend | reason |", "|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['sample']} | {r['dtype']} | {r['backend']} | {r['reason']} |" for r in failed]
        lines.append("")
    lines += ["## Large cases and the autotune pass", "",
              "| case | dtype | backend | status | ms | × torch | error vs float64 | note |", "|---|---|---|---|---|---|---|---|"]
    others = [r for r in result["rows"] if r["section"] != "ops"]
    torch_ms = {(r.get("case"), r.get("dtype")): r.get("median_ms") for r in others if r.get("backend") == "torch"}
    for r in others:
        base = torch_ms.get((r.get("case"), r.get("dtype")))
        ratio = f"{base / r['median_ms']:.2f}" if base and r.get("median_ms") else ""
        milliseconds = f"{r['median_ms']:.3f}" if r.get("median_ms") is not None else ""
        error = f"{r['error']:.2e}" if r.get("error") is not None else ""
        note = r.get("reason") or (f"autotune={r['autotune']}" if "autotune" in r else "")
        if r.get("peak_memory_bytes"):
            note += f" peak {r['peak_memory_bytes'] / 2**30:.1f} GiB"
        lines.append(f"| {r.get('case')} | {r.get('dtype', '')} | {r['backend']} | {r['status']} | {milliseconds} | "
                     f"{ratio} | {error} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, TRITON_INTERPRET=1, tiny shapes, results in a temporary folder")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results/<machine>/)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    from bench import machine
    from fastssl import backends

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a card, or --dry-run here")
    device = torch.device("cpu" if args.dry_run else "cuda")
    backends.preload("triton")
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)

    rows = check_ops(device, log) + large_cases(device, args.dry_run, log) + autotune_pass(device, args.dry_run, log)
    info = machine.machine_info(device)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run
                       else REPO_ROOT / "bench" / "results" / info["key"])
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "dry_run": args.dry_run, "seconds": time.perf_counter() - start, "rows": rows}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(result))
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"{len(rows)} checks, {len(failed)} failed; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
