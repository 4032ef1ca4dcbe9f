"""The contenders of the benchmark, each measured with the same Meter on the same image and label.

- naive:            batched full re-inference of every occluded image (our own loop, NCHW or
                    channels_last), timed on a random sample of batches and extrapolated, or in full.
- captum-occlusion: captum.attr.Occlusion(forward = softmax(model(x))), sliding window (C, P, P),
                    strides (C, S, S), baselines = the fill image, target = label. Timed on its first
                    perturbation batches (after one warm-up batch) and extrapolated, or in full.
- krypton-exact / krypton-approx: krypton.Explainer(...).explain(...) through the public API only,
                    always in full.
- captum-ig:        captum.attr.IntegratedGradients at n steps, always in full (reference only: a
                    different explanation, so no SSIM).

Every function returns a Result; nothing here prints or decides presets (scripts/bench.py does).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import krypton
from krypton import geometry as geo
from krypton.approx import resolve_drilldown

from .measure import Meter

# The paper's tau for target SSIM 0.9 (SIGMOD'19 §4 / method.md §4).


@dataclass
class Result:
    contender: str                      # naive | captum-occlusion | krypton-exact | krypton-approx | captum-ig
    label: str                          # short human name of the configuration
    config: dict
    seconds: float | None = None        # wall time per heatmap (measured or extrapolated)
    timing: str = "full"                # "full" or "extrapolated from ..."
    extrapolated: bool = False
    positions_timed: int | None = None
    positions_total: int | None = None
    peak_bytes: int | None = None
    batch_size: int | None = None
    theoretical_centre: float | None = None    # patch at the centre (the paper's worst case)
    theoretical_executed: float | None = None  # for the windows actually executed
    theoretical_true: float | None = None  # windows fitted to each position's own change (the bound)
    ssim: float | None = None
    max_abs_diff: float | None = None   # vs the exact heatmap (same quantity, where comparable)
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    heatmap: torch.Tensor | None = None       # not serialized
    attribution: torch.Tensor | None = None   # not serialized
    explanation: object | None = None         # krypton.Explanation, not serialized

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("heatmap", "attribution", "explanation")}


@dataclass
class Case:
    """One model + one image + one OBE setting: what every contender shares."""

    model_name: str
    model: torch.nn.Module
    image_name: str
    image: torch.Tensor          # (1, C, H, W) on the device
    patch: int
    stride: int
    fill: list[float]            # per channel, in the model's input space
    label: int
    meter: Meter
    rng: np.random.Generator
    explainer: krypton.Explainer | None = None
    exact: krypton.Explanation | None = None
    clean_seconds: float = 0.0   # one clean forward (every method needs it for the label)
    _model_cl: torch.nn.Module | None = None

    @property
    def device(self) -> torch.device:
        return self.image.device

    @property
    def fill_tensor(self) -> torch.Tensor:
        return torch.tensor(self.fill, dtype=self.image.dtype, device=self.device).view(-1, 1, 1)

    @property
    def fill_image(self) -> torch.Tensor:
        return self.fill_tensor.unsqueeze(0).expand_as(self.image).contiguous()

    @property
    def origins(self) -> np.ndarray:
        _, _, h, w = self.image.shape
        return geo.grid_origins(h, w, self.patch, self.stride)

    @property
    def grid(self) -> tuple[int, int]:
        _, _, h, w = self.image.shape
        return geo.grid_shape(h, w, self.patch, self.stride)

    def model_for(self, channels_last: bool) -> torch.nn.Module:
        if not channels_last:
            return self.model
        if self._model_cl is None:
            self._model_cl = copy.deepcopy(self.model).to(memory_format=torch.channels_last)
        return self._model_cl


def clean_forward(model, image, meter: Meter) -> tuple[int, float, float]:
    """(predicted label, its probability, seconds) of one clean forward pass."""
    with torch.no_grad():
        meter.sync()
        t = time.perf_counter()
        probs = torch.softmax(model(image).double(), dim=1)[0]
        meter.sync()
        dt = time.perf_counter() - t
    label = int(probs.argmax())
    return label, float(probs[label]), dt


# ---------------------------------------------------------------------------------------------
# naive batched re-inference
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def naive_scores(model, image, fill_t, patch, origins, label, channels_last) -> torch.Tensor:
    """Probability of `label` for each occluded image of one batch (full re-inference)."""
    b = len(origins)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = image.expand(b, -1, -1, -1).clone(memory_format=fmt)
    for i, (y, x0) in enumerate(origins.tolist()):
        x[i, :, y:y + patch, x0:x0 + patch] = fill_t
    return torch.softmax(model(x).double(), dim=1)[:, label].cpu()


def run_naive(case: Case, batch: int, channels_last: bool, sample_batches: int | None) -> Result:
    """sample_batches=None: all positions. Else 1 warm-up batch + `sample_batches` timed batches of
    random positions; time per heatmap = clean forward + N * (timed seconds / timed positions)."""
    layout = "channels_last" if channels_last else "NCHW"
    res = Result("naive", f"naive b={batch} {layout}", {"batch": batch, "layout": layout}, batch_size=batch,
                 theoretical_centre=1.0, theoretical_executed=1.0)
    model, meter = case.model_for(channels_last), case.meter
    origins, n = case.origins, len(case.origins)
    fill_t = case.fill_tensor
    batch = min(batch, n)
    if sample_batches is None or (sample_batches + 1) * batch >= n:
        scores = torch.empty(n, dtype=torch.float64)
        with meter.measure() as m:
            for s in range(0, n, batch):
                scores[s:s + batch] = naive_scores(model, case.image, fill_t, case.patch, origins[s:s + batch],
                                                   case.label, channels_last)
        res.seconds = m.seconds + case.clean_seconds
        res.positions_timed = res.positions_total = n
        res.peak_bytes = m.peak_bytes
        res.heatmap = scores.view(case.grid)
        if case.exact is not None:
            res.max_abs_diff = float((res.heatmap - case.exact.heatmap.double()).abs().max())
        return res
    idx = case.rng.choice(n, size=(sample_batches + 1) * batch, replace=False)
    timed, got = 0.0, []
    with meter.measure() as m:
        for k in range(sample_batches + 1):
            sel = idx[k * batch:(k + 1) * batch]
            meter.sync()
            t = time.perf_counter()
            scores = naive_scores(model, case.image, fill_t, case.patch, origins[sel], case.label, channels_last)
            meter.sync()
            if k > 0:  # batch 0 is the warm-up (oneDNN primitive creation, first-touch of buffers)
                timed += time.perf_counter() - t
                got.append((sel, scores))
    m_timed = sample_batches * batch
    res.seconds = case.clean_seconds + n * timed / m_timed
    res.extrapolated = True
    res.positions_timed, res.positions_total = m_timed, n
    res.timing = (f"extrapolated from {m_timed} of {n} positions ({sample_batches} random batch"
                  f"{'es' if sample_batches > 1 else ''} of {batch} after 1 warm-up batch)")
    res.peak_bytes = m.peak_bytes
    if case.exact is not None:
        ref = case.exact.heatmap.double().flatten()
        res.max_abs_diff = max(float((s - ref[torch.from_numpy(sel)]).abs().max()) for sel, s in got)
    return res


# ---------------------------------------------------------------------------------------------
# Captum Occlusion
# ---------------------------------------------------------------------------------------------
class _StopCaptum(Exception):
    pass


def captum_windows(h: int, w: int, patch: int, stride: int) -> tuple[int, int]:
    """Captum's window count per dimension: ceil((D - w) / s) + 1 (the last one may be cut off)."""
    return math.ceil((h - patch) / stride) + 1, math.ceil((w - patch) / stride) + 1


def run_captum_occlusion(case: Case, ppe: int, sample_batches: int | None) -> Result:
    """sample_batches=None: the full attribute() call. Else the call is stopped (from inside the
    forward function) after 1 warm-up + `sample_batches` perturbation batches; one batch's cost is
    the time between the starts of consecutive forward calls, so it includes Captum's own mask
    construction and accumulation, not only the forward pass. Extrapolated time = setup (clean
    forward + first masks, measured) + M windows * (timed seconds / timed windows)."""
    from captum.attr import Occlusion

    _, c, h, w = case.image.shape
    gh, gw = captum_windows(h, w, case.patch, case.stride)
    total = gh * gw
    res = Result("captum-occlusion", f"Captum Occlusion ppe={ppe}", {"perturbations_per_eval": ppe},
                 batch_size=ppe, positions_total=total, theoretical_centre=1.0, theoretical_executed=1.0)
    if (gh, gw) != case.grid:
        res.notes.append(f"Captum evaluates {gh}x{gw} windows (cut-off windows at the far border) vs "
                         f"krypton's {case.grid[0]}x{case.grid[1]}")
    model, meter = case.model, case.meter
    calls: list[float] = []
    stop_at = None if sample_batches is None else sample_batches + 2  # call 0 = clean, 1 = warm-up batch

    def forward(x):
        meter.sync()
        calls.append(time.perf_counter())
        if stop_at is not None and len(calls) > stop_at:
            raise _StopCaptum
        return torch.softmax(model(x), dim=1)

    occ = Occlusion(forward)
    kwargs = dict(sliding_window_shapes=(c, case.patch, case.patch), strides=(c, case.stride, case.stride),
                  baselines=case.fill_image, target=case.label, perturbations_per_eval=ppe)
    full = sample_batches is None or (sample_batches + 1) * ppe >= total
    if full:
        with meter.measure() as m, torch.no_grad():
            attr = occ.attribute(case.image, **kwargs)
        res.seconds = m.seconds
        res.positions_timed = total
        res.attribution = attr[0].mean(0).double().cpu()  # all channels carry the same value
    else:
        with meter.measure() as m:
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    occ.attribute(case.image, **kwargs)
                raise RuntimeError("Captum finished before the sample was taken")
            except _StopCaptum:
                pass
        setup = calls[1] - t0  # clean forward + Captum's setup + first mask construction
        timed = calls[stop_at] - calls[2]
        timed_windows = sample_batches * ppe
        res.seconds = setup + total * timed / timed_windows
        res.extrapolated = True
        res.positions_timed = timed_windows
        res.timing = (f"extrapolated from {timed_windows} of {total} windows ({sample_batches} batch"
                      f"{'es' if sample_batches > 1 else ''} of {ppe} after 1 warm-up batch; setup "
                      f"{setup:.2f}s measured)")
    res.peak_bytes = m.peak_bytes
    if res.attribution is not None and case.exact is not None:
        ours = case.exact.attribution().double()
        res.ssim = heatmap_ssim(ours, res.attribution)
        res.max_abs_diff = float((ours - res.attribution).abs().max())
        res.notes.append("SSIM/max diff: Captum's input-shaped mean-drop map vs krypton's "
                         "Explanation.attribution() of the exact heatmap")
    return res


# ---------------------------------------------------------------------------------------------
# krypton (exact and approximate), through the public API
# ---------------------------------------------------------------------------------------------
def drilldown_options(r: float, target: float) -> dict:
    """explain() keyword arguments for adaptive drill-down (r = fraction of the map refined at the
    requested stride, target = target speedup of drill-down over the one-stage run)."""
    return {"drilldown": {"r": r, "target_speedup": target}}


def tuned_tau(model_name: str, stride: int, patch_size: int, target_ssim: float = 0.9) -> tuple[float, str]:
    """(tau, source) of the configuration tuned for `target_ssim` (krypton/tuned/; else the paper's or the
    default tau, with no quality promise)."""
    report = krypton.tuning_for(model_name).describe(target_ssim, stride, patch_size)
    return float(report["tau"]), f"{report['tau_source']} tau"


def prepare_explainer(case: Case, taus) -> dict:
    """Build the plans outside the timed region (they are cached per model/shape/patch/stride/tau and
    reused for every image, like a server would); returns {tau: seconds to build}."""
    shape = tuple(case.image.shape)
    built = {}
    for tau in taus:
        t = time.perf_counter()
        case.explainer.prepare(shape, case.patch, case.stride, tau)
        built[tau] = time.perf_counter() - t
    return built


def run_krypton(case: Case, tau: float = 1.0, drilldown: tuple[float, float] | None = None,
                batch_size: int | None = None, label: str | None = None) -> Result:
    exact = tau == 1.0 and drilldown is None
    config = {"tau": tau, "batch": batch_size or "auto"}
    options = {}
    if tau != 1.0:
        options["tau"] = tau
    if drilldown is not None:
        config["drilldown"] = {"r": drilldown[0], "target": drilldown[1]}
        options.update(drilldown_options(*drilldown))
        _prebuild_stage1(case, tau, drilldown)
    name = label or ("krypton exact" if exact else f"krypton tau={tau:g}" + (
        f" + drill-down r={drilldown[0]:g} t={drilldown[1]:g}" if drilldown else ""))
    res = Result("krypton-exact" if exact else "krypton-approx", name, config)
    ex, meter = case.explainer, case.meter
    # every timed run pays for its own clean pass (as for a new image); drill-down's stage 2 still
    # reuses stage 1's activations, as designed
    ex.clear_cache()
    with meter.measure() as m:
        e = ex.explain(case.image, patch_size=case.patch, stride=case.stride, fill=case.fill, target=case.label,
                       batch_size=batch_size, **options)
    res.seconds = m.seconds
    res.peak_bytes = m.peak_bytes
    res.batch_size = e.batch_size
    res.heatmap = e.heatmap.detach().double().cpu()
    res.explanation = e
    res.positions_total = res.positions_timed = int(np.prod(case.grid))
    res.theoretical_centre = float(e.theoretical_speedup)
    res.theoretical_executed = float(e.executed_speedup)  # both drill-down stages included
    res.theoretical_true = float(e.true_change_speedup)
    res.extra = {"timings_ms": dict(e.timings_ms), "memory": dict(e.memory), "cache": e.cache, "tau_used": e.tau,
                 "groups": e.groups}
    dd = e.extra.get("drilldown")
    if dd is not None:
        res.theoretical_centre = float(e.theoretical_speedup) * float(e.extra["approximation"]["drilldown_speedup"])
        res.extra["drilldown"] = {k: dd.get(k) for k in ("r", "s1", "s2", "target_speedup", "estimated_speedup",
                                                          "position_speedup", "positions")}
    if "approximation" in e.extra:
        res.extra["approximation"] = {k: v for k, v in e.extra["approximation"].items() if k != "tuning"}
    if case.exact is not None and res.heatmap.shape == case.exact.heatmap.shape:
        ref = case.exact.heatmap.double()
        res.ssim = heatmap_ssim(ref, res.heatmap)
        res.max_abs_diff = float((ref - res.heatmap).abs().max())
    return res


def run_krypton_cold(case: Case, batch_size: int | None = None) -> Result:
    """The first request of a new Explainer on a new image: capture, shapes, position groups, plans, the
    clean pass and the first execution of every window shape (oneDNN builds its kernels then), all timed.
    Run before any other krypton run of the model, so nothing of it is warm."""
    res = Result("krypton-exact", "krypton exact, cold (new Explainer, first request)", {"tau": 1.0, "cold": True})
    with case.meter.measure() as m:
        e = krypton.Explainer(case.model).explain(case.image, patch_size=case.patch, stride=case.stride,
                                                  fill=case.fill, target=case.label, batch_size=batch_size)
    res.seconds, res.peak_bytes, res.batch_size = m.seconds, m.peak_bytes, e.batch_size
    res.positions_total = res.positions_timed = int(np.prod(case.grid))
    res.theoretical_centre, res.theoretical_executed = float(e.theoretical_speedup), float(e.executed_speedup)
    res.theoretical_true = float(e.true_change_speedup)
    res.heatmap = e.heatmap.detach().double().cpu()
    return res


# torch.profiler op names -> where the time goes (self CPU time of a warm exact run)
TIME_CATEGORIES = (("convolution", "conv"), ("krypton::stitch", "stitch"), ("linear", "linear head"),
                   ("addmm", "linear head"), ("matmul", "linear head"), ("pool", "pooling"),
                   ("clamp", "activations"), ("relu", "activations"), ("hardtanh", "activations"),
                   ("sigmoid", "activations"), ("silu", "activations"), ("add", "adds / concats"),
                   ("cat", "adds / concats"), ("copy_", "copies"), ("fill_", "copies"))


def time_breakdown(case: Case) -> dict:
    """Fractions of a warm exact run's self CPU time by kind of op (torch.profiler; its own overhead
    makes this run slower than the timed one, so only the shares are reported)."""
    from torch.profiler import ProfilerActivity, profile

    case.explainer.clear_cache()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        case.explainer.explain(case.image, patch_size=case.patch, stride=case.stride, fill=case.fill,
                               target=case.label)
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key.lower()
        kind = next((k for needle, k in TIME_CATEGORIES if needle in name), "other")
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total
    everything = sum(totals.values()) or 1.0
    return {k: v / everything for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def probe_incremental_memory(case: Case, batch: int, positions: np.ndarray) -> int | None:
    """Peak memory of an incremental run at `batch` (materialization + batches of `batch` positions),
    measured on a subset of positions through explain(origins=...): the same plan windows, fewer
    batches. Not timed."""
    case.explainer.clear_cache()
    with case.meter.measure() as m:
        case.explainer.explain(case.image, patch_size=case.patch, stride=case.stride, fill=case.fill,
                               target=case.label, batch_size=batch, origins=positions)
    return m.peak_bytes


# ---------------------------------------------------------------------------------------------
# Integrated Gradients (reference)
# ---------------------------------------------------------------------------------------------
def run_integrated_gradients(case: Case, steps: int, internal_batch: int) -> Result:
    from captum.attr import IntegratedGradients

    model = case.model
    ig = IntegratedGradients(lambda x: torch.softmax(model(x), dim=1))
    batch = min(steps, internal_batch)
    res = Result("captum-ig", f"Captum IG {steps} steps", {"n_steps": steps, "internal_batch_size": batch},
                 batch_size=batch)
    res.notes.append("a different explanation (gradients), timed for reference; no SSIM")
    with case.meter.measure() as m:
        attr = ig.attribute(case.image, baselines=case.fill_image, target=case.label, n_steps=steps,
                            internal_batch_size=batch)
    res.seconds = m.seconds
    res.peak_bytes = m.peak_bytes
    res.extra["attribution_abs_sum"] = float(attr.abs().sum())
    return res


# ---------------------------------------------------------------------------------------------
def heatmap_ssim(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """krypton.heatmap_ssim (the tuner's definition), or None for maps too small for SSIM."""
    try:
        return float(krypton.heatmap_ssim(a, b))
    except ValueError:
        return None


def _prebuild_stage1(case: Case, tau: float, drilldown) -> None:
    """Build drill-down's stage-1 plans (the full grid at the coarse stride S1, cacheable per model like
    every grid plan) outside the timed region. Stage 2's positions depend on the image, so its plan is
    built inside the timed call: that is a real per-request cost of drill-down."""
    _, _, h, w = case.image.shape
    dd = resolve_drilldown(drilldown_options(*drilldown)["drilldown"], h, w, case.patch, case.stride)
    case.explainer.prepare(tuple(case.image.shape), case.patch, dd.s1, tau)


# ---------------------------------------------------------------------------------------------
# The Captum drop-ins (krypton.captum) and edited-frame inference (krypton.IncrementalModel)
# ---------------------------------------------------------------------------------------------
def _softmax_forward(model):
    return lambda x: torch.softmax(model(x), dim=1)


def _timed(meter, fn):
    with meter.measure() as m, torch.no_grad():
        out = fn()
    return out, m.seconds, m.peak_bytes


def _ours(contender, label, config, seconds, peak, runs, ref=None, ours=None, notes=()) -> Result:
    """A krypton.captum / IncrementalModel row: the engine's ChangeRuns give the executed speedup."""
    full = sum(r.full_macs for r in runs)
    done = sum(r.executed_macs for r in runs)
    res = Result(contender, label, config, seconds=seconds, peak_bytes=peak,
                 theoretical_executed=full / done if done else 1.0, notes=list(notes))
    res.extra = {"groups": [g for r in runs for g in r.groups], "stock_positions": sum(r.stock_positions for r in runs)}
    if ref is not None and ours is not None:
        res.max_abs_diff = float((ours.double() - ref.double()).abs().max())
    return res


def run_captum_dropin(case: Case, ppe: int, reference: torch.Tensor | None = None) -> list[Result]:
    """krypton.captum.Occlusion with exactly the Captum Occlusion call of run_captum_occlusion, in full: a
    cold call (a new object: capture, plans and materialization inside the timing) and a warm call
    (the same object again: plans cached). `reference`: Captum's full attribution, for max_abs_diff."""
    import krypton.captum as kc

    _, c, h, w = case.image.shape
    kwargs = dict(sliding_window_shapes=(c, case.patch, case.patch), strides=(c, case.stride, case.stride),
                  baselines=case.fill_image, target=case.label, perturbations_per_eval=ppe)
    occ = kc.Occlusion(_softmax_forward(case.model))
    rows = []
    for when in ("cold", "warm"):
        attr, secs, peak = _timed(case.meter, lambda: occ.attribute(case.image, **kwargs))
        res = _ours("krypton-captum-occlusion", f"krypton.captum Occlusion ppe={ppe} ({when})",
                    {"perturbations_per_eval": ppe, "call": when}, secs, peak, occ.last_runs,
                    None if reference is None else reference, attr[0].mean(0).cpu(),
                    notes=["same call as Captum Occlusion; cold = a new object (capture + plans timed), "
                           "warm = the same object again"] + ([f"delegated to Captum: {occ.last_fallback}"]
                                                            if occ.last_fallback else []))
        res.positions_total = res.positions_timed = int(np.prod(captum_windows(h, w, case.patch, case.stride)))
        res.batch_size = ppe
        rows.append(res)
    return rows


def slic_mask(image: torch.Tensor, n_segments: int) -> torch.Tensor:
    """SLIC superpixels of a (1, C, H, W) input (min-max scaled to [0, 1]), as a (1, 1, H, W) feature_mask."""
    from skimage.segmentation import slic

    v = image[0].detach().double().cpu()
    v = ((v - v.min()) / (v.max() - v.min() + 1e-12)).permute(1, 2, 0).numpy()
    lab = slic(v, n_segments=n_segments, compactness=10.0, start_label=0, channel_axis=-1)
    return torch.as_tensor(lab, dtype=torch.long, device=image.device)[None, None]


def run_segments(case: Case, n_segments: int, ppe: int) -> list[Result]:
    """captum.attr.FeatureAblation vs krypton.captum.FeatureAblation, the same call with SLIC segments
    (feature_mask), baselines = the fill image, target = label: Captum's in full, ours cold and warm."""
    from captum.attr import FeatureAblation

    import krypton.captum as kc

    mask = slic_mask(case.image, n_segments)
    k = int(mask.max()) + 1
    fn = _softmax_forward(case.model)
    kwargs = dict(baselines=case.fill_image, target=case.label, feature_mask=mask, perturbations_per_eval=ppe)
    config = {"n_segments": n_segments, "segments": k, "perturbations_per_eval": ppe}
    ref, secs, peak = _timed(case.meter, lambda: FeatureAblation(fn).attribute(case.image, **kwargs))
    rows = [Result("captum-feature-ablation", f"Captum FeatureAblation SLIC {k} segments ppe={ppe}", dict(config),
                   seconds=secs, peak_bytes=peak, batch_size=ppe, positions_total=k, positions_timed=k,
                   theoretical_centre=1.0, theoretical_executed=1.0)]
    fa = kc.FeatureAblation(fn)
    for when in ("cold", "warm"):
        attr, secs, peak = _timed(case.meter, lambda: fa.attribute(case.image, **kwargs))
        res = _ours("krypton-captum-feature-ablation", f"krypton.captum FeatureAblation SLIC {k} segments ppe={ppe} "
                    f"({when})", dict(config, call=when), secs, peak, fa.last_runs, ref, attr,
                    notes=[f"delegated to Captum: {fa.last_fallback}"] if fa.last_fallback else [])
        res.positions_total = res.positions_timed = k
        res.batch_size = ppe
        res.extra["vs_captum_seconds"] = rows[0].seconds
        rows.append(res)
    return rows


def edited_frames(case: Case, frames: int, size: int) -> torch.Tensor:
    """`frames` copies of the image, each with one random `size` x `size` square replaced by noise
    (an edited frame: a sticker, a moving object), at a random place."""
    _, c, h, w = case.image.shape
    size = max(1, min(size, h // 2, w // 2))  # an edit of part of the frame
    out = case.image.expand(frames, -1, -1, -1).clone()
    gen = torch.Generator().manual_seed(int(case.rng.integers(1 << 31)))
    for i in range(frames):
        y, x = int(case.rng.integers(0, h - size + 1)), int(case.rng.integers(0, w - size + 1))
        out[i, :, y:y + size, x:x + size] = torch.randn(c, size, size, generator=gen).to(out)
    return out


def run_edits(case: Case, frames: int, size: int) -> list[Result]:
    """model(edited frames) stock vs krypton.IncrementalModel (reference = the clean image, materialized
    outside the timing, as a video/editing loop would hold it)."""
    batch = edited_frames(case, frames, size)
    _, _, h, w = case.image.shape
    size = max(1, min(size, h // 2, w // 2))
    config = {"frames": frames, "edit_size": size}
    ref, secs, peak = _timed(case.meter, lambda: case.model(batch))
    rows = [Result("edits-stock", f"stock model, {frames} edited frames ({size}px edit)", dict(config),
                   seconds=secs, peak_bytes=peak, batch_size=frames, positions_total=frames, positions_timed=frames,
                   theoretical_centre=1.0, theoretical_executed=1.0)]
    inc = krypton.IncrementalModel(case.model)
    inc.reference(case.image)
    for when in ("cold", "warm"):
        out, secs, peak = _timed(case.meter, lambda: inc(batch))
        res = _ours("krypton-edits", f"krypton IncrementalModel, {frames} edited frames ({size}px edit) ({when})",
                    dict(config, call=when), secs, peak, [inc.last_run], ref, out,
                    notes=["cold: the first call plans the edit sizes; warm: the same batch again, plans cached"])
        res.positions_total = res.positions_timed = frames
        res.extra["vs_stock_seconds"] = rows[0].seconds
        rows.append(res)
    return rows
