#!/usr/bin/env python3
"""Memory benchmark: the measured peak of every request against the budget and the engine's estimate.

For each default model, the Explainer is calibrated the way the server does it at load
(Explainer.calibrate_memory), then one request per (method, batch-size choice) runs on a real photo and
its peak memory is measured (krypton.memory.PeakMemory: peak RSS delta on CPU). The table says, per
row, the batch requested and used, the estimate, the measurement, their ratio and whether the peak
stayed within the budget. Writes bench/results/<name>.json and .md.

    .venv/bin/python scripts/bench_memory.py                      # all four models, budget 1 GiB
    .venv/bin/python scripts/bench_memory.py --models resnet18 --budget 536870912
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import krypton  # noqa: E402
from bench.images import model_inputs  # noqa: E402
from bench.measure import machine_info  # noqa: E402
from krypton.memory import PeakMemory  # noqa: E402
from krypton.models import PREPROCESS, build_model  # noqa: E402

MODELS = ("resnet18", "efficientnet_lite0", "vgg16", "inception_v3")
# (label, options): every method, automatic and explicit batch sizes
CASES = (
    ("incremental, auto batch", {}),
    ("incremental, batch 256", {"batch_size": 256}),
    ("incremental, batch 16", {"batch_size": 16}),
    ("tau 0.5, auto batch", {"tau": 0.5}),
    ("drill-down, auto batch", {"drilldown": True}),
    ("naive, auto batch", {"method": "naive"}),
    ("naive, batch 256", {"method": "naive", "batch_size": 256}),
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--budget", type=int, default=1 << 30, help="memory budget in bytes (the server's default)")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=8, help="stride of the incremental rows")
    p.add_argument("--naive-stride", type=int, default=16, help="stride of the naive rows (full re-inference is slow)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="memory-cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, calibration = [], {}
    for name in args.models.split(","):
        model = build_model(name).eval()
        pre = PREPROCESS[name]
        image = model_inputs(pre, 1)[0][1][0]  # the first sample photo, (3, H, W)
        shape = (1,) + tuple(image.shape)
        explainer = krypton.Explainer(model, cache_bytes=0)
        t0 = time.perf_counter()
        explainer.prepare(shape, args.patch, args.stride)
        models = explainer.calibrate_memory(shape, args.patch, args.stride, args.budget)
        calibration[name] = {"seconds": time.perf_counter() - t0,
                             **{m: vars(v) for m, v in models.items()}}
        print(f"{name}: calibrated in {calibration[name]['seconds']:.1f}s {models}", flush=True)
        for label, options in CASES:
            stride = args.naive_stride if options.get("method") == "naive" else args.stride
            explainer.prepare(shape, args.patch, stride)  # plans are built at load in the server too
            with PeakMemory(explainer.device) as pm:
                exp = explainer.explain(image, patch_size=args.patch, stride=stride, memory_budget=args.budget,
                                        normalize=(pre["mean"], pre["std"]), fill="gray", **options)
            mem = exp.memory
            row = {"model": name, "case": label, "stride": stride, "positions": exp.positions,
                   "batch_requested": options.get("batch_size", "auto"), "batch_used": exp.batch_size,
                   "budget_bytes": args.budget, "estimated_peak_bytes": mem["estimated_peak_bytes"],
                   "measured_peak_bytes": pm.peak_bytes, "measured_method": pm.method,
                   "ratio_estimate_to_measured": mem["estimated_peak_bytes"] / max(1, pm.peak_bytes or 1),
                   "within_budget": (pm.peak_bytes or 0) <= args.budget, "seconds": exp.timings_ms["total"] / 1e3}
            rows.append(row)
            print(f"  {label:26s} b {row['batch_requested']!s:>4} -> {exp.batch_size:3d}  est "
                  f"{mem['estimated_peak_bytes'] / 2**20:6.0f} MB  measured {pm.peak_bytes / 2**20:6.0f} MB  "
                  f"ratio {row['ratio_estimate_to_measured']:.2f}  {'ok' if row['within_budget'] else 'OVER'}",
                  flush=True)
    out = {"machine": machine_info("cpu"), "settings": vars(args), "calibration": calibration, "rows": rows}
    base = os.path.join(ROOT, "bench", "results", args.name)
    with open(base + ".json", "w") as f:
        json.dump(out, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(report(out))
    print(f"wrote {base}.json and {base}.md")


def report(out: dict) -> str:
    m, s = out["machine"], out["settings"]
    lines = [f"# Memory: measured peak vs budget vs estimate ({s['name']})", "",
             f"- machine: {m['cpu_model']}, {m['cpus_usable']} cores, torch {m['torch_version']}, "
             f"{s['threads']} threads; commit {m['git_commit']}{' (dirty)' if m['git_dirty'] else ''}",
             f"- command: `{m['command']}`", f"- date: {m['date_utc']}",
             f"- budget {s['budget'] / 2**20:.0f} MiB; patch {s['patch']}, stride {s['stride']} "
             f"(naive rows: stride {s['naive_stride']}); peak = {out['rows'][0]['measured_method']}", "",
             "| model | case | positions | batch (asked -> used) | estimate MB | measured MB | estimate / measured | within budget |",
             "|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['model']} | {r['case']} | {r['positions']} | {r['batch_requested']} -> {r['batch_used']} | "
                     f"{r['estimated_peak_bytes'] / 2**20:.0f} | {r['measured_peak_bytes'] / 2**20:.0f} | "
                     f"{r['ratio_estimate_to_measured']:.2f} | {'yes' if r['within_budget'] else '**no**'} |")
    lines += ["", "Calibration at load (seconds, per method: factor, fixed bytes):", ""]
    for name, c in out["calibration"].items():
        parts = [f"{k} factor {v['factor']:.2f}, fixed {v['fixed_bytes'] / 2**20:.0f} MB"
                 for k, v in c.items() if isinstance(v, dict)]
        lines.append(f"- {name}: {c['seconds']:.1f} s; " + "; ".join(parts))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
