"""Summaries of the benchmark's rows: per-model aggregation, Markdown table, PNG chart."""
from __future__ import annotations

import statistics

MB = 1 << 20


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _max(values):
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _min(values):
    values = [v for v in values if v is not None]
    return min(values) if values else None


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (model, configuration): medians over images; speedups against the best naive
    configuration and the best Captum Occlusion configuration of the same model (by median time)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["label"]), []).append(r)
    rows = []
    for (model, label), rs in groups.items():
        first = rs[0]
        row = {
            "model": model, "label": label, "contender": first["contender"], "config": first["config"],
            "images": [r["image"] for r in rs],
            "seconds": _median(r["seconds"] for r in rs),
            "seconds_per_image": [r["seconds"] for r in rs],
            "timing": first["timing"], "extrapolated": first["extrapolated"],
            "positions_timed": first["positions_timed"], "positions_total": first["positions_total"],
            "peak_bytes": _max(r["peak_bytes"] for r in rs),
            "batch_size": first["batch_size"],
            "theoretical_centre": first["theoretical_centre"],
            "theoretical_executed": first["theoretical_executed"],
            "theoretical_true": first.get("theoretical_true"),
            "ssim": _median(r["ssim"] for r in rs), "ssim_min": _min(r["ssim"] for r in rs),
            "max_abs_diff": _max(r["max_abs_diff"] for r in rs),
            "skipped": first["skipped"], "notes": list(dict.fromkeys(n for r in rs for n in r["notes"])),
        }
        if len(rs) > 1 and row["extrapolated"]:
            row["timing"] = first["timing"] + f" (per image, {len(rs)} images)"
        rows.append(row)
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and r["seconds"]]
        # "(full run)" rows re-run the best sampled configuration to check the extrapolation: they are
        # reported, but the best is chosen among the configurations of the sweep.
        sweep = [r for r in mine if not r["label"].endswith("(full run)")]
        naive = [r for r in sweep if r["contender"] == "naive"]
        captum = [r for r in sweep if r["contender"] == "captum-occlusion"]
        best_naive = min(naive, key=lambda r: r["seconds"]) if naive else None
        best_captum = min(captum, key=lambda r: r["seconds"]) if captum else None
        for r in rows:
            if r["model"] != model:
                continue
            r["best_naive"] = best_naive is not None and r is best_naive
            r["best_captum"] = best_captum is not None and r is best_captum
            ok = r["seconds"] is not None
            r["speedup_vs_naive"] = best_naive["seconds"] / r["seconds"] if ok and best_naive else None
            r["speedup_vs_captum"] = best_captum["seconds"] / r["seconds"] if ok and best_captum else None
            realized = r["speedup_vs_naive"]
            te, tc = r["theoretical_executed"], r["theoretical_centre"]
            applies = r["contender"].startswith("krypton") and realized is not None
            r["realized_over_theoretical_executed"] = realized / te if applies and te else None
            r["realized_over_theoretical_centre"] = realized / tc if applies and tc else None
    return rows


def _f(v, fmt="{:.2f}", none="–"):
    return none if v is None else fmt.format(v)


def _timing_short(r) -> str:
    if r["skipped"]:
        return "skipped"
    if r["extrapolated"]:
        return f"extrap. {r['positions_timed']}/{r['positions_total']}"
    return "full"


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    out = [f"# Krypton benchmark: {result['name']}", ""]
    load = (m.get("load_average_start") or [0])[0] or 0
    load_end = (m.get("load_average_end") or [0])[0] or 0
    others = m.get("others_cpu_share")
    if others is not None:  # CPU time of other processes: our own threads do not count
        busy = others > 0.1
    else:  # older results: only the load average
        busy = max(load, load_end) > 0.5 * (m.get("cpus_usable") or 1) + 0.5 and m["device"] == "cpu"
    if s.get("preset") == "quick":
        out += ["> **QUICK PRESET** (smaller problem, fewer samples): an example of the output, NOT the "
                "reference numbers.", ""]
    if busy and others is not None:
        out += [f"> **NOISY**: other processes used {others:.0%} of the machine's CPU time during the run: "
                "timings are unreliable.", ""]
    elif busy:
        out += [f"> **NOISY**: the machine was busy (1-min load average {load:.1f} at start, {load_end:.1f} at "
                f"the end, on {m.get('cpus_usable')} cores): other processes shared the CPU, timings are "
                "unreliable.", ""]
    out += [
        f"- Command: `{m['command']}`",
        f"- Commit: `{m['git_commit']}`{' (dirty tree)' if m.get('git_dirty') else ''}, date {m['date_utc']}",
        f"- Machine: {m['cpu_model']}, {m['cpus_usable']} usable cores of {m['cpu_count']}, torch threads "
        f"{m['torch_threads']}, device `{m['device']}`" + (f" ({m['gpu']})" if m.get("gpu") else "") +
        f", torch {m['torch_version']}, captum {m.get('captum_version')}, stitch backend "
        f"{m.get('krypton_stitch_backend')}",
        f"- Environment: {', '.join(f'{k}={v}' for k, v in (m.get('env') or {}).items()) or 'no ONEDNN_/OMP_/MKL_ settings'}",
        f"- Load average at start / end: {_f(m.get('load_average_start', [None])[0])} / "
        f"{_f((m.get('load_average_end') or [None])[0])} (1 min)" +
        (f"; other processes used {others:.1%} of the CPU time" if others is not None else ""),
        f"- Setting: patch {s['patch']}, stride {s['stride']}, fill {s['fill']!r}, images "
        f"{', '.join(s['images'])}; total wall time {result.get('wall_seconds', 0) / 60:.1f} min",
        f"- Peak memory: {m.get('memory_method')}",
        "- Speedups are against the BEST naive configuration (fastest of the batch sizes x layouts) and "
        "the best Captum Occlusion configuration of the same model, on median time per heatmap over "
        "the images. 'extrap. n/N' = timed on n of N positions and extrapolated (see JSON `timing`).",
        "- theo. = theoretical speedup from conv multiply-adds: for the windows actually executed / for "
        "windows fitted to each position's own change (the true-change bound; layers run in full count in "
        "full) / with the patch at the centre (the paper's number); real./theo. = realized speedup over the "
        "executed and the centre one. Cold = a new Explainer's first request (capture, plans, clean pass, "
        "first execution of every window shape); the other krypton rows are warm (plans built, a new image).",
        "",
    ]
    for model in dict.fromkeys(r["model"] for r in result["summary"]):
        info = result["models"][model]
        out.append(f"## {model} ({info['input']} px, {'pretrained' if info['pretrained'] else 'RANDOM-INIT'} "
                   f"weights), {info['positions']} positions")
        out.append("")
        out.append("| contender | batch | s / heatmap | timing | vs best naive | vs Captum occ. | theo. exec / "
                   "true / centre | real./theo. exec / centre | peak MB | SSIM vs exact |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in (r for r in result["summary"] if r["model"] == model):
            name = r["label"] + (" **(best naive)**" if r.get("best_naive") else "") + \
                (" **(best Captum)**" if r.get("best_captum") else "")
            if r["skipped"]:
                out.append(f"| {name} | | | skipped: {r['skipped']} | | | | | | |")
                continue
            kr = r["contender"].startswith("krypton")
            theo = (f"{_f(r['theoretical_executed'])} / {_f(r.get('theoretical_true'))} / "
                    f"{_f(r['theoretical_centre'])}") if kr else "–"
            ratio = (f"{_f(r['realized_over_theoretical_executed'])} / "
                     f"{_f(r['realized_over_theoretical_centre'])}") if kr else "–"
            out.append(
                f"| {name} | {r['batch_size'] or '–'} | {_f(r['seconds'])} | {_timing_short(r)} | "
                f"{_f(r['speedup_vs_naive'], '{:.2f}x')} | {_f(r['speedup_vs_captum'], '{:.2f}x')} | {theo} | "
                f"{ratio} | {_f(r['peak_bytes'] / MB if r['peak_bytes'] is not None else None, '{:.0f}')} | "
                f"{_f(r['ssim'], '{:.4f}')} |")
        mem = [x for x in result.get("memory_same_batch", []) if x["model"] == model]
        if mem:
            out += ["", "Peak memory at the same batch size (MB; incremental measured on a subset of "
                    "positions via `origins=`, naive from its timed batches):", "",
                    "| batch | naive NCHW | naive channels_last | krypton exact | exact / naive NCHW |",
                    "|---|---|---|---|---|"]
            for x in mem:
                def mb(v):
                    return _f(v / MB if v is not None else None, "{:.0f}")
                ratio = x["incremental"] / x["naive_nchw"] if x["incremental"] and x["naive_nchw"] else None
                out.append(f"| {x['batch']} | {mb(x['naive_nchw'])} | {mb(x['naive_channels_last'])} | "
                           f"{mb(x['incremental'])} | {_f(ratio, '{:.0%}')} |")
        cold = next((r for r in result["summary"] if r["model"] == model and r["config"].get("cold")), None)
        warm = next((r for r in result["summary"] if r["model"] == model and r["label"] == "krypton exact"), None)
        if cold and warm and cold["seconds"] and warm["seconds"]:
            out += ["", f"Cold first request / warm: {cold['seconds'] / warm['seconds']:.2f}x "
                    f"({cold['seconds']:.2f} s / {warm['seconds']:.2f} s)."]
        for img, shares in (info.get("time_breakdown") or {}).items():
            out += ["", f"Where the time goes (warm exact run, {img}, share of torch.profiler self CPU time): " +
                    ", ".join(f"{k} {v:.0%}" for k, v in shares.items() if v >= 0.005) + "."]
        notes = sorted({n for r in result["summary"] if r["model"] == model for n in r["notes"]})
        if notes:
            out += [""] + [f"- note: {n}" for n in notes]
        out.append("")
    if result.get("notes"):
        out += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(out)


def chart(result: dict, path: str) -> None:
    """Grouped bars: speedup over the best naive per model and mode (log scale); theoretical speedup
    (executed windows) as a black tick on krypton bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["summary"] if r["speedup_vs_naive"] and not r["skipped"]]
    models = list(dict.fromkeys(r["model"] for r in rows))

    def mode(r):
        if r["contender"] == "naive":
            return "best naive" if r.get("best_naive") else None
        if r["contender"] == "captum-occlusion":
            return "Captum Occlusion (best)" if r.get("best_captum") else None
        if r["contender"] == "captum-ig":
            steps = r["config"]["n_steps"]
            ig_steps = sorted({x["config"]["n_steps"] for x in rows if x["contender"] == "captum-ig"})
            return f"IG {steps} steps" if steps in (ig_steps[0], ig_steps[-1]) else None
        cfg = r["config"]
        if r["contender"] == "krypton-exact":
            return "exact" if r["label"] == "krypton exact" else r["label"].replace("krypton ", "")
        if r["contender"] != "krypton-approx":  # drop-ins and edited frames: other tasks, tables only
            return None
        if cfg.get("drilldown"):
            dd = cfg["drilldown"]
            return f"model's tau + drill-down r={dd['r']:g} target {dd['target']:g}"
        return f"tau={cfg['tau']:g}"

    modes: list[str] = []
    for r in rows:
        m = mode(r)
        if m and m not in modes:
            modes.append(m)

    def order(m):
        if m == "best naive":
            return (0, 0, "")
        if m.startswith("Captum Occlusion"):
            return (1, 0, "")
        if m.startswith("IG "):
            return (4, int(m.split()[1]), "")
        if m == "exact":
            return (2, 0, "")
        tau = float(m.split("tau=")[1].split()[0]) if m.startswith("tau=") else 0.0
        return (3 + ("drill-down" in m) * 0.5, -tau, m)

    modes.sort(key=order)
    fig_w = max(8.0, 2.0 + len(models) * (0.3 * len(modes) + 0.5))
    fig, ax = plt.subplots(figsize=(fig_w, 6.0))
    width = 0.8 / max(1, len(modes))
    cmap = plt.get_cmap("tab20")
    for j, m in enumerate(modes):
        xs, ys, theo, taus = [], [], [], []
        for i, model in enumerate(models):
            hit = [r for r in rows if r["model"] == model and mode(r) == m]
            if hit:
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(hit[0]["speedup_vs_naive"])
                theo.append(hit[0]["theoretical_executed"] if hit[0]["contender"].startswith("krypton") else None)
                taus.append(hit[0]["config"].get("tau", 1.0))
        bars = ax.bar(xs, ys, width, label=m, color=cmap(j % 20), edgecolor="black", linewidth=0.3)
        for b, y, t in zip(bars, ys, taus):
            text = f"{y:.1f}" if y >= 1 else f"{y:.2f}"
            if "drill-down" in m:
                text += f" (tau {t:g})"
            ax.annotate(text, (b.get_x() + b.get_width() / 2, y),
                        ha="center", va="bottom", fontsize=6, rotation=90, xytext=(0, 2),
                        textcoords="offset points")
        for x, t in zip(xs, theo):
            if t:
                ax.plot([x - width / 2, x + width / 2], [t, t], color="black", linewidth=1.2)
    ax.set_yscale("log")
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([f"{m}\n{result['models'][m]['input']} px" for m in models])
    ax.set_ylabel("speedup over best naive re-inference (log)")
    s = result["settings"]
    title = f"Occlusion heatmap speedup, patch {s['patch']} stride {s['stride']}, {result['machine']['device']}"
    if s.get("preset") == "quick":
        title += " (QUICK preset: a small example, not reference numbers)"
    ax.set_title(title, fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="black", linewidth=1.2))
    labels.append("theoretical speedup, executed windows")
    ax.legend(handles, labels, fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
