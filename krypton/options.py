"""Every option of an explanation, validated and resolved in one place (`resolve`).

The Python API, the TorchServe handler and the benchmarks all pass their options through here, so one
set of rules decides what is allowed: ranges, combinations (naive re-inference has no approximations;
mode="exact" forbids them), named fills, the configuration (precision, tau, drill-down) a target SSIM
stands for and the drill-down stages.
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
    """Resolved options of one run. `approximation` is the report of how precision / tau / drill-down
    were chosen (None for a plain exact run); `drilldown` the resolved stages (None: off); `precision`
    the dtype of the occluded runs (the clean run, its label and probability are always float32)."""

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


def _approximation(tau, target_ssim, drilldown, precision, mode, stride: int, patch_size: int,
                   tuning: Callable) -> tuple[float, str, object, dict | None]:
    """(tau, precision, drill-down request, approximation report or None) from the request.

    - mode="exact": nothing approximate; an explicit tau < 1, target_ssim, drilldown or precision other
      than float32 is an error naming it.
    - target_ssim, or mode="approximate" with no explicit tau / drilldown / precision: the whole
      configuration comes from the model's tuning (krypton/tuning.py; target 0.9 for the mode), and the
      report carries its expected SSIM and speedup. drilldown=False limits the choice to configurations
      without drill-down; target_ssim with an explicit tau, drilldown or precision is an error.
    - otherwise the explicit knobs are used as given (the report says so: no quality is promised).
    """
    if mode is not None and mode not in MODES:
        raise OptionError("mode", mode, " | ".join(MODES), "is not allowed")
    if not _is_number(tau) or not 0.0 < tau <= 1.0:
        raise OptionError("tau", tau, "(0, 1] (1 = exact)")
    tau = float(tau)
    if target_ssim is not None:
        target_ssim = check_target_ssim(target_ssim)
    asked = drilldown not in (None, False)
    given = [(name, value) for name, value, on in (("tau", tau, tau < 1.0), ("drilldown", drilldown, asked),
                                                   ("precision", precision, precision != "float32")) if on]
    if mode == "exact":
        for name, value in given + ([("target_ssim", target_ssim)] if target_ssim is not None else []):
            raise OptionError(name, value, "nothing but the defaults with mode=exact (float32, tau 1, no "
                              "drill-down)", "contradicts mode='exact'")
        return 1.0, "float32", None, {"mode": "exact", "tau": 1.0, "tau_source": "exact", "precision": "float32"}
    if target_ssim is not None and given:
        name, value = given[0]
        raise OptionError("target_ssim", target_ssim, f"either target_ssim or an explicit {name}, not both (the "
                          "target chooses the whole configuration)", f"conflicts with {name}={value!r}")
    if target_ssim is not None or (mode == "approximate" and not given):
        report = {"mode": "approximate", **tuning().describe(
            DEFAULT_TARGET_SSIM if target_ssim is None else target_ssim, stride, patch_size, drilldown is not False)}
        config = report["configuration"]
        dd = config["drilldown"]
        request = None if dd is None else {"s1": dd["s1_factor"] * stride, "r": dd["r"]}
        report["precision"] = config["precision"]
        return config["tau"], config["precision"], request, report
    if not given:
        return 1.0, "float32", None, None  # a plain exact run (mode=None, or drilldown=False alone)
    report = {"mode": "approximate", "tau": tau, "tau_source": "given" if tau < 1.0 else "exact",
              "precision": precision, "configuration_source": "given", "expected_ssim": None}
    return tau, precision, drilldown, report


def check_precision(precision, device) -> str:
    """The precision of the occluded positions; fp16 only where it runs fast (CUDA)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise OptionError("precision", precision, " | ".join(PRECISIONS), "is not allowed")
    if precision in CUDA_ONLY_PRECISIONS and torch.device(device).type != "cuda":
        raise OptionError("precision", precision, "float32 | bf16 for a model on the CPU (fp16 is CUDA-only: on "
                          "the CPU it measured 5.8x slower than float32, bf16 2x faster)", "is CUDA-only")
    return precision


def resolve(image_shape, classes: int | None, tuning: Callable, *, patch_size=16, stride=4, fill=0.0,
            normalize=None, target=None, batch_size=None, method="incremental", memory_budget=None, tau=1.0,
            origins=None, target_ssim=None, drilldown=None, mode=None, precision="float32",
            device="cpu") -> ExplainOptions:
    """Validate and resolve the options of Explainer.explain for an image of `image_shape` (1, C, H, W).

    `classes` is the model's number of outputs (for `target`), `tuning()` gives the model's Tuning (only
    called when a target SSIM has to be turned into a configuration), `device` is the model's.
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
    tau, precision, dd_request, report = _approximation(tau, target_ssim, drilldown, precision, mode, stride,
                                                        patch_size, tuning)
    if method == "naive" and report is not None and (tau < 1.0 or dd_request not in (None, False)
                                                     or target_ssim is not None or mode == "approximate"):
        # name the approximation that was asked for explicitly, else the method (precision is allowed:
        # naive re-inference in bf16 is the baseline of a bf16 incremental run)
        parameter, value = ("tau", tau) if report.get("tau_source") == "given" else ("method", method)
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
                          memory_budget=int(budget), tau=tau, origins=origins, drilldown=dd, approximation=report,
                          precision=precision)
