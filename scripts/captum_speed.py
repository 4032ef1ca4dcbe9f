"""krypton.captum.Occlusion vs captum.attr.Occlusion on a real photo and real weights (same answer, timed).

    .venv/bin/python scripts/captum_speed.py --model efficientnet_lite0 --window 16 --stride 8 --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch

import krypton.captum as kc
from edits_demo import model_and_photo  # scripts/ is on sys.path when this script runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--ppe", type=int, default=32, help="perturbations_per_eval (both)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import captum.attr as ca

    model, x = model_and_photo(args.model, args.threads)
    fn = lambda inp: torch.softmax(model(inp), dim=1)  # noqa: E731
    with torch.no_grad():
        target = int(fn(x).argmax())
    kw = dict(sliding_window_shapes=(3, args.window, args.window), strides=(3, args.stride, args.stride),
              baselines=0.0, target=target, perturbations_per_eval=args.ppe)
    t0 = time.perf_counter()
    ours = kc.Occlusion(fn).attribute(x, **kw)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = ca.Occlusion(fn).attribute(x, **kw)
    t_ref = time.perf_counter() - t0
    print(f"{args.model} 224px, window {args.window} stride {args.stride}, target {target}, {args.threads} threads")
    print(f"captum.attr.Occlusion:   {t_ref:.1f} s")
    print(f"krypton.captum.Occlusion: {t_ours:.1f} s (incl. capture, planning, materialization) -> {t_ref / t_ours:.2f}x")
    print(f"max |krypton - captum| = {(ours - ref).abs().max().item():.2e} (max |attribution| {ref.abs().max().item():.2e})")


if __name__ == "__main__":
    main()
