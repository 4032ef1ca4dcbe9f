"""Theoretical speedups of the architectures users serve (tests/zoo.py, torchvision layout, full size).

For each model at 224 x 224, patch 16, stride 4: the centre bound (conv multiply-adds of full inference
over those of incremental inference, patch at the centre; no inference is run besides one zero image for
the shapes), where the incremental part stops (fallback_reason) and what that costs: the share of the
conv multiply-adds that run after that point at full size for every position (global part), and the
centre bound of the same network without its SE blocks (SE's global pooling is a boundary).

    .venv/bin/python scripts/zoo_speedups.py [--size 224] [--patch 16] [--stride 4] [--models a,b] [--export]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import krypton  # noqa: E402
import zoo  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--stride", type=int, default=4)
    ap.add_argument("--models", default=",".join(zoo.FULL))
    ap.add_argument("--export", action="store_true", help="also torch.export each model and print its bound")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    print("| model | input | centre bound | conv GMACs (full) | incremental part stops at | "
          "conv MACs after the stop (global) |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        model = zoo.full(name)
        shape = (1, 3, args.size, args.size)
        est = krypton.estimate_speedup(model, shape, args.patch, args.stride)
        glob = sum(layer["full_macs"] for layer in est.layers
                   if layer["kind"] == "conv" and layer["incremental_macs"] == layer["full_macs"])
        reason = (est.fallback_reason or "-").replace("|", "/")
        no_se = ""
        if any(isinstance(m, zoo.SqueezeExcitation) for m in model.modules()):
            bare = without_se(zoo.full(name))
            no_se = f" (without its SE blocks: {krypton.estimate_speedup(bare, shape, args.patch, args.stride).speedup:.2f}x)"
        if args.export:  # the same architecture as a torch.export program: the aten rules give the same bound
            program = torch.export.export(model, (torch.zeros(shape),))
            no_se += f" (exported: {krypton.estimate_speedup(program, shape, args.patch, args.stride).speedup:.2f}x)"
        print(f"| {name} | {args.size} | {est.speedup:.2f}x{no_se} | {est.full_macs / 1e9:.2f} | {reason} | "
              f"{100.0 * glob / max(1, est.full_macs):.0f}% |", flush=True)


def without_se(model: torch.nn.Module) -> torch.nn.Module:
    """The same network with every SqueezeExcitation replaced by the identity: what the SE boundary costs."""
    for parent in list(model.modules()):
        for key, child in list(parent.named_children()):
            if isinstance(child, zoo.SqueezeExcitation):
                setattr(parent, key, torch.nn.Identity())
    return model


if __name__ == "__main__":
    main()
