"""Tuning the projective-field threshold tau to a target heatmap quality (SIGMOD'19 §4.1, "tuning tau").

Offline, for one model and a handful of sample images: compute the exact heatmap (tau = 1) and the
approximate ones at tau = 1.0, 0.9, ..., 0.4, score each approximate map by SSIM against the exact one,
fit a degree-2 polynomial SSIM(tau) and store everything as JSON (krypton/tuned/<model>.json, produced by
scripts/tune_tau.py). Online, `Tuning.tau_for(target_ssim)` returns the lowest tau on the 0.1 grid (never
below 0.4) whose quality meets the target.

SSIM is scikit-image's `structural_similarity` (not a hand-rolled one) with:
- data_range = max - min over BOTH heatmaps (probabilities of the label; a fixed range of 1.0 would make
  maps whose probabilities vary by a few percent look perfect whatever their structure);
- win_size = 7 (skimage's default, uniform window) when both sides of the map are >= 7, else the largest
  odd size that fits (maps smaller than 3 x 3 have no SSIM and raise ValueError).

Where no tuning file exists, `tuning_for(name)` falls back to the paper's taus for SSIM 0.9 (VGG16 0.5,
ResNet18 0.7, Inception3 0.9, source "paper": they were tuned on the real ImageNet weights, which our
randomly initialised builds of those architectures do not have; a tuning file computed on random
weights would be meaningless) and to tau = 0.9 for any other model (source "default", the most
conservative of the paper's tuned values).

A low precision (Explainer.explain(precision="bf16")) approximates too: `tune(..., precision="bf16")`
measures SSIM(tau) of the maps run at that precision against the float32 exact map, stored as
krypton/tuned/<model>.<precision>.json; `tuning_for(model, precision=...)` prefers that file and falls
back to the float32 one, and the response names the precision the curve was measured at.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import OptionError

TAUS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)
TAU_FLOOR = 0.4
TAU_STEP = 0.1
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


def heatmap_ssim(exact, approx) -> float:
    """SSIM of an approximate heatmap against the exact one (see the module docstring for the settings)."""
    from skimage.metrics import structural_similarity

    a = np.asarray(_numpy(exact), dtype=np.float64)
    b = np.asarray(_numpy(approx), dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"heatmaps must be 2-D of one shape, got {a.shape} and {b.shape}")
    win = ssim_win_size(a.shape)
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    if hi - lo <= 0.0:
        return 1.0  # both maps are the same constant
    return float(structural_similarity(a, b, data_range=hi - lo, win_size=win))


def _numpy(x):
    return x.detach().cpu().double().numpy() if hasattr(x, "detach") else x


# ---- the tuning record ------------------------------------------------------------------------------
def check_target_ssim(target_ssim) -> float:
    if isinstance(target_ssim, bool) or not isinstance(target_ssim, (int, float)) \
            or not math.isfinite(target_ssim) or not 0.0 < target_ssim <= 1.0:
        raise OptionError("target_ssim", target_ssim, "(0, 1]")
    return float(target_ssim)


def _grid() -> list[float]:
    """0.4, 0.5, ..., 1.0 (rounded so that 0.1 steps compare exactly)."""
    n = int(round((1.0 - TAU_FLOOR) / TAU_STEP))
    return [round(TAU_FLOOR + i * TAU_STEP, 10) for i in range(n + 1)]


@dataclass
class Tuning:
    """SSIM-vs-tau data of one model and the rule that maps a target SSIM to a tau.

    source: "tuned" (measured, from a file), "paper" (the paper's tau for SSIM 0.9 on the same
    architecture) or "default" (no data: tau = DEFAULT_TAU for targets <= 0.9).
    """

    model: str
    source: str
    taus: list[float] = field(default_factory=list)
    ssim: dict[str, list[float]] = field(default_factory=dict)  # sample name -> SSIM per tau
    coefficients: list[float] = field(default_factory=list)  # np.polyfit order, highest degree first
    meta: dict = field(default_factory=dict)
    path: str | None = None

    # ---- quality model ----
    def fitted(self, tau: float) -> float:
        return float(np.polyval(self.coefficients, tau)) if self.coefficients else float("nan")

    def mean_ssim(self) -> list[float]:
        if not self.ssim:
            return []
        return [float(v) for v in np.mean(np.array(list(self.ssim.values()), dtype=np.float64), axis=0)]

    def measured(self, tau: float) -> float | None:
        for t, m in zip(self.taus, self.mean_ssim()):
            if abs(t - tau) < 1e-9:
                return m
        return None

    def meets(self, tau: float, target: float) -> bool:
        """Fitted SSIM >= target, and the measured mean too where tau was measured (both must hold)."""
        if tau >= 1.0:
            return True  # tau = 1 is the exact heatmap: SSIM 1 by definition
        measured = self.measured(tau)
        return self.fitted(tau) >= target and (measured is None or measured >= target)

    def tau_for(self, target_ssim: float = DEFAULT_TARGET_SSIM) -> float:
        """The lowest tau on the 0.1 grid (>= 0.4) such that it and every larger tau meet the target.

        "Every larger tau" keeps the answer safe where the fitted parabola is not monotonic. Without
        measurements: the paper's tau (or DEFAULT_TAU) for targets <= 0.9, exact (1.0) above that.
        """
        target = check_target_ssim(target_ssim)
        if self.source != "tuned":
            fallback = PAPER_TAUS.get(self.model, DEFAULT_TAU)
            return fallback if target <= PAPER_TARGET_SSIM else 1.0
        best = 1.0
        for tau in sorted(_grid(), reverse=True):
            if not self.meets(tau, target):
                break
            best = tau
        return best

    def describe(self, target_ssim: float) -> dict:
        """What a response reports about how tau was chosen."""
        tau = self.tau_for(target_ssim)
        out = {"tau": tau, "tau_source": self.source, "target_ssim": float(target_ssim), "tuning_model": self.model}
        if self.source == "tuned":
            out["tuning_precision"] = self.meta.get("precision", "float32")
            out["expected_ssim"] = round(self.fitted(tau), 4) if tau < 1.0 else 1.0
            out["tuning"] = {k: self.meta[k] for k in ("input_size", "patch_size", "stride", "fill")
                             if k in self.meta}
            out["tuning"]["samples"] = len(self.ssim)
        return out

    # ---- persistence ----
    def to_json(self) -> dict:
        return {"model": self.model, "source": self.source, **self.meta, "taus": self.taus,
                "samples": list(self.ssim), "ssim": self.ssim, "mean_ssim": self.mean_ssim(),
                "fit": {"degree": 2, "coefficients": self.coefficients,
                        "fitted": [self.fitted(t) for t in self.taus]},
                "tau_for": {str(t): self.tau_for(t) for t in (0.8, 0.85, 0.9, 0.95)}}

    @classmethod
    def from_json(cls, data: dict, path: str | None = None) -> "Tuning":
        try:
            taus = [float(t) for t in data["taus"]]
            ssim = {str(k): [float(v) for v in vals] for k, vals in data["ssim"].items()}
            coefficients = [float(c) for c in data["fit"]["coefficients"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"tuning file {path or ''} is malformed: {exc!r}") from None
        if any(len(v) != len(taus) for v in ssim.values()) or len(coefficients) != 3:
            raise ValueError(f"tuning file {path or ''} is malformed: per-sample SSIMs must have one value "
                             "per tau and the fit 3 coefficients")
        skip = {"model", "source", "taus", "samples", "ssim", "mean_ssim", "fit", "tau_for"}
        meta = {k: v for k, v in data.items() if k not in skip}
        return cls(str(data.get("model", "")), "tuned", taus, ssim, coefficients, meta, path)

    def save(self, path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")


def fit(taus, ssim_rows) -> list[float]:
    """Least-squares degree-2 polynomial through every (tau, SSIM) point of every sample."""
    taus = np.asarray(taus, dtype=np.float64)
    rows = np.asarray(ssim_rows, dtype=np.float64).reshape(-1, len(taus))
    xs = np.tile(taus, rows.shape[0])
    return [float(c) for c in np.polyfit(xs, rows.ravel(), 2)]


def load_tuning(path) -> Tuning:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read tuning file {path}: {exc}") from None
    return Tuning.from_json(data, str(path))


def tuning_for(model_or_name, directory=None, precision: str = "float32") -> Tuning:
    """The tuning of a model: krypton/tuned/<name>.json (or $KRYPTON_TUNED_DIR/<name>.json) if it exists,
    else the paper's / the default fallback. `model_or_name` is a name or a model carrying
    `krypton_name` (set by krypton.models.build_model) or a `krypton_tuning` attribute (a Tuning).
    A `precision` other than float32 looks for <name>.<precision>.json first (measured at it)."""
    if isinstance(getattr(model_or_name, "krypton_tuning", None), Tuning):
        return model_or_name.krypton_tuning
    name = model_or_name if isinstance(model_or_name, str) else getattr(model_or_name, "krypton_name", None)
    name = name or "unknown"
    dirs = [Path(d) for d in (directory, os.environ.get("KRYPTON_TUNED_DIR")) if d] + [TUNED_DIR]
    files = ([f"{name}.{precision}.json"] if precision != "float32" else []) + [f"{name}.json"]
    for file in files:
        for d in dirs:
            if (d / file).is_file():
                return load_tuning(d / file)
    return Tuning(name, "paper" if name in PAPER_TAUS else "default")


# ---- measuring --------------------------------------------------------------------------------------
def measure(explainer, images: dict, patch_size: int, stride: int, fill="gray", normalize=None,
            taus=TAUS, batch_size=None, log=None, precision: str = "float32") -> tuple[dict, dict]:
    """SSIM (the float32 exact map vs tau at `precision`) per image and tau.
    Returns ({name: [ssim per tau]}, {name: {tau: seconds}})."""
    import time

    ssim, seconds = {}, {}
    order = sorted({float(t) for t in taus} | {1.0}, reverse=True)  # 1.0 first: the reference map at float32
    options = dict(patch_size=patch_size, stride=stride, fill=fill, normalize=normalize, batch_size=batch_size)
    for name, image in images.items():
        maps, seconds[name] = {}, {}
        exact = None if precision == "float32" else explainer.explain(image, **options).heatmap
        for tau in order:
            t0 = time.perf_counter()
            maps[tau] = explainer.explain(image, **options, tau=tau, precision=precision).heatmap
            seconds[name][tau] = time.perf_counter() - t0
            exact = maps[tau] if exact is None else exact
            if log:
                log(f"{name} tau={tau:.1f} precision={precision} ssim={heatmap_ssim(exact, maps[tau]):.4f} "
                    f"{seconds[name][tau]:.1f}s")
        ssim[name] = [heatmap_ssim(exact, maps[float(t)]) for t in taus]
    return ssim, seconds


def tune(explainer, model_name: str, images: dict, patch_size: int, stride: int, fill="gray", normalize=None,
         taus=TAUS, batch_size=None, log=None, extra_meta=None, precision: str = "float32") -> Tuning:
    """Measure SSIM(tau) on `images` (name -> (C, H, W) tensor) at `precision`, fit it and return the Tuning."""
    taus = [float(t) for t in taus]
    if 1.0 not in taus:
        raise ValueError("taus must include 1.0 (the exact heatmap)")
    ssim, seconds = measure(explainer, images, patch_size, stride, fill, normalize, taus, batch_size, log, precision)
    first = next(iter(images.values()))
    meta = {"input_size": [int(first.shape[-2]), int(first.shape[-1])], "patch_size": patch_size,
            "stride": stride, "fill": fill, "precision": precision,
            "ssim_settings": {"implementation": "skimage.metrics.structural_similarity",
                              "data_range": "max - min over both heatmaps", "win_size": SSIM_WIN_SIZE,
                              "gaussian_weights": False},
            "lookup": "lowest tau in 0.4..1.0 (step 0.1) such that it and every larger tau have fitted AND "
                      "measured-mean SSIM >= target",
            "seconds": {n: {str(t): round(s, 2) for t, s in v.items()} for n, v in seconds.items()},
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    meta.update(extra_meta or {})
    return Tuning(model_name, "tuned", taus, ssim, fit(taus, list(ssim.values())), meta)


# ---- sample photos ----------------------------------------------------------------------------------
SKIMAGE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle", "camera", "coins", "clock",
                  "hubble_deep_field", "immunohistochemistry", "retina", "moon", "grass", "gravel", "brick")
SKLEARN_PHOTOS = ("china", "flower")


def load_photo(name: str) -> np.ndarray:
    """A real photo shipped with scikit-image (or scikit-learn: china, flower) as uint8 RGB (H, W, 3)."""
    if name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image

        arr = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        if name == "motorcycle":
            arr = skimage.data.stereo_motorcycle()[0]
        elif name in SKIMAGE_PHOTOS:
            arr = getattr(skimage.data, name)()
        else:
            raise ValueError(f"photo {name!r} is unknown: use one of {', '.join(SKIMAGE_PHOTOS + SKLEARN_PHOTOS)}")
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
