#!/usr/bin/env python3
"""Memory benchmark: the measured peak of every request against the budget and the engine's estimate.

For each default model (and one TorchScript model: a default model traced, saved and loaded back as a
user's .pt would be), the Explainer is calibrated the way the server does it at load
(Explainer.calibrate_memory), then one request per (method, batch-size choice) runs on a real photo and its
peak memory is measured (krypton.memory.PeakMemory: peak RSS delta on CPU). The table says, per row, the
batch requested and used, the estimate, the measurement, their ratio and whether the peak stayed within the
budget. Writes bench/results/<name>.json and .md.

    .venv/bin/python scripts/bench_memory.py --threads 1               # all models, budget 1 GiB
    .venv/bin/python scripts/bench_memory.py --models resnet18 --torchscript none --cases "naive*"
"""
from __future__ import annotations

import argparse
import fnmatch
import io
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
# (label, options): every method, automatic and explicit batch sizes (256 is clamped where it does not fit)
CASES = (
    ("incremental, auto batch", {}),
    ("incremental, batch 256", {"batch_size": 256}),
    ("incremental, batch 64", {"batch_size": 64}),
    ("incremental, batch 16", {"batch_size": 16}),
    ("incremental, batch 1", {"batch_size": 1}),
    ("tau 0.5, auto batch", {"tau": 0.5}),
    ("drill-down, auto batch", {"drilldown": True}),
    ("bf16, auto batch", {"precision": "bf16"}),
    ("naive, auto batch", {"method": "naive"}),
    ("naive, batch 256", {"method": "naive", "batch_size": 256}),
    ("naive, batch 1", {"method": "naive", "batch_size": 1}),
)
# A TorchScript model runs full re-inference whatever the method (formats.py): its own batch choices
TORCHSCRIPT_CASES = (
    ("auto batch", {}),
    ("batch 256", {"batch_size": 256}),
    ("batch 16", {"batch_size": 16}),
)
# Every case runs on a new image (the cache emptied first: the request makes its clean pass); these run once
# more on the same image, whose clean activations the server's cache then holds (what a repeated request,
# or drill-down's second stage, gets)
REPEATED = ("incremental, auto batch", "incremental, batch 1", "naive, auto batch", "naive, batch 1", "auto batch")


def torchscript(model: torch.nn.Module, shape) -> torch.jit.ScriptModule:
    """`model` traced, saved and loaded back: what a user's TorchScript .pt file gives the engine."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(model, torch.zeros(shape)), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--torchscript", default="resnet18", help="default model to trace as the TorchScript one "
                                                              "('none': no TorchScript rows)")
    p.add_argument("--cases", default="*", help="only the cases whose label matches this pattern (fnmatch)")
    p.add_argument("--budget", type=int, default=1 << 30, help="memory budget in bytes (the server's default)")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--stride", type=int, default=8, help="stride of the incremental rows")
    p.add_argument("--naive-stride", type=int, default=16, help="stride of the naive rows (full re-inference is slow)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="memory-cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = [(name, name, CASES) for name in args.models.split(",")]
    if args.torchscript != "none":
        runs.append((f"{args.torchscript} (TorchScript)", args.torchscript, TORCHSCRIPT_CASES))
    rows, calibration = [], {}
    for label, name, cases in runs:
        pre = PREPROCESS[name]
        image = model_inputs(pre, 1)[0][1][0]  # the first sample photo, (3, H, W)
        shape = (1,) + tuple(image.shape)
        model = build_model(name).eval()
        if cases is TORCHSCRIPT_CASES:
            model = torchscript(model, shape)
        explainer = krypton.Explainer(model)  # the server's cache size
        explainer.prepare(shape, args.patch, args.stride)  # the server's warm-up plan, before calibrating
        t0 = time.perf_counter()
        models = explainer.calibrate_memory(shape, args.patch, args.stride, args.budget)
        calibration[label] = {"seconds": time.perf_counter() - t0,
                              **{m: {"points": v.points, "factor": v.factor, "source": v.source,
                                     "clean_bytes": v.clean_bytes}
                                 for m, v in models.items()}}
        print(f"{label}: calibrated in {calibration[label]['seconds']:.1f}s", flush=True)
        for case, options in cases:
            if not fnmatch.fnmatch(case, args.cases):
                continue
            stride = args.naive_stride if options.get("method") == "naive" else args.stride
            explainer.prepare(shape, args.patch, stride, precision=options.get("precision", "float32"))
            explainer.clear_cache()
            for again in (False, True) if case in REPEATED else (False,):
                with PeakMemory(explainer.device) as pm:  # plans are built at load in the server too
                    exp = explainer.explain(image, patch_size=args.patch, stride=stride, memory_budget=args.budget,
                                            normalize=(pre["mean"], pre["std"]), fill="gray", **options)
                rows.append(row(label, case + (", same image again" if again else ""), options, stride, exp, pm,
                                args.budget))
                r = rows[-1]
                print(f"  {r['case']:44s} b {r['batch_requested']!s:>4} -> {exp.batch_size:3d}  {exp.cache}  est "
                      f"{r['estimated_peak_bytes'] / 2**20:6.0f} MB  measured {pm.peak_bytes / 2**20:6.0f} MB  "
                      f"ratio {r['ratio_estimate_to_measured']:.2f}  {'ok' if r['within_budget'] else 'OVER'}  "
                      f"{r['seconds']:.1f} s", flush=True)
        explainer.clear_cache()
    out = {"machine": machine_info("cpu"), "settings": vars(args), "calibration": calibration, "rows": rows}
    base = os.path.join(ROOT, "bench", "results", args.name)
    with open(base + ".json", "w") as f:
        json.dump(out, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(report(out))
    print(f"wrote {base}.json and {base}.md")


def row(model: str, case: str, options: dict, stride: int, exp, pm: PeakMemory, budget: int) -> dict:
    mem = exp.memory
    return {"model": model, "case": case, "stride": stride, "positions": exp.positions,
            "batch_requested": options.get("batch_size", "auto"), "batch_used": exp.batch_size,
            "budget_bytes": budget, "estimated_peak_bytes": mem["estimated_peak_bytes"],
            "measured_peak_bytes": pm.peak_bytes, "measured_method": pm.method,
            "ratio_estimate_to_measured": mem["estimated_peak_bytes"] / max(1, pm.peak_bytes or 1),
            "within_budget": (pm.peak_bytes or 0) <= budget, "seconds": exp.timings_ms["total"] / 1e3,
            "incremental": exp.incremental, "clean_pass": exp.cache == "miss"}


def report(out: dict) -> str:
    m, s = out["machine"], out["settings"]
    lines = [f"# Memory: measured peak vs budget vs estimate ({s['name']})", "",
             f"- machine: {m['cpu_model']}, {m['cpus_usable']} cores, torch {m['torch_version']}, "
             f"{s['threads']} threads; commit {m['git_commit']}{' (dirty)' if m['git_dirty'] else ''}",
             f"- command: `{m['command']}`", f"- date: {m['date_utc']}",
             f"- budget {s['budget'] / 2**20:.0f} MiB; patch {s['patch']}, stride {s['stride']} "
             f"(naive rows: stride {s['naive_stride']}); peak = {out['rows'][0]['measured_method']}",
             "- drill-down: its automatic configuration (approx.py); bf16: precision='bf16' (its first request "
             "also builds the converted weights); TorchScript: the model traced, saved and loaded back "
             "(full re-inference whatever the method)",
             "- each case runs on a new image (its clean pass runs in the request: 'clean pass' yes); a few run once "
             "more on the same image, whose clean activations are then cached (as in the server: 512 MB cache)", "",
             "| model | case | positions | batch (asked -> used) | clean pass | estimate MB | measured MB | "
             "estimate / measured | within budget |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['model']} | {r['case']} | {r['positions']} | {r['batch_requested']} -> {r['batch_used']} | "
                     f"{'yes' if r['clean_pass'] else 'no (cached)'} | {r['estimated_peak_bytes'] / 2**20:.0f} | {r['measured_peak_bytes'] / 2**20:.0f} | "
                     f"{r['ratio_estimate_to_measured']:.2f} | {'yes' if r['within_budget'] else '**no**'} |")
    lines += ["", "Calibration at load (seconds; per method the measured points of runs against cached activations, "
              "planned MB -> modelled peak MB, the slope past the last, and the clean pass's modelled peak):", ""]
    for name, c in out["calibration"].items():
        parts = [f"{k}: " + ", ".join(f"{x / 2**20:.0f} -> {y / 2**20:.0f}" for x, y in v["points"])
                 + f", then {v['factor']:.2f} per planned byte; clean pass {v['clean_bytes'] / 2**20:.0f}"
                 for k, v in c.items() if isinstance(v, dict)]
        lines.append(f"- {name}: {c['seconds']:.1f} s; " + "; ".join(parts))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
