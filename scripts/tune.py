#!/usr/bin/env python
"""Tune the approximate configurations (precision x tau x drill-down) of one model and store the result.

On each tuning photo: one full heatmap per (precision, tau) at the smallest stride, timed; every other
stride and every drill-down setting is derived from those maps (krypton/tuning.py). Writes
krypton/tuned/<model>.json (packed with the package, so model archives get it), which
Explainer.explain(target_ssim=...) and mode="approximate" read.

    .venv/bin/python scripts/tune.py --model efficientnet_lite0 --threads 2

Only meaningful for a model with real weights: a randomly initialised VGG16 / ResNet18 / Inception3 falls
back to the paper's taus instead, with no quality promise (see krypton/tuning.py). --weights loads a
state_dict file. The default photos are krypton.tuning.TUNING_PHOTOS; the quality benchmark holds out the
others (scripts/bench_quality.py).
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

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0", choices=sorted(PREPROCESS))
    ap.add_argument("--weights", default=None, help="state_dict file (default: the model's built-in weights)")
    ap.add_argument("--photos", nargs="+", default=list(tuning.TUNING_PHOTOS),
                    help=f"sample photos ({', '.join(tuning.SKIMAGE_PHOTOS + tuning.SKLEARN_PHOTOS)})")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--strides", type=int, nargs="+", default=list(tuning.STRIDES))
    ap.add_argument("--fill", default="gray")
    ap.add_argument("--taus", type=float, nargs="+", default=list(tuning.TAUS))
    ap.add_argument("--precisions", nargs="+", default=list(tuning.PRECISIONS))
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
        explainer, args.model, images, args.patch, strides=args.strides, fill=args.fill,
        normalize=(pre["mean"], pre["std"]), precisions=args.precisions, taus=args.taus,
        log=lambda m: print(m, flush=True),
        extra_meta={"weights": args.weights or ("packaged" if getattr(model, "krypton_pretrained", False)
                                                else "random"),
                    "command": "python scripts/tune.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
                               f"{torch.get_num_threads()} threads"})
    out = args.out or str(tuning.TUNED_DIR / f"{args.model}.json")
    result.save(out)
    print(f"wrote {out} in {time.perf_counter() - t0:.0f}s")
    for stride, results in sorted(result.results.items()):
        print(f"stride {stride}: Pareto front (mean SSIM, worst photo, median expected speedup)")
        for res in tuning.pareto_front(results):
            print(f"  {res.config.label():45s} {res.mean_ssim:.3f} {res.min_ssim:.3f} {res.median_speedup:.2f}x")
        for target in (0.8, 0.9, 0.95):
            chosen = result.choose(target, stride, args.patch)
            print(f"  target SSIM {target}: {'exact' if chosen is None else chosen.config.label()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
