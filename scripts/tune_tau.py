#!/usr/bin/env python
"""Tune the projective-field threshold tau of one model on sample photos and store the result.

Measures SSIM (exact vs approximate heatmap) at tau = 1.0, 0.9, ..., 0.4 on each photo, fits a degree-2
polynomial and writes krypton/tuned/<model>.json (packed with the package, so model archives get it),
which Explainer.explain(target_ssim=...) and mode="approximate" read. --precision bf16 measures the maps
run in bf16 against the float32 exact map and writes krypton/tuned/<model>.bf16.json (read for requests
with precision="bf16").

    .venv/bin/python scripts/tune_tau.py --model efficientnet_lite0 \
        --photos chelsea coffee astronaut rocket motorcycle --patch 16 --stride 8 --threads 2

Only meaningful for a model with real weights: a randomly initialised VGG16 / ResNet18 / Inception3 falls
back to the paper's taus instead (see krypton/tuning.py). --weights loads a state_dict file.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

import krypton  # noqa: E402
from krypton import tuning  # noqa: E402
from krypton.models import PREPROCESS, build_model  # noqa: E402
from krypton.options import PRECISIONS  # noqa: E402

DEFAULT_PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "motorcycle"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", choices=sorted(PREPROCESS))
    ap.add_argument("--weights", default=None, help="state_dict file (default: the model's built-in weights)")
    ap.add_argument("--photos", nargs="+", default=DEFAULT_PHOTOS,
                    help=f"sample photos ({', '.join(tuning.SKIMAGE_PHOTOS + tuning.SKLEARN_PHOTOS)})")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--fill", default="gray")
    ap.add_argument("--taus", type=float, nargs="+", default=list(tuning.TAUS))
    ap.add_argument("--precision", default="float32", choices=list(PRECISIONS),
                    help="precision of the approximate maps (the reference is always float32 exact)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="output JSON (default krypton/tuned/<model>.json)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, weights_path=args.weights)
    if not getattr(model, "krypton_pretrained", True):
        print(f"warning: {args.model} has random weights; its tuning is meaningless for real use", file=sys.stderr)
    pre = PREPROCESS[args.model]
    images = {name: tuning.photo_tensor(name, args.model) for name in args.photos}
    explainer = krypton.Explainer(model)
    t0 = time.perf_counter()
    result = tuning.tune(
        explainer, args.model, images, args.patch, args.stride, fill=args.fill,
        normalize=(pre["mean"], pre["std"]), taus=args.taus, log=lambda m: print(m, flush=True),
        precision=args.precision,
        extra_meta={"weights": args.weights or ("packaged" if getattr(model, "krypton_pretrained", False)
                                                else "random"),
                    "command": "python scripts/tune_tau.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                               f"{torch.get_num_threads()} threads"})
    suffix = "" if args.precision == "float32" else f".{args.precision}"
    out = args.out or str(tuning.TUNED_DIR / f"{args.model}{suffix}.json")
    result.save(out)
    print(f"wrote {out} in {time.perf_counter() - t0:.0f}s")
    for t, m, f in zip(result.taus, result.mean_ssim(), result.to_json()["fit"]["fitted"]):
        print(f"tau={t:.1f} mean SSIM={m:.4f} fitted={f:.4f}")
    for target in (0.8, 0.9, 0.95):
        print(f"target SSIM {target}: tau {result.tau_for(target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
