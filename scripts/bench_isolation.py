#!/usr/bin/env python
"""Are predictions starved by explanations? Prediction latency idle and while explanations run, per layout.

For each layout a real TorchServe is started (tests/server_utils.py: isolated TMPDIR, free ports, the
shipped config.properties with token authorization) with the archive of ``--model``; then
  1. idle: ``--idle`` sequential predictions (after 3 unrecorded ones);
  2. loaded: ``--explains`` clients each keep one explanation in flight (stride ``--stride``) while one
     client sends predictions one after the other (``--interval`` s apart) for at least ``--window`` s
     and at least ``--min-loaded`` predictions; only then do the explanation clients stop resubmitting.
     Closed loop on purpose: an open-loop arrival rate above what a loaded 2-core machine serves
     measures the prediction queue's own overload, not the explanations' effect.
Layouts:
  shared    one registration NAME: /predictions/NAME and /explanations/NAME share its worker and queue
  split     NAME and NAME_explain (the same .mar registered twice, its own worker and queue each),
            KRYPTON_EXPLAIN_SUFFIX=_explain: /explanations/NAME answers 404 (checked), explanations go to
            /explanations/NAME_explain
  split-t1  split, the explain worker with handler.explain_threads=1 (torch threads), the prediction
            worker with torch's default (one per core)
  split-1+1 split, both workers with handler.threads=1 (one core each on a 2-core CPU)

    .venv/bin/python scripts/bench_isolation.py                  # ~10 minutes on a quiet 2-core CPU
    .venv/bin/python scripts/bench_isolation.py --layouts split-t1 --window 20 --name try

Writes bench/results/<name>.json (every latency) and .md (the table, machine, versions, commit, command).
"""
from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "scripts"), os.path.join(ROOT, "tests")):
    sys.path.insert(0, p)

import archive_models  # noqa: E402
from bench_quality import machine  # noqa: E402
from server_utils import TorchServeProcess  # noqa: E402

SUFFIX = "_explain"
LAYOUTS = {"shared": None, "split": {}, "split-t1": {"explain_threads": 1}, "split-1+1": {"threads": 1}}


def photos() -> List[bytes]:
    from PIL import Image
    from skimage import data

    out = []
    for name in ("chelsea", "astronaut", "coffee", "rocket"):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def pct(xs: List[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    s = sorted(xs)
    return s[max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))]


def summary(xs: List[float]) -> Dict[str, float]:
    return {"n": len(xs), "p50_s": round(statistics.median(xs), 4), "p95_s": round(pct(xs, 95), 4),
            "max_s": round(max(xs), 4), "mean_s": round(statistics.mean(xs), 4)}


def timed(ts: TorchServeProcess, path: str, body: bytes, headers=None):
    t0 = time.perf_counter()
    status, _, resp = ts.request("POST", path, body, dict(headers or {}, **{"Content-Type": "image/jpeg"}),
                                 timeout=900)
    return status, time.perf_counter() - t0, resp


def worker_rss(ts: TorchServeProcess, models: List[str]) -> Dict[str, int]:
    import psutil

    out = {}
    for m in models:
        out[m] = sum(psutil.Process(pid).memory_info().rss for pid in ts.worker_pids(m))
    return out


def wait_quiet(max_load: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until the 1-minute load average is <= max_load: other jobs on a shared
    machine would otherwise be measured. Returns the seconds waited."""
    t0 = time.time()
    while os.getloadavg()[0] > max_load and time.time() - t0 < max_wait:
        time.sleep(5)
    return round(time.time() - t0, 1)


def run_layout(layout: str, store: str, args, imgs: List[bytes]) -> Dict:
    m = args.model
    split = LAYOUTS[layout] is not None
    models = [m, m + SUFFIX] if split else [m]
    load = ",".join(f"{n}={m}.mar" for n in models)
    if split:
        os.environ["KRYPTON_EXPLAIN_SUFFIX"] = SUFFIX
    else:
        os.environ.pop("KRYPTON_EXPLAIN_SUFFIX", None)
    work = tempfile.mkdtemp(prefix=f"bench-iso-{layout}-")
    result: Dict = {"layout": layout, "load_models": load, "handler_overrides": LAYOUTS[layout] or {},
                    "waited_for_quiet_s": wait_quiet(args.max_load, args.max_wait),
                    "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    t_start = time.time()
    with TorchServeProcess(store, models, work, extra_config={"load_models": load}) as ts:
        result["startup_s"] = round(time.time() - t_start, 1)
        result["worker_rss_bytes"] = worker_rss(ts, models)
        explain_path = f"/explanations/{models[-1]}"
        stride = {"X-Krypton-Stride": str(args.stride)}
        if split:  # the prediction registration refuses explanations, naming the other one
            status, _, body = timed(ts, f"/explanations/{m}", imgs[0], stride)
            assert status == 404 and (m + SUFFIX).encode() in body, (status, body[:300])
            result["explain_on_prediction_registration"] = {"status": status, "body": json.loads(body)}
        for _ in range(3):
            assert timed(ts, f"/predictions/{m}", imgs[0])[0] == 200
        idle = []
        for i in range(args.idle):
            status, dt, body = timed(ts, f"/predictions/{m}", imgs[i % len(imgs)])
            assert status == 200, body[:300]
            idle.append(dt)
        print(f"[{layout}] idle predictions: {summary(idle)}", flush=True)

        stop = threading.Event()
        explains: List[float] = []
        errors: List[str] = []
        lock = threading.Lock()

        def explainer(k: int):
            while not stop.is_set():
                status, dt, body = timed(ts, explain_path, imgs[k % len(imgs)], stride)
                with lock:
                    (explains.append(dt) if status == 200 else errors.append(f"explain {status} {body[:200]!r}"))

        loaded: List[float] = []

        ex = [threading.Thread(target=explainer, args=(k,), daemon=True) for k in range(args.explains)]
        for t in ex:
            t.start()
        time.sleep(args.settle)  # every explanation submitted, the first one running
        t0 = time.perf_counter()
        k = 0
        while time.perf_counter() - t0 < args.window or len(loaded) < args.min_loaded:
            status, dt, body = timed(ts, f"/predictions/{m}", imgs[k % len(imgs)])
            if status != 200:
                errors.append(f"predict {status} {body[:200]!r}")
                break
            loaded.append(dt)
            print(f"[{layout}] loaded prediction {k}: {dt:.2f} s", flush=True)
            k += 1
            time.sleep(args.interval)
        stop.set()
        for t in ex:
            t.join()
        if errors:
            raise RuntimeError(f"[{layout}] failed requests: {errors[:5]}")
        result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        result.update(idle=summary(idle), loaded=summary(loaded), explanations=summary(explains),
                      latencies_s={"idle": [round(x, 4) for x in idle], "loaded": [round(x, 4) for x in loaded],
                                   "explanations": [round(x, 4) for x in explains]})
        print(f"[{layout}] predictions with {args.explains} explanations in flight: {result['loaded']}; "
              f"explanations: {result['explanations']}", flush=True)
    return result


def markdown(res: Dict) -> str:
    a = res["args"]
    lines = [f"# Prediction latency idle vs. while {a['explains']} explanations run ({res['machine']['date_utc']})",
             "", f"Command: `{res['command']}`", "",
             f"Model {a['model']} (real weights), explanations at patch 16 stride {a['stride']} "
             f"({res.get('positions', '?')} positions), predictions: one photo each (4 skimage photos in turn); "
             f"loaded phase: {a['explains']} clients keeping one explanation each in flight while one client "
             f"sends predictions one after the other ({a['interval']} s apart, for >= {a['window']} s and >= "
             f"{a['min_loaded']} predictions). Latency = client wall time of one HTTP request.",
             "", "| layout | idle p50 / p95 | loaded p50 / p95 (max) | explanation p50 | worker RSS | startup | "
             "load avg (1 min) start / end |", "|---|---|---|---|---|---|---|"]
    for r in res["layouts"]:
        i, ld, e = r["idle"], r["loaded"], r["explanations"]
        rss = " + ".join(f"{v / 2**20:.0f}" for v in r["worker_rss_bytes"].values()) + " MiB"
        lines.append(f"| {r['layout']} | {i['p50_s'] * 1e3:.0f} / {i['p95_s'] * 1e3:.0f} ms (n={i['n']}) | "
                     f"{ld['p50_s'] * 1e3:.0f} / {ld['p95_s'] * 1e3:.0f} ms ({ld['max_s'] * 1e3:.0f}; n={ld['n']}) | "
                     f"{e['p50_s']:.1f} s (n={e['n']}) | {rss} | {r['startup_s']:.0f} s | "
                     f"{r['load_average_start'][0]:.1f} / {r['load_average_end'][0]:.1f} |")
    lines += ["", "Layouts: `shared` = one registration (`load_models=NAME=NAME.mar`); `split` = the same archive "
              "registered twice (`NAME=NAME.mar,NAME_explain=NAME.mar`), own worker and queue each, torch's default "
              "threads (one per core) in both; `split-t1` = split with `handler.explain_threads: 1` (the explain "
              "worker's torch threads); `split-1+1` = split with `handler.threads: 1` (both workers).", "",
              "Machine: " + ", ".join(f"{k} {v}" for k, v in res["machine"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet_lite0", choices=archive_models.DEFAULT_MODELS)
    ap.add_argument("--layouts", default="shared,split,split-t1,split-1+1")
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--explains", type=int, default=4)
    ap.add_argument("--idle", type=int, default=20)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--min-loaded", type=int, default=3)
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--max-load", type=float, default=2.5,
                    help="before each layout wait until the 1-minute load average is at most this")
    ap.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for that, at most")
    ap.add_argument("--name", default=f"isolation-{datetime.date.today().isoformat()}")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = ap.parse_args(argv)
    layouts = [x for x in args.layouts.split(",") if x]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        ap.error(f"unknown layout(s) {bad}; choose from {list(LAYOUTS)}")
    res = {"command": "python scripts/bench_isolation.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
           "args": vars(args), "machine": machine(), "layouts": []}
    from importlib.metadata import version

    res["machine"]["torchserve"] = version("torchserve")
    side = 224 - 16
    res["positions"] = (side // args.stride + 1) ** 2
    imgs = photos()
    build = tempfile.mkdtemp(prefix="bench-iso-build-")
    stores = {}
    for layout in layouts:
        key = json.dumps(LAYOUTS[layout] or {}, sort_keys=True)
        if key not in stores:
            stores[key] = os.path.join(build, f"store{len(stores)}")
            os.makedirs(os.path.join(build, "work"), exist_ok=True)
            archive_models.archive(args.model, stores[key], os.path.join(build, "work"),
                                   handler_overrides=LAYOUTS[layout] or {})
        res["layouts"].append(run_layout(layout, stores[key], args, imgs))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, args.name + ".json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, args.name + ".md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
