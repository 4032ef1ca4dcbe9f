#!/usr/bin/env python
"""Reduced precision side by side: float32 exact vs precision=bf16, incremental and naive, one model and photo.

For each precision: the incremental run over the whole grid (plans built and the clean image's
activations materialized before timing, the fastest of --repeats runs) and naive re-inference timed on
--naive-positions positions and extrapolated to the grid. SSIM (krypton.heatmap_ssim) of each bf16
map against the float32 exact map, and whether the label is the float32 one.

    .venv/bin/python scripts/bench_precision.py --model efficientnet_lite0 --stride 8 --threads 2
    .venv/bin/python scripts/bench_precision.py --model vgg16 --stride 16 --threads 2

Only efficientnet_lite0 has real weights (its photo: chelsea); the others run their seeded random init on
the same photo, which is fine for speed but not for SSIM.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import krypton  # noqa: E402
from krypton import geometry as geo  # noqa: E402
from krypton.models import PREPROCESS, build_model  # noqa: E402
from krypton.tuning import photo_tensor  # noqa: E402


def timed(explainer, image, repeats, **options):
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        exp = explainer.explain(image, **options)
        seconds = time.perf_counter() - t0
        if best is None or seconds < best[1]:
            best = (exp, seconds)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", choices=sorted(PREPROCESS))
    ap.add_argument("--photo", default="chelsea")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--precisions", nargs="+", default=["bf16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--naive-positions", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model)
    pre = PREPROCESS[args.model]
    image = photo_tensor(args.photo, args.model)
    shape = (1,) + tuple(image.shape)
    options = dict(patch_size=args.patch, stride=args.stride, fill="gray", normalize=(pre["mean"], pre["std"]))
    grid = geo.grid_origins(shape[2], shape[3], args.patch, args.stride)
    sample = grid[:: max(1, len(grid) // args.naive_positions)][: args.naive_positions]
    explainer = krypton.Explainer(model)
    precisions = ["float32", *args.precisions]
    for precision in precisions:  # plans, materialized activations (and their cast copies): not timed
        explainer.prepare(shape, args.patch, args.stride, precision=precision)
        explainer.explain(image, **options, precision=precision, origins=sample[:1])
    print(f"{args.model} ({'real' if getattr(model, 'krypton_pretrained', False) else 'random'} weights), "
          f"{args.photo}, {shape[2]}x{shape[3]}, P{args.patch} S{args.stride}, {len(grid)} positions, "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}", flush=True)
    exact, t_exact = timed(explainer, image, args.repeats, **options)
    for precision in precisions:
        exp, seconds = (exact, t_exact) if precision == "float32" else \
            timed(explainer, image, args.repeats, **options, precision=precision)
        naive, t_naive = timed(explainer, image, 1, **options, precision=precision, method="naive", origins=sample)
        t_naive *= len(grid) / len(sample)
        print(f"  {precision:8s} incremental {seconds:6.2f} s ({t_exact / seconds:4.2f}x of float32 exact, batch "
              f"{exp.batch_size}) | naive ~{t_naive:6.1f} s ({len(sample)} positions timed) | SSIM vs float32 "
              f"{krypton.heatmap_ssim(exact.heatmap, exp.heatmap):.4f} | label {exp.label} "
              f"{'=' if exp.label == exact.label else '!='} float32 {exact.label}, p {exp.probability:.3f}", flush=True)
    print(f"  load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
