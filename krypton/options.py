"""Every option of an explanation, validated and resolved in one place (`resolve`).

The Python API, the TorchServe handler and the benchmarks all pass their options through here, so one
set of rules decides what is allowed: ranges, combinations (naive re-inference has no tau or drill-down;
mode="exact" forbids every approximation), named fills, the tau a target SSIM stands for, the drill-down
stages and the precision the occluded positions run in.
Every refusal is an `OptionError` naming the parameter, the value and the allowed range, raised before
any work that scales with the request.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from . import geometry as geo
from .approx import DrillDown, resolve_drilldown
from .errors import OptionError
from .tuning import DEFAULT_TARGET_SSIM, check_target_ssim

METHODS = ("incremental", "naive")
MODES = ("exact", "approximate")
NAMED_FILLS = {"black": 0.0, "gray": 0.5, "grey": 0.5}  # on [0, 1] RGB, before normalization
DEFAULT_MEMORY_BUDGET = 1 << 30
# precision of the occluded positions -> the dtype they run in ("float32": the model's own dtype, unchanged)
PRECISIONS = {"float32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# fp16 on this project's AVX512-BF16 CPU (no AVX512-FP16, no AMX): EfficientNet-Lite0 full inference, batch 16,
# 2 threads, NCHW / channels_last: fp16 2.6 / 4.3 s, float32 0.72 / 0.45 s, bf16 0.26 / 0.22 s (README)
CUDA_ONLY_PRECISIONS = ("fp16",)


@dataclass(frozen=True)
class ExplainOptions:
    """Resolved options of one run. `approximation` is the report of how tau / drill-down / precision were
    chosen (None for a plain exact run); `drilldown` the resolved stages (None: off); `precision` what the
    occluded positions run in (the clean image always runs in the model's dtype: label and probability)."""

    patch_size: int
    stride: int
    fill: list[float]
    target: int | None
    batch_size: int | None
    method: str
    memory_budget: int
    tau: float
    origins: np.ndarray | None
    drilldown: DrillDown | None
    approximation: dict | None
    precision: str = "float32"

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype the occluded positions run in; None: the model's own."""
        return PRECISIONS[self.precision]

    def stage(self, **changes) -> "ExplainOptions":
        """The same options for one stage of a drill-down (other stride, origins or target)."""
        return replace(self, **changes)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def fill_values(fill, channels: int, normalize=None) -> list[float]:
    """Per-channel values written over the patch, in the model's (normalized) input space."""
    allowed = f"a finite number, a list of {channels} finite numbers, or gray | black | mean (with normalize)"
    if isinstance(fill, str):
        if fill not in NAMED_FILLS and fill != "mean":
            raise OptionError("fill", fill, allowed, "is not allowed")
        if normalize is None:
            raise OptionError("normalize", None, "(mean, std) of the model's input normalization",
                              f"is missing: fill={fill!r} needs normalize=(mean, std) to be converted to the "
                              "model's input space (or pass a number as fill)")
        try:
            mean, std = (list(map(float, v)) for v in normalize)
        except (TypeError, ValueError):
            raise OptionError("normalize", normalize, f"(mean, std), {channels} numbers each", "is malformed") from None
        if len(mean) != channels or len(std) != channels or not all(s > 0 for s in std):
            raise OptionError("normalize", normalize, f"(mean, std), {channels} numbers each, std > 0",
                              "does not fit the image")
        if fill == "mean":
            return [0.0] * channels
        return [(NAMED_FILLS[fill] - m) / s for m, s in zip(mean, std)]
    values = [fill] if _is_number(fill) else list(fill) if isinstance(fill, (list, tuple)) else None
    if values is None or not values or not all(_is_number(v) and math.isfinite(v) for v in values):
        raise OptionError("fill", fill, allowed, "is not allowed")
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise OptionError("fill", fill, allowed, f"has {len(values)} values")
    return [float(v) for v in values]


def checked_origins(origins, height: int, width: int, patch_size: int) -> np.ndarray:
    """Explicit patch positions (top-left corners) that must keep the patch inside the image."""
    allowed = (f"a non-empty (n, 2) integer array of (y, x) corners in 0..{height - patch_size} x "
               f"0..{width - patch_size} for patch_size={patch_size}")
    try:
        array = np.asarray(origins)
    except (TypeError, ValueError):
        raise OptionError("origins", origins, allowed, "is malformed") from None
    if array.ndim != 2 or array.shape[1:] != (2,) or len(array) == 0 or not np.issubdtype(array.dtype, np.integer):
        raise OptionError("origins", f"array of shape {array.shape} ({array.dtype})", allowed, "is malformed")
    array = array.astype(np.int64)
    low, high = array.min(axis=0), array.max(axis=0)
    if low.min() < 0 or high[0] > height - patch_size or high[1] > width - patch_size:
        raise OptionError("origins", f"corners in {low.tolist()}..{high.tolist()}", allowed)
    return array


def _mode_and_tau(tau, target_ssim, drilldown, mode, tuning: Callable) -> tuple[float, dict | None, object]:
    """(tau, approximation report or None, drill-down request) from tau / target_ssim / drilldown / mode.

    - mode="exact": tau 1, no drill-down; an explicit tau < 1, target_ssim or drilldown is an error.
    - mode="approximate": the given tau if < 1, else the model's tuned tau for target_ssim (default 0.9);
      drill-down with its defaults unless `drilldown` says otherwise (False: off).
    - no mode: tau as given (1.0 = exact) or from target_ssim; drill-down only if asked for.
    """
    if mode is not None and mode not in MODES:
        raise OptionError("mode", mode, " | ".join(MODES), "is not allowed")
    if not _is_number(tau) or not 0.0 < tau <= 1.0:
        raise OptionError("tau", tau, "(0, 1] (1 = exact)")
    tau = float(tau)
    if target_ssim is not None:
        target_ssim = check_target_ssim(target_ssim)
    asked = drilldown not in (None, False)
    if mode == "exact":
        for name, value, bad in (("tau", tau, tau < 1.0), ("target_ssim", target_ssim, target_ssim is not None),
                                 ("drilldown", drilldown, asked)):
            if bad:
                raise OptionError(name, value, "nothing but the defaults with mode=exact (tau 1, no drill-down)",
                                  "contradicts mode='exact'")
        return 1.0, {"mode": "exact", "tau": 1.0, "tau_source": "exact"}, None
    if target_ssim is not None and tau < 1.0:
        raise OptionError("target_ssim", target_ssim, "either tau or target_ssim, not both",
                          f"conflicts with tau={tau:g}")
    if mode is None and tau == 1.0 and target_ssim is None and not asked:
        return 1.0, None, None  # a plain exact run
    report = {"mode": "approximate" if mode == "approximate" or tau < 1.0 or target_ssim is not None or asked
              else "exact"}
    if tau < 1.0:
        report.update(tau=tau, tau_source="given")
    elif target_ssim is not None or mode == "approximate":
        report.update(tuning().describe(DEFAULT_TARGET_SSIM if target_ssim is None else target_ssim))
        tau = report["tau"]
    else:
        report.update(tau=1.0, tau_source="exact")
    if mode == "approximate" and drilldown is None:
        drilldown = True
    return tau, report, drilldown


def check_precision(precision, device) -> str:
    """The precision of the occluded positions; fp16 only where it runs fast (CUDA)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise OptionError("precision", precision, " | ".join(PRECISIONS), "is not allowed")
    if precision in CUDA_ONLY_PRECISIONS and torch.device(device).type != "cuda":
        raise OptionError("precision", precision, "float32 | bf16 for a model on the CPU (fp16 is CUDA-only: on "
                          "the CPU it measured 5.8x slower than float32, bf16 2x faster)", "is CUDA-only")
    return precision


def _with_precision(report: dict | None, precision: str, mode) -> dict | None:
    """The approximation report with the precision in it; running the positions below the model's own
    precision is an approximation (refused by mode="exact")."""
    if precision == "float32":
        return None if report is None else {**report, "precision": precision}
    if mode == "exact":
        raise OptionError("precision", precision, "float32 with mode=exact (exact heatmaps run in the model's dtype)",
                          "contradicts mode='exact'")
    report = {"mode": "approximate", **(report or {"tau": 1.0, "tau_source": "exact"})}
    report.update(mode="approximate", precision=precision)
    return report


def resolve(image_shape, classes: int | None, tuning: Callable, *, patch_size=16, stride=4, fill=0.0,
            normalize=None, target=None, batch_size=None, method="incremental", memory_budget=None, tau=1.0,
            origins=None, target_ssim=None, drilldown=None, mode=None, precision="float32",
            device="cpu") -> ExplainOptions:
    """Validate and resolve the options of Explainer.explain for an image of `image_shape` (1, C, H, W).

    `classes` is the model's number of outputs (for `target`), `tuning(precision)` gives the model's
    Tuning (only called when a target SSIM has to be turned into a tau), `device` is the model's.
    """
    _, channels, height, width = image_shape
    geo.grid_shape(height, width, patch_size, stride)
    if method not in METHODS:
        raise OptionError("method", method, " | ".join(METHODS), "is not allowed")
    if target is not None and (not _is_int(target) or (classes is not None and not 0 <= target < classes)
                               or target < 0):
        raise OptionError("target", target, f"class indices 0..{classes - 1}" if classes else "class indices >= 0")
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise OptionError("batch_size", batch_size, "integers >= 1 (None: chosen from the memory budget)")
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    if not _is_int(budget) or budget <= 0:
        raise OptionError("memory_budget", memory_budget, "a positive number of bytes")
    values = fill_values(fill, channels, normalize)
    precision = check_precision(precision, device)
    tau, report, dd_request = _mode_and_tau(tau, target_ssim, drilldown, mode, lambda: tuning(precision))
    if method == "naive" and report is not None and report["mode"] == "approximate":
        # name the approximation that was asked for explicitly, else the method
        parameter, value = ("tau", tau) if 0.0 < tau < 1.0 and report.get("tau_source") == "given" else ("method", method)
        raise OptionError(parameter, value, "method=incremental with tau < 1, target_ssim, drilldown or "
                          "mode=approximate (they approximate the incremental method)", "conflicts with method='naive'")
    if origins is not None:
        if dd_request not in (None, False):
            raise OptionError("origins", "given", "no origins with drilldown (drill-down chooses its own positions)",
                              "conflicts with drilldown")
        origins = checked_origins(origins, height, width, patch_size)
    dd = resolve_drilldown(dd_request, height, width, patch_size, stride)
    return ExplainOptions(patch_size=int(patch_size), stride=int(stride), fill=values,
                          target=None if target is None else int(target),
                          batch_size=None if batch_size is None else int(batch_size), method=method,
                          memory_budget=int(budget), tau=tau, origins=origins, drilldown=dd,
                          approximation=_with_precision(report, precision, mode), precision=precision)
