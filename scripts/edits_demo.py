"""IncrementalModel on a synthetic video: an object (a crop of a real photo) moving over that photo.

Every frame differs from the first (clean) frame only where the object is; IncrementalModel
materializes the clean frame once and runs each frame incrementally over the object's bounding box.
Reports frames/s against stock batched inference of the same frames and the largest difference.

    .venv/bin/python scripts/edits_demo.py --model efficientnet_lite0 --frames 64 --object 40 --threads 2
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import krypton
from krypton.models import PREPROCESS, build_model
from krypton.preprocess import preprocess_array


def video(photo: torch.Tensor, frames: int, side: int) -> torch.Tensor:
    """frames x photo with a side x side crop of it (the cat's face) sliding along a diagonal path."""
    _, c, h, w = photo.shape
    crop = photo[:, :, 40:40 + side, 70:70 + side].clone()
    out = photo.repeat(frames, 1, 1, 1)
    for t in range(frames):
        y = int(round((h - side) * t / max(1, frames - 1)))
        x = int(round((w - side) * (0.5 + 0.4 * np.sin(2 * np.pi * t / frames))))
        out[t, :, y:y + side, x:x + side] = crop[0]
    return out


def model_and_photo(name: str, threads: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (seed 0; efficientnet_lite0 has real weights) and skimage's chelsea photo preprocessed for it."""
    torch.set_num_threads(threads)
    from skimage import data

    cfg = PREPROCESS[name]
    photo = preprocess_array(data.chelsea(), cfg["resize"], cfg["crop"], cfg["mean"], cfg["std"])[0].unsqueeze(0)
    torch.manual_seed(0)
    return build_model(name).eval(), photo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--object", type=int, default=40, help="side of the moving object, pixels")
    p.add_argument("--batch", type=int, default=16, help="frames per forward call")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    model, photo = model_and_photo(args.model, args.threads)
    frames = video(photo, args.frames, args.object)

    inc = krypton.IncrementalModel(model)
    t0 = time.perf_counter()
    inc.reference(photo)
    t_ref = time.perf_counter() - t0
    with torch.no_grad():
        model(frames[:args.batch])  # warm-up
        t0 = time.perf_counter()
        stock = torch.cat([model(frames[i:i + args.batch]) for i in range(0, args.frames, args.batch)])
        t_stock = time.perf_counter() - t0
    inc(frames[:args.batch])  # warm-up (plans)
    t0 = time.perf_counter()
    outs = []
    for i in range(0, args.frames, args.batch):
        outs.append(inc(frames[i:i + args.batch]))
    t_inc = time.perf_counter() - t0
    got = torch.cat(outs)
    err = (got - stock).abs().max().item()
    same = bool((got.argmax(1) == stock.argmax(1)).all())
    run = inc.last_run
    print(f"{args.model}, {args.frames} frames of {tuple(photo.shape[1:])}, object {args.object}px, batch {args.batch}, "
          f"{args.threads} threads")
    print(f"stock:       {args.frames / t_stock:7.1f} frames/s ({t_stock:.2f} s)")
    print(f"incremental: {args.frames / t_inc:7.1f} frames/s ({t_inc:.2f} s; reference materialized once in "
          f"{t_ref * 1e3:.0f} ms)  -> {t_stock / t_inc:.2f}x")
    print(f"max |incremental - stock| = {err:.2e} (float32), same top-1 on every frame: {same}")
    print(f"last batch: groups {[(g['size'], g['positions'], g['method']) for g in run.groups]}, "
          f"executed speedup (conv MACs) {run.executed_speedup:.2f}x")


if __name__ == "__main__":
    main()
