"""Print the theoretical speedups of the default models as a Markdown table (no occlusion is run).

    .venv/bin/python scripts/speedup_table.py [--patch 16] [--stride 4] [--tau 1.0] [--models a,b]

"centre" is the paper's bound (one position with the patch at the image centre, conv multiply-adds
of full / incremental inference); "grouped" is the bound for the windows the engine actually runs
over the whole grid (positions grouped by distance to the border, see krypton/grouping.py).
"""
from __future__ import annotations

import argparse

import numpy as np

import krypton
from krypton import geometry as geo
from krypton.models import MODELS, PREPROCESS, build_model


def grouped_bound(explainer: krypton.Explainer, size: int, patch: int, stride: int, tau: float) -> float:
    shape = (1, 3, size, size)
    origins = geo.grid_origins(size, size, patch, stride)
    full = executed = 0
    for group in explainer.groups(shape, patch, stride, tau):
        f, i = explainer.plan(shape, patch, stride, tau, origins[group]).macs()
        full, executed = full + f * len(group), executed + i * len(group)
    return full / executed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--models", default=",".join(MODELS), help="comma list (default: every krypton.models model)")
    args = parser.parse_args()
    print(f"| model | input | centre bound | grouped bound | conv GMACs (full) |  (patch {args.patch}, "
          f"stride {args.stride}, tau {args.tau})")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        size = PREPROCESS[name]["crop"]  # the model's own input size
        model = build_model(name)
        estimate = krypton.estimate_speedup(model, (1, 3, size, size), args.patch, args.stride, args.tau)
        grouped = grouped_bound(krypton.Explainer(model, cache_bytes=0), size, args.patch, args.stride, args.tau)
        print(f"| {name} | {size} | {estimate.speedup:.2f}x | {grouped:.2f}x | {estimate.full_macs / 1e9:.2f} |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
