#!/usr/bin/env python
"""Benchmark (issue 5): krypton's incremental/approximate OBE vs naive re-inference, Captum's Occlusion
and Captum's IntegratedGradients, in ONE process, on the same images and labels.

    python scripts/bench.py --quick                 # ~2-3 min on a quiet 2-core CPU (see bench/README.md)
    python scripts/bench.py                         # full preset: 4 models, patch 16, stride 4
    python scripts/bench.py --models vgg16 --patch 32 --stride 16 --images 2
    python scripts/bench.py --device cuda           # same on a GPU

Writes bench/results/<name>.json (every run + machine + command), <name>.md (tables), <name>.png
(speedup per model and mode). Everything krypton does goes through its public API.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The helpers live in the package bench/ at the repository root; this file's own directory (first on
# sys.path when run as a script) must not shadow it with this module's name.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, ROOT)



def _onednn_cache_from_argv(argv) -> None:
    """oneDNN reads ONEDNN_PRIMITIVE_CACHE_CAPACITY when torch loads, so --onednn-cache-capacity must be
    applied before `import torch` (setting it later has no effect: checked)."""
    for i, a in enumerate(argv):
        if a == "--onednn-cache-capacity" and i + 1 < len(argv):
            os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = argv[i + 1]
        elif a.startswith("--onednn-cache-capacity="):
            os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = a.split("=", 1)[1]


if __name__ == "__main__":
    _onednn_cache_from_argv(sys.argv[1:])

import numpy as np  # noqa: E402
import torch  # noqa: E402

# The full preset's models (the committed reference runs); --models takes any krypton.models name.
MODEL_NAMES = ("vgg16", "resnet18", "inception_v3", "efficientnet_lite0")

PRESETS = {
    # The paper's setting on all four models; baselines sampled, everything krypton does in full.
    "full": dict(models=list(MODEL_NAMES), patch=16, stride=4, images=1, batch_sizes=[16, 32, 64],
                 layouts=["nchw", "channels_last"], sample_batches=2, ppe=[16, 32, 64], taus=[0.9, 0.7, 0.5],
                 ig_steps=[25, 50, 100, 200], ig_batch=16),
    # A fast end-to-end pass: two smaller models, stride 8 (~4x fewer positions), one timed batch.
    "quick": dict(models=["efficientnet_lite0", "resnet18"], patch=16, stride=8, images=1,
                  batch_sizes=[16, 32, 64], layouts=["nchw", "channels_last"], sample_batches=1, ppe=[32, 64],
                  taus=[0.5], ig_steps=[25, 50], ig_batch=16),
}
SKIPPABLE = ("naive", "captum", "approx", "drilldown", "ig", "memprobe", "dropin", "segments", "edits", "cold",
             "profile")


def _ints(s):
    return [int(v) for v in s.split(",") if v.strip()]


def _floats(s):
    return [float(v) for v in s.split(",") if v.strip()]


def _names(s):
    return [v.strip() for v in s.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="quick preset (see PRESETS); options below override it")
    p.add_argument("--models", type=_names, help=f"comma list of krypton.models names (full preset: "
                   f"{', '.join(MODEL_NAMES)})")
    p.add_argument("--patch", type=int, help="occlusion patch side (paper 16; 8/32 as options)")
    p.add_argument("--stride", type=int, help="occlusion stride (paper 4; 8/16 as options)")
    p.add_argument("--fill", default="gray", help="patch colour: gray, black, mean or a number (model input space)")
    p.add_argument("--images", type=int, help="how many photos (chelsea, coffee, astronaut, rocket)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--batch-sizes", type=_ints, help="naive batch sizes, e.g. 16,32,64")
    p.add_argument("--layouts", type=_names, help="naive layouts: nchw,channels_last")
    p.add_argument("--sample-batches", type=int,
                   help="timed batches per naive/Captum configuration (after 1 warm-up); 0 = run them in full")
    p.add_argument("--full-baselines", action="store_true",
                   help="also run the best naive and best Captum configuration in full (checks extrapolation)")
    p.add_argument("--ppe", type=_ints, help="Captum Occlusion perturbations_per_eval values to try")
    p.add_argument("--taus", type=_floats, help="approximate-mode taus (the per-model paper/tuned tau is added)")
    p.add_argument("--drilldown-r", type=float, default=0.25, help="drill-down: fraction refined at the full stride")
    p.add_argument("--drilldown-target", type=float, default=3.0, help="drill-down: target speedup")
    p.add_argument("--ig-steps", type=_ints, help="Integrated Gradients steps, e.g. 25,50,100,200")
    p.add_argument("--ig-batch", type=int, help="IG internal_batch_size (capped at steps)")
    p.add_argument("--inc-batch", type=int, help="krypton batch size (default: the engine's memory-budget choice)")
    p.add_argument("--onednn-cache-capacity", type=int,
                   help="set ONEDNN_PRIMITIVE_CACHE_CAPACITY (before torch loads; default: oneDNN's 1024). "
                        "Recorded in the JSON either way")
    p.add_argument("--n-segments", type=int, default=50, help="segments: SLIC n_segments for FeatureAblation")
    p.add_argument("--edit-frames", type=int, default=16, help="edits: edited frames per batch")
    p.add_argument("--edit-size", type=int, default=32, help="edits: side of the edited square, pixels")
    p.add_argument("--skip", type=_names, default=[], help=f"skip contenders: {','.join(SKIPPABLE)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="results name (default: <preset>-<device>-p<patch>s<stride>-<date>)")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--no-chart", action="store_true")
    args = p.parse_args(argv)
    preset = "quick" if args.quick else "full"
    for key, value in PRESETS[preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.preset = preset
    from krypton.models import MODELS

    bad = [m for m in args.models if m not in MODELS]
    if bad:
        p.error(f"--models: unknown {bad}; choose from {', '.join(MODELS)}")
    bad = [s for s in args.skip if s not in SKIPPABLE]
    if bad:
        p.error(f"--skip: unknown {bad}; choose from {', '.join(SKIPPABLE)}")
    bad = [v for v in args.layouts if v not in ("nchw", "channels_last")]
    if bad:
        p.error(f"--layouts: unknown {bad}; choose nchw and/or channels_last")
    if args.sample_batches < 0:
        p.error("--sample-batches must be >= 0")
    return args


def _parse_fill(fill):
    try:
        return float(fill)
    except ValueError:
        return fill


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _row_line(r) -> str:
    if r.skipped:
        return f"{r.label}: SKIPPED ({r.skipped})"
    mem = f"{r.peak_bytes / 2**20:.0f} MB" if r.peak_bytes is not None else "n/a"
    extra = f", SSIM {r.ssim:.4f}" if r.ssim is not None else ""
    extra += f", max|dp| {r.max_abs_diff:.1e}" if r.max_abs_diff is not None else ""
    return f"{r.label}: {r.seconds:.2f} s/heatmap ({r.timing}), peak {mem}, batch {r.batch_size}{extra}"


def bench_model(args, name, model, preprocess_cfg, images, meter, pretrained) -> tuple[list, list, dict]:
    """All contenders for one model on `images` [(name, tensor)]; returns (runs, memory rows, info)."""
    from bench import contenders as C
    import krypton
    from krypton.options import fill_values

    device = meter.device
    model = model.to(device).eval()
    fill = fill_values(_parse_fill(args.fill), images[0][1].shape[1],
                       normalize=(preprocess_cfg["mean"], preprocess_cfg["std"]))
    runs, mem_rows = [], []
    # Plans are cached across runs and images (as in a server); the activation cache is emptied before
    # every timed run (contenders.clear_activation_cache), so each run pays for its clean pass.
    explainer = krypton.Explainer(model)
    tuned, tuned_src = C.tuned_tau(name, args.stride, args.patch)
    taus = sorted(set(args.taus + ([tuned] if tuned else [])), reverse=True)
    rng = np.random.default_rng(args.seed)
    info = {"pretrained": pretrained, "input": images[0][1].shape[-1], "tuned_tau": tuned,
            "tuned_tau_source": tuned_src}
    skip = set(args.skip)
    model_cl = None
    with torch.no_grad():  # first call of the process for this model: thread pools, lazy init
        model(images[0][1].to(device))
    for img_name, image in images:
        image = image.to(device)
        label, prob, clean_s = C.clean_forward(model, image, meter)
        case = C.Case(name, model, img_name, image, args.patch, args.stride, fill, label, meter, rng,
                      explainer=explainer, clean_seconds=clean_s, _model_cl=model_cl)
        info.update(positions=int(np.prod(case.grid)), grid=list(case.grid))
        info.setdefault("labels", {})[img_name] = {"label": label, "probability": prob}
        tag = f"{name}/{img_name}"
        log(f"{tag}: label {label} (p={prob:.4f}), {info['positions']} positions, clean forward {clean_s:.3f}s")

        def add(res):
            d = res.to_json()
            d.update(model=name, image=img_name)
            runs.append(d)
            log(f"{tag}: {_row_line(res)}")
            return res

        if "cold" not in skip and img_name == images[0][0]:  # before anything warms krypton up for this model
            add(C.run_krypton_cold(case, batch_size=args.inc_batch))
        plan_s = C.prepare_explainer(case, [1.0] + ([t for t in taus if t < 1.0] if "approx" not in skip else []))
        info["plan_build_seconds"] = {str(k): round(v, 3) for k, v in plan_s.items()}
        # Memory of the incremental run at the naive batch sizes, on a subset of positions through
        # explain(origins=...). Runs first: it also warms krypton's kernels before the timed runs.
        inc_mem = {}
        if "memprobe" not in skip and "naive" not in skip:
            n = info["positions"]
            probe = case.origins[np.sort(rng.choice(n, size=min(n, max(args.batch_sizes)), replace=False))]
            explainer.plan(tuple(image.shape), args.patch, args.stride, 1.0, probe)  # not measured
            for b in args.batch_sizes:
                inc_mem[b] = C.probe_incremental_memory(case, b, probe)
            info["memory_probe_positions"] = len(probe)

        exact = C.run_krypton(case, batch_size=args.inc_batch)
        if exact.skipped:
            raise SystemExit(f"krypton exact run impossible: {exact.skipped}")
        exact.ssim, exact.max_abs_diff = 1.0, 0.0
        case.exact = exact.explanation
        spread = float(exact.heatmap.max() - exact.heatmap.min())
        info.setdefault("exact_heatmap_range", {})[img_name] = spread
        if spread < 1e-6:
            exact.notes.append(f"{img_name}: the exact heatmap is constant (label probability {prob:.6f} never "
                               "moves): SSIM of approximate modes is meaningless for this model/image")
        add(exact)
        if "profile" not in skip:
            info.setdefault("time_breakdown", {})[img_name] = C.time_breakdown(case)

        naive_full = None
        if "naive" not in skip:
            sample = args.sample_batches or None
            naive_rows = [add(C.run_naive(case, b, lay == "channels_last", sample))
                          for lay in args.layouts for b in args.batch_sizes]
            model_cl = case._model_cl  # one channels_last copy per model, shared by the images
            best = min(naive_rows, key=lambda r: r.seconds)
            if args.full_baselines and best.extrapolated:
                naive_full = C.run_naive(case, best.batch_size, best.config["layout"] == "channels_last", None)
                naive_full.label += " (full run)"
                naive_full.notes.append(f"full run of the best sampled configuration ({best.label}, "
                                        f"extrapolated {best.seconds:.2f}s)")
                add(naive_full)
            for b in args.batch_sizes:
                by = {r.config["layout"]: r.peak_bytes for r in naive_rows if r.batch_size == b}
                mem_rows.append({"model": name, "image": img_name, "batch": b, "naive_nchw": by.get("NCHW"),
                                 "naive_channels_last": by.get("channels_last"), "incremental": inc_mem.get(b)})
                if inc_mem.get(b) is not None:
                    log(f"{tag}: peak memory at batch {b}: naive NCHW {(by.get('NCHW') or 0) / 2**20:.0f} MB, "
                        f"channels_last {(by.get('channels_last') or 0) / 2**20:.0f} MB, "
                        f"incremental {inc_mem[b] / 2**20:.0f} MB")

        cap_ppe, cap_attr = args.ppe[-1], None
        if "captum" not in skip:
            sample = args.sample_batches or None
            cap_rows = [add(C.run_captum_occlusion(case, ppe, sample)) for ppe in args.ppe]
            best = min(cap_rows, key=lambda r: r.seconds)
            cap_ppe = best.batch_size
            if args.full_baselines and best.extrapolated:
                full = C.run_captum_occlusion(case, best.batch_size, None)
                full.label += " (full run)"
                full.notes.append(f"full run of the best sampled configuration ({best.label}, "
                                  f"extrapolated {best.seconds:.2f}s)")
                add(full)
                cap_rows.append(full)
            cap_attr = next((r.attribution for r in cap_rows if r.attribution is not None and r.batch_size == cap_ppe),
                            None)
        # the Captum drop-ins (the same calls as Captum's) and edited-frame inference vs stock
        if "dropin" not in skip:
            for res in C.run_captum_dropin(case, cap_ppe, cap_attr):
                add(res)
        if "segments" not in skip:
            for res in C.run_segments(case, args.n_segments, cap_ppe):
                add(res)
        if "edits" not in skip:
            for res in C.run_edits(case, args.edit_frames, args.edit_size):
                add(res)

        if "approx" not in skip:
            for tau in taus:
                if tau >= 1.0:
                    continue
                res = C.run_krypton(case, tau=tau, batch_size=args.inc_batch)
                if tau == tuned:
                    res.label += f" ({tuned_src})"
                add(res)
        if "drilldown" not in skip:
            dd_tau = tuned if tuned else 1.0
            res = C.run_krypton(case, tau=dd_tau, drilldown=(args.drilldown_r, args.drilldown_target),
                                batch_size=args.inc_batch)
            res.label = (f"krypton tau={dd_tau:g} ({tuned_src if tuned else 'no tuned tau: exact'}) + drill-down "
                         f"r={args.drilldown_r:g} target {args.drilldown_target:g}")
            add(res)

        if "ig" not in skip:
            for steps in args.ig_steps:
                add(C.run_integrated_gradients(case, steps, args.ig_batch))

    return runs, mem_rows, info


def _aggregate_memory(mem_rows):
    out = {}
    for r in mem_rows:
        key = (r["model"], r["batch"])
        cur = out.setdefault(key, dict(r))
        for k in ("naive_nchw", "naive_channels_last", "incremental"):
            vals = [v for v in (cur.get(k), r.get(k)) if v is not None]
            cur[k] = max(vals) if vals else None
    return [dict(v, image=None) for v in out.values()]


def run_benchmark(args, models=None) -> dict:
    """models: [(name, nn.Module, preprocess dict, pretrained)] (default: krypton.models per --models)."""
    from bench import report
    from bench.images import model_inputs
    from bench.measure import Meter, machine_info, others_cpu_share

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: this torch has no CUDA device")
    meter = Meter(device)
    machine = machine_info(device)
    machine["memory_method"] = meter.method
    t_start = time.perf_counter()
    name = args.name or f"{args.preset}-{device.type}-p{args.patch}s{args.stride}-{time.strftime('%Y%m%d-%H%M')}"
    log(f"benchmark {name}: {machine['cpu_model']}, {machine['cpus_usable']} cores, torch threads "
        f"{machine['torch_threads']}, torch {machine['torch_version']}, memory: {meter.method}")
    if models is None:
        from krypton.models import PREPROCESS, build_model
        models = []
        for m in args.models:
            torch.manual_seed(args.seed)  # random-init models: the same weights on every run
            model = build_model(m)
            models.append((m, model, PREPROCESS[m], bool(getattr(model, "krypton_pretrained", False))))
    runs, mem_rows, infos = [], [], {}
    image_names = []
    for mname, model, pre, pretrained in models:
        images = model_inputs(pre, args.images)
        image_names = [n for n, _ in images]
        if not pretrained:
            log(f"{mname}: RANDOM-INIT weights (no pretrained file): timings are valid, heatmaps mean nothing")
        r, mrows, info = bench_model(args, mname, model, pre, images, meter, pretrained)
        runs += r
        mem_rows += mrows
        infos[mname] = info
        del model
    machine["load_average_end"] = list(os.getloadavg())
    machine["others_cpu_share"] = others_cpu_share(machine["cpu_snapshot_start"])
    notes = [
        "Models marked RANDOM-INIT have untrained weights (torchvision's init, seeded): speed and memory are "
        "representative, the heatmaps and the SSIM of approximate modes are not (SSIM on a pretrained model "
        "is the meaningful one).",
        "Naive = our own batched loop (expand + clone the image, paste the fill, model(batch)); channels_last "
        "converts both model and batch. Same label, same fill, same positions as krypton.",
        "Captum Occlusion: forward = softmax(model(x)), sliding window (C,P,P), strides (C,S,S), baselines = "
        "the fill image, target = label; its map is input-shaped (mean drop), compared with krypton's "
        "Explanation.attribution() when it ran in full.",
        "krypton: plans are built once per (model, shape, patch, stride, tau) before timing (see "
        "models.*.plan_build_seconds), as a server caches them; the activation cache is emptied before "
        "every timed explain(), so each run pays for its clean pass (drill-down's stage 2 still reuses "
        "stage 1's, as designed). Drill-down's stage-2 plan depends on the image and is built inside "
        "the timed call.",
        "Drop-ins: krypton.captum.Occlusion runs the same call as the best Captum Occlusion row; "
        "FeatureAblation (Captum's and krypton.captum's) the same call with SLIC superpixels (--n-segments) "
        "as feature_mask and the fill image as baseline; edits: a batch of --edit-frames copies with one random "
        "--edit-size square of noise, stock model(batch) vs krypton.IncrementalModel (reference materialized "
        "before timing). Ours run twice: cold (new object: capture and plans timed) and warm; max_abs_diff is "
        "against the stock/Captum answer of the same call.",
        "SSIM vs exact: krypton.heatmap_ssim (the tau tuner's definition: skimage structural_similarity, "
        "data_range = max - min over both maps, win 7), so the numbers compare with krypton/tuned/.",
    ]
    result = {
        "name": name, "machine": machine,
        "settings": {"preset": args.preset, "patch": args.patch, "stride": args.stride, "fill": args.fill,
                     "images": image_names, "models": [m[0] for m in models], "batch_sizes": args.batch_sizes,
                     "layouts": args.layouts, "sample_batches": args.sample_batches, "ppe": args.ppe,
                     "taus": args.taus, "drilldown": {"r": args.drilldown_r, "target": args.drilldown_target},
                     "ig_steps": args.ig_steps, "ig_batch": args.ig_batch, "inc_batch": args.inc_batch,
                     "threads": args.threads, "seed": args.seed, "full_baselines": args.full_baselines,
                     "n_segments": args.n_segments, "edit_frames": args.edit_frames, "edit_size": args.edit_size},
        "models": infos, "notes": notes, "runs": runs,
        "summary": report.summarize(runs), "memory_same_batch": _aggregate_memory(mem_rows),
        "memory_same_batch_per_image": mem_rows,
    }
    result["wall_seconds"] = time.perf_counter() - t_start
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, name)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1, default=float)
    with open(base + ".md", "w") as f:
        f.write(report.markdown(result))
    if not args.no_chart:
        report.chart(result, base + ".png")
    log(f"wrote {base}.json, .md" + ("" if args.no_chart else ", .png") +
        f" in {result['wall_seconds'] / 60:.1f} min")
    return result


def main(argv=None):
    args = parse_args(argv)
    run_benchmark(args)


if __name__ == "__main__":
    main()
