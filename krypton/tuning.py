"""Tuning whole approximate configurations to a target heatmap quality (SIGMOD'19 §4.1, extended).

A configuration is (precision, tau, drill-down): reduced precision of the occluded runs, projective-field
thresholding and two-stage drill-down, the three approximations the engine composes. Offline, for one
model with REAL weights and a handful of tuning photos (scripts/tune.py, stored as
krypton/tuned/<model>.json):

- one full heatmap per (precision, tau) at the finest tuned stride (4), timed; the exact map is
  (float32, tau 1);
- every coarser tuned stride S (8) is the same map subsampled ([::S/4, ::S/4]: its patch corners are a
  subset), and every drill-down setting (S1 = factor * S, r) is simulated from the full map of its
  (precision, tau) with approx.simulate, which equals what the engine returns (tested);
- each configuration gets its SSIM against the exact map per photo, and an expected speedup per photo:
  t(exact) / t(precision, tau), times N2 / (N1 + k) for drill-down (positions run; stage-1 and stage-2
  positions cost the same).

Online, `Tuning.choose(target, stride, patch_size)` returns the fastest configuration (median expected
speedup) whose tuning SSIM has mean >= target AND minimum >= target - MARGIN on every tuning photo, and
whose drill-down stage 1 leaves no blind strips (S1 <= P). The exact configuration always qualifies.
Requests at an untuned stride use the nearest tuned one, and the response says so.

Models without a tuning file get no quality promise: mode="approximate" / target_ssim then use the paper's
tau for the architecture (VGG16 0.5, ResNet18 0.7, Inception3 0.9: tuned on real ImageNet weights,
which our randomly initialised builds do not have) or tau 0.9, float32, no drill-down, and the response
says that the expected SSIM is unknown.

SSIM is scikit-image's `structural_similarity` (not a hand-rolled one) with:
- data_range = max - min over BOTH heatmaps (probabilities of the label; a fixed range of 1.0 would make
  maps whose probabilities vary by a few percent look perfect whatever their structure);
- win_size = 7 (skimage's default, uniform window) when both sides of the map are >= 7, else the largest
  odd size that fits (maps smaller than 3 x 3 have no SSIM and raise ValueError).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import approx
from .errors import OptionError

FORMAT_VERSION = 2
TAUS = (1.0, 0.9, 0.8, 0.7)
PRECISIONS = ("float32", "bf16")
DRILLDOWNS = ((2, 0.05), (2, 0.1), (2, 0.25), (2, 0.5), (3, 0.1), (3, 0.25), (4, 0.1), (4, 0.25))  # (S1/S2, r)
STRIDES = (4, 8)
MARGIN = 0.05  # every tuning photo within this of the target (the "never below target - 0.1" has slack)
DEFAULT_TARGET_SSIM = 0.9
TUNED_DIR = Path(__file__).resolve().parent / "tuned"
# SIGMOD'19 §5.3: the tau that met SSIM 0.9 on the real ImageNet models (P = 16, S = 4).
PAPER_TAUS = {"vgg16": 0.5, "resnet18": 0.7, "inception_v3": 0.9}
PAPER_TARGET_SSIM = 0.9
DEFAULT_TAU = 0.9
SSIM_WIN_SIZE = 7


# ---- SSIM -------------------------------------------------------------------------------------------
def ssim_win_size(shape) -> int:
    """skimage's default window (7) when it fits, else the largest odd window that fits (>= 3)."""
    side = int(min(shape))
    if side < 3:
        raise ValueError(f"heatmap shape {tuple(shape)} is too small for SSIM: both sides must be >= 3")
    win = min(SSIM_WIN_SIZE, side)
    return win if win % 2 else win - 1


def heatmap_ssim(exact, approx_map) -> float:
    """SSIM of an approximate heatmap against the exact one (see the module docstring for the settings)."""
    from skimage.metrics import structural_similarity

    a = np.asarray(_numpy(exact), dtype=np.float64)
    b = np.asarray(_numpy(approx_map), dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"heatmaps must be 2-D of one shape, got {a.shape} and {b.shape}")
    win = ssim_win_size(a.shape)
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    if hi - lo <= 0.0:
        return 1.0  # both maps are the same constant
    return float(structural_similarity(a, b, data_range=hi - lo, win_size=win))


def _numpy(x):
    return x.detach().cpu().double().numpy() if hasattr(x, "detach") else x


def check_target_ssim(target_ssim) -> float:
    if isinstance(target_ssim, bool) or not isinstance(target_ssim, (int, float)) \
            or not math.isfinite(target_ssim) or not 0.0 < target_ssim <= 1.0:
        raise OptionError("target_ssim", target_ssim, "(0, 1]")
    return float(target_ssim)


# ---- configurations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """One approximate configuration; drill-down as (S1 / S2, r) so that it applies at any stride."""

    precision: str = "float32"
    tau: float = 1.0
    drilldown: tuple[int, float] | None = None

    @property
    def exact(self) -> bool:
        return self.precision == "float32" and self.tau >= 1.0 and self.drilldown is None

    def s1(self, stride: int) -> int | None:
        return None if self.drilldown is None else self.drilldown[0] * stride

    def label(self) -> str:
        parts = [] if self.precision == "float32" else [self.precision]
        parts += [f"tau={self.tau:g}"] if self.tau < 1.0 else []
        if self.drilldown is not None:
            parts.append(f"drill-down S1={self.drilldown[0]}xS2 r={self.drilldown[1]:g}")
        return " + ".join(parts) or "exact"

    def to_dict(self) -> dict:
        dd = None if self.drilldown is None else {"s1_factor": self.drilldown[0], "r": self.drilldown[1]}
        return {"precision": self.precision, "tau": self.tau, "drilldown": dd}

    @classmethod
    def from_dict(cls, data: dict) -> "Config":
        dd = data.get("drilldown")
        return cls(str(data.get("precision", "float32")), float(data.get("tau", 1.0)),
                   None if dd is None else (int(dd["s1_factor"]), float(dd["r"])))

    def options(self, stride: int) -> dict:
        """The Explainer.explain keyword arguments of this configuration at `stride`."""
        out = {"tau": self.tau, "precision": self.precision}
        if self.drilldown is not None:
            out["drilldown"] = {"s1": self.s1(stride), "r": self.drilldown[1]}
        return out


EXACT = Config()


@dataclass
class Result:
    """A configuration's tuning record at one stride: SSIM and expected speedup per tuning photo."""

    config: Config
    ssim: dict[str, float]
    speedup: dict[str, float]

    @property
    def mean_ssim(self) -> float:
        return float(np.mean(list(self.ssim.values())))

    @property
    def min_ssim(self) -> float:
        return float(min(self.ssim.values()))

    @property
    def median_speedup(self) -> float:
        return float(np.median(list(self.speedup.values())))

    def meets(self, target: float) -> bool:
        return self.mean_ssim >= target and self.min_ssim >= target - MARGIN

    def to_json(self) -> dict:
        return {"config": self.config.to_dict(), "ssim": self.ssim, "speedup": self.speedup,
                "mean_ssim": round(self.mean_ssim, 4), "min_ssim": round(self.min_ssim, 4),
                "median_speedup": round(self.median_speedup, 3)}


def pareto_front(results: list[Result]) -> list[Result]:
    """The results no other result beats on both mean SSIM and median speedup, fastest first."""
    ordered = sorted(results, key=lambda r: (-r.median_speedup, -r.mean_ssim))
    front, best = [], -1.0
    for res in ordered:
        if res.mean_ssim > best:
            front.append(res)
            best = res.mean_ssim
    return front


# ---- the tuning record ------------------------------------------------------------------------------
@dataclass
class Tuning:
    """Tuning data of one model and the rule that maps a target SSIM to a configuration.

    source: "tuned" (measured on real weights, from a file), "paper" (no data; the paper's tau for SSIM
    0.9 on the same architecture) or "default" (no data: tau = DEFAULT_TAU)."""

    model: str
    source: str
    results: dict[int, list[Result]] = field(default_factory=dict)  # stride -> results
    meta: dict = field(default_factory=dict)
    path: str | None = None

    def tuned_stride(self, stride: int) -> int:
        """The tuned stride closest to `stride` (the smaller one on a tie)."""
        return min(self.results, key=lambda s: (abs(s - stride), s))

    def choose(self, target: float, stride: int, patch_size: int, drilldown: bool = True) -> Result | None:
        """The fastest tuned configuration meeting `target` at (the nearest tuned) `stride`; None: exact."""
        target = check_target_ssim(target)
        tuned = self.tuned_stride(stride)
        best = None
        for res in self.results[tuned]:
            dd = res.config.drilldown
            if res.config.exact or not res.meets(target) or (dd is not None and (
                    not drilldown or dd[0] * stride > patch_size)):
                continue  # drill-down's stage 1 must occlude every pixel (S1 <= P)
            if best is None or (res.median_speedup, res.mean_ssim) > (best.median_speedup, best.mean_ssim):
                best = res
        return best if best is not None and best.median_speedup > 1.0 else None

    def _chosen(self, target: float, stride: int) -> Config:
        """The configuration choose() gives at the tuned patch size (EXACT when none qualifies)."""
        res = self.choose(target, stride, self.meta.get("patch_size", 16))
        return EXACT if res is None else res.config

    def describe(self, target: float, stride: int, patch_size: int, drilldown: bool = True) -> dict:
        """The configuration for `target` and what a response reports about it."""
        target = check_target_ssim(target)
        if self.source != "tuned":
            tau = PAPER_TAUS.get(self.model, DEFAULT_TAU) if target <= PAPER_TARGET_SSIM else 1.0
            config = Config(tau=tau)
            return {"target_ssim": target, "configuration": config.to_dict(), "tau": tau,
                    "tau_source": self.source, "expected_ssim": None,
                    "quality": f"unknown: {self.model!r} has no tuning on real weights, so no SSIM is promised "
                               + ("(tau is the paper's value for this architecture on ImageNet weights)"
                                  if self.source == "paper" else "(tau 0.9, the most conservative of the paper's)")}
        res = self.choose(target, stride, patch_size, drilldown)
        tuned = self.tuned_stride(stride)
        config = EXACT if res is None else res.config
        out = {"target_ssim": target, "configuration": config.to_dict(), "tau": config.tau, "tau_source": "tuned",
               "expected_ssim": 1.0 if res is None else round(res.mean_ssim, 4),
               "worst_tuning_ssim": 1.0 if res is None else round(res.min_ssim, 4),
               "expected_speedup": 1.0 if res is None else round(res.median_speedup, 3),
               "tuning": {"model": self.model, "stride": tuned, "patch_size": self.meta.get("patch_size"),
                          "fill": self.meta.get("fill"), "photos": len(self.meta.get("photos", []))}}
        notes = []
        if tuned != stride:
            notes.append(f"tuned at stride {tuned}, the nearest to the requested {stride}")
        if self.meta.get("patch_size") not in (None, patch_size):
            notes.append(f"tuned at patch {self.meta['patch_size']}, requested {patch_size}")
        if notes:
            out["tuning"]["note"] = "; ".join(notes)
        return out

    # ---- persistence ----
    def to_json(self) -> dict:
        return {"model": self.model, "source": self.source, "version": FORMAT_VERSION, **self.meta,
                "strides": {str(s): [r.to_json() for r in rs] for s, rs in sorted(self.results.items())},
                "choices": {str(s): {str(t): self._chosen(t, s).label() for t in (0.8, 0.9, 0.95)}
                            for s in sorted(self.results)}}

    @classmethod
    def from_json(cls, data: dict, path: str | None = None) -> "Tuning":
        try:
            if data.get("version") != FORMAT_VERSION:
                raise ValueError(f"version {data.get('version')!r}, expected {FORMAT_VERSION} (rerun scripts/tune.py)")
            results = {int(s): [Result(Config.from_dict(r["config"]), {str(k): float(v) for k, v in r["ssim"].items()},
                                       {str(k): float(v) for k, v in r["speedup"].items()}) for r in rs]
                       for s, rs in data["strides"].items()}
            if not results or any(not rs or any(not r.ssim or set(r.ssim) != set(r.speedup) for r in rs)
                                  for rs in results.values()):
                raise ValueError("every stride needs results with SSIM and speedup for the same photos")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"tuning file {path or ''} is malformed: {exc}") from None
        skip = {"model", "source", "version", "strides", "choices"}
        return cls(str(data.get("model", "")), "tuned", results, {k: v for k, v in data.items() if k not in skip}, path)

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")


def load_tuning(path) -> Tuning:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read tuning file {path}: {exc}") from None
    return Tuning.from_json(data, str(path))


def tuning_for(model_or_name, directory=None) -> Tuning:
    """The tuning of a model: krypton/tuned/<name>.json (or $KRYPTON_TUNED_DIR/<name>.json) if it exists,
    else the paper's / the default fallback. `model_or_name` is a name or a model carrying
    `krypton_name` (set by krypton.models.build_model) or a `krypton_tuning` attribute (a Tuning)."""
    if isinstance(getattr(model_or_name, "krypton_tuning", None), Tuning):
        return model_or_name.krypton_tuning
    name = model_or_name if isinstance(model_or_name, str) else getattr(model_or_name, "krypton_name", None)
    name = name or "unknown"
    dirs = [Path(d) for d in (directory, os.environ.get("KRYPTON_TUNED_DIR")) if d] + [TUNED_DIR]
    for d in dirs:
        candidate = d / f"{name}.json"
        if candidate.is_file():
            return load_tuning(candidate)
    return Tuning(name, "paper" if name in PAPER_TAUS else "default")


# ---- measuring --------------------------------------------------------------------------------------
def full_maps(explainer, image, patch_size: int, stride: int, fill, normalize, precisions=PRECISIONS,
              taus=TAUS, log=None) -> tuple[dict, float]:
    """{(precision, tau): (heatmap as float64 array, seconds)} at `stride`, and the clean probability."""
    maps, probability = {}, None
    for precision in precisions:
        for tau in sorted(taus, reverse=True):
            t0 = time.perf_counter()
            exp = explainer.explain(image, patch_size=patch_size, stride=stride, fill=fill, normalize=normalize,
                                    **Config(precision, tau).options(stride))
            maps[(precision, float(tau))] = (exp.heatmap.double().numpy(), time.perf_counter() - t0)
            probability = exp.probability
            if log:
                log(f"{precision} tau={tau:g}: {maps[(precision, float(tau))][1]:.1f}s")
    return maps, float(probability)


def score(maps: dict, probability: float, base_stride: int, stride: int, drilldowns=DRILLDOWNS) -> list[tuple]:
    """[(Config, SSIM, expected speedup)] of every configuration at `stride` from the full maps at
    `base_stride` (see the module docstring)."""
    step = stride // base_stride
    exact, t_exact = maps[("float32", 1.0)]
    exact = exact[::step, ::step]
    out = []
    for (precision, tau), (full, seconds) in maps.items():
        full = full[::step, ::step]
        ratio = t_exact / seconds
        if (precision, tau) != ("float32", 1.0):
            out.append((Config(precision, tau), heatmap_ssim(exact, full), ratio))
        for factor, r in drilldowns:
            if (full.shape[0] - 1) // factor < 1 or (full.shape[1] - 1) // factor < 1:
                continue  # stage 1 would be a single row or column
            merged, refined, _ = approx.simulate(full, probability, factor * stride, stride, r)
            run = math.ceil(full.shape[0] / factor) * math.ceil(full.shape[1] / factor) + int(refined.sum())
            out.append((Config(precision, tau, (factor, r)), heatmap_ssim(exact, merged), ratio * full.size / run))
    return out


def tune(explainer, model_name: str, images: dict, patch_size: int = 16, strides=STRIDES, fill="gray",
         normalize=None, precisions=PRECISIONS, taus=TAUS, drilldowns=DRILLDOWNS, log=None,
         extra_meta=None) -> Tuning:
    """Measure and score every configuration on `images` (name -> (C, H, W) tensor); return the Tuning."""
    strides = sorted(int(s) for s in strides)
    base = strides[0]
    if any(s % base for s in strides):
        raise ValueError(f"every tuned stride must be a multiple of the smallest, got {strides}")
    if 1.0 not in taus or "float32" not in precisions:
        raise ValueError("taus must include 1.0 and precisions float32 (the exact map)")
    records: dict[int, dict[Config, Result]] = {s: {} for s in strides}
    seconds = {}
    for name, image in images.items():
        maps, probability = full_maps(explainer, image, patch_size, base, fill, normalize, precisions, taus,
                                      log and (lambda m, n=name: log(f"{n} {m}")))
        seconds[name] = {f"{p} tau={t:g}": round(sec, 2) for (p, t), (_, sec) in maps.items()}
        for stride in strides:
            for config, ssim, speedup in score(maps, probability, base, stride, drilldowns):
                res = records[stride].setdefault(config, Result(config, {}, {}))
                res.ssim[name], res.speedup[name] = round(ssim, 5), round(speedup, 4)
    first = next(iter(images.values()))
    meta = {"input_size": [int(first.shape[-2]), int(first.shape[-1])], "patch_size": patch_size, "fill": fill,
            "photos": list(images), "base_stride": base,
            "ssim_settings": {"implementation": "skimage.metrics.structural_similarity",
                              "data_range": "max - min over both heatmaps", "win_size": SSIM_WIN_SIZE},
            "lookup": f"fastest configuration (median expected speedup) with mean SSIM >= target and every tuning "
                      f"photo >= target - {MARGIN}, drill-down only with S1 <= P",
            "speedup": f"t(exact) / t(precision, tau) measured at stride {base}, times N2 / (N1 + k) for drill-down",
            "seconds": seconds, "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    meta.update(extra_meta or {})
    return Tuning(model_name, "tuned", {s: list(rs.values()) for s, rs in records.items()}, meta)


# ---- sample photos ----------------------------------------------------------------------------------
# Tuning photos (scripts/tune.py); the quality benchmark holds out the others (HELD_OUT_PHOTOS).
TUNING_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle")
HELD_OUT_PHOTOS = ("china", "flower", "camera", "coins", "clock", "hubble_deep_field", "grace_hopper")
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle", "camera", "coins", "clock",
                  "hubble_deep_field", "immunohistochemistry", "retina", "moon", "grass", "gravel", "brick")
SKLEARN_PHOTOS = ("china", "flower")
MATPLOTLIB_PHOTOS = ("grace_hopper",)  # matplotlib's sample_data/grace_hopper.jpg
PHOTOS = SKIMAGE_PHOTOS + SKLEARN_PHOTOS + MATPLOTLIB_PHOTOS


def load_photo(name: str) -> np.ndarray:
    """A real photo shipped with scikit-image (scikit-learn: china, flower; matplotlib: grace_hopper) as
    uint8 RGB (H, W, 3)."""
    if name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image

        arr = load_sample_image(f"{name}.jpg")
    elif name in MATPLOTLIB_PHOTOS:
        import matplotlib.cbook
        from PIL import Image

        with Image.open(matplotlib.cbook.get_sample_data(f"{name}.jpg")) as img:
            arr = np.asarray(img.convert("RGB"))
    else:
        import skimage.data

        if name == "motorcycle":
            arr = skimage.data.stereo_motorcycle()[0]
        elif name in SKIMAGE_PHOTOS:
            arr = getattr(skimage.data, name)()
        else:
            raise ValueError(f"photo {name!r} is unknown: use one of {', '.join(PHOTOS)}")
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3].astype(np.uint8))


def preprocess(arr: np.ndarray, resize: int, crop: int, mean, std):
    """torchvision Resize(resize, BILINEAR) + CenterCrop(crop) + ToTensor + Normalize, the handler's
    arithmetic (krypton.preprocess), returning a float32 (3, crop, crop) tensor."""
    from .preprocess import preprocess_array

    return preprocess_array(arr, resize, crop, mean, std)[0]


def photo_tensor(name: str, model_name: str):
    from .models import PREPROCESS

    pre = PREPROCESS[model_name]
    return preprocess(load_photo(name), pre["resize"], pre["crop"], pre["mean"], pre["std"])
