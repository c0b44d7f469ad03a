"""``python -m fastssl.build [--part cpu|cuda]``: build the native extension (``csrc/``) once.

Loss calls never compile: ``backend="auto"`` uses the native backend only once this has run (or
with ``FASTSSL_NATIVE=build``, or after ``FASTSSL_BUILD_NATIVE=1 pip install
--no-build-isolation .``). Prints what each part builds, where, and how long it took; the CUDA
part is built only where torch has CUDA, and its failure leaves the CPU part usable.
"""
from __future__ import annotations

import argparse

import torch

from .runtime import native


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastssl.build",
                                     description="Build the native extension (csrc/) once; loss calls never compile it.")
    parser.add_argument("--part", choices=native.PARTS, action="append",
                        help="build only this part (repeatable); default: cpu, and cuda where torch has CUDA")
    args = parser.parse_args(argv)
    parts = args.part or [part for part in native.PARTS if part == "cpu" or torch.version.cuda]
    results = native.build(parts)
    for part, reasons in results.items():
        print(f"native {part}: " + ("built and loaded" if not reasons else "unusable: " + "; ".join(reasons)))
    return 0 if not any(results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
