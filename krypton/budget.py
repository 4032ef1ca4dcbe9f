"""The memory budget as a promise: a measured model of a run's peak memory, and the batch that fits.

A plan knows the bytes its live tensors take per position (`peak_bytes_per_position`), but the
process's real peak is larger: the materialized activations and their channels_last copies, oneDNN's
reorders and scratch, the allocator's slack. Measured here (resnet18, 224 px, P16 S4, peak RSS delta):
incremental 154 / 168 / 357 MB at batch 8 / 32 / 128 against 37 / 53 / 117 MB planned. So the engine
models a run's peak as

    peak(batch) = f(planned_bytes_per_position * batch)

with f measured per model and method by `calibrate()` (probe runs at three batch sizes, interpolated
between them and extrapolated past the largest; the server does it at model load), or, uncalibrated,
the conservative default f(x) = 2 x materialized bytes + 3 x (the worst ratio measured).
`fit_batch` picks the largest batch whose modelled peak, plus a safety margin, stays within the
budget; an explicit batch size above it is clamped, and the response says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import geometry as geo
from .errors import OptionError
from .memory import PeakMemory

MAX_AUTO_BATCH = 256
DEFAULT_FACTOR = 3.0
SAFETY = 1.15  # the modelled peak times this must fit the budget: repeated runs vary by ~10%
BATCHES_PER_PROBE = 2  # the heap grows over a run's first batches: one batch alone understates the peak
PROBE_CAP = {"incremental": 256, "naive": 8}
SMALL_PROBE = 16  # small batches peak higher per position than a line from 1 to the large probe says  # naive peaks grow linearly; its probe images are costly
SLOPE_MARGIN = 1.1  # the slope is extrapolated past the probe's batch (naive) and varies run to run


@dataclass(frozen=True)
class MemoryModel:
    """A run's peak from its planned bytes (per-position bytes x batch).

    Calibrated: measured (planned bytes, peak) points, interpolated between them and extrapolated past
    the last one with `factor` (peak bytes per planned byte). Uncalibrated (no points): 2 x the
    materialized bytes + `factor` x planned, conservative on every default model.
    """

    points: tuple[tuple[int, int], ...] = ()
    factor: float = DEFAULT_FACTOR
    source: str = "default"  # "default" or "calibrated"

    def peak(self, per_position: int, batch: int, materialized_bytes: int) -> int:
        planned = per_position * batch
        if not self.points:
            return int(2 * materialized_bytes + self.factor * planned)
        xs, ys = zip(*self.points)
        if planned >= xs[-1]:
            return int(ys[-1] + self.factor * (planned - xs[-1]))
        return int(np.interp(planned, xs, ys))


def fit_batch(model: MemoryModel, per_position: int, positions: int, budget: int, materialized_bytes: int,
              requested: int | None) -> int:
    """The batch size to run: the requested one or the largest automatic one, never over the budget."""
    def fits(batch):
        return SAFETY * model.peak(per_position, batch, materialized_bytes) <= budget

    if not fits(1):
        raise OptionError("memory_budget", budget, f"at least {int(SAFETY * model.peak(per_position, 1, materialized_bytes))} "
                          "bytes for this model, input and method (one position per batch)", "is too small")
    cap = min(positions, requested) if requested is not None else min(positions, MAX_AUTO_BATCH)
    lo, hi = 1, max(1, cap)  # the peak grows with the batch: the largest batch that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _central(origins: np.ndarray, height: int, width: int, patch_size: int, count: int) -> np.ndarray:
    """The `count` positions nearest the image centre: the largest windows, so the probe is an upper bound."""
    centre = np.array([(height - patch_size) / 2, (width - patch_size) / 2])
    order = np.argsort(np.abs(origins - centre).max(axis=1), kind="stable")
    return origins[np.sort(order[:count])]


def calibrate(explainer, input_shape, patch_size: int, stride: int, budget: int,
              methods=("incremental", "naive")) -> dict:
    """Measure `MemoryModel`s of `explainer` for an input shape and budget. Returns {method: MemoryModel}.

    Peaks do not grow linearly in the batch (resnet18: the per-position cost between batch 1 and 64 is
    half of that at 256), so the slope is measured near where the method will run: after one unmeasured
    run (a warm heap, as in a long-lived worker), a probe of one position gives `fixed` and one of
    BATCHES_PER_PROBE batches at the batch the uncalibrated model picks under `budget` (at most
    PROBE_CAP) gives the slope. Probes use the positions nearest the centre (the largest windows;
    explain() runs its largest windows first too).
    """
    _, c, h, w = input_shape
    origins = geo.grid_origins(h, w, patch_size, stride)
    image = torch.randn(c, h, w, generator=torch.Generator().manual_seed(0)).to(explainer.dtype)

    def probe(method, batch):
        positions = _central(origins, h, w, patch_size, min(len(origins), batch * BATCHES_PER_PROBE))
        plan = explainer.plan(tuple(input_shape), patch_size, stride, 1.0, positions)  # built outside the probe
        per_position = plan.peak_bytes_per_position if method == "incremental" else explainer._naive_bytes(plan)
        explainer.clear_cache()
        with PeakMemory(explainer.device) as pm:
            exp = explainer.explain(image, patch_size=patch_size, stride=stride, origins=positions,
                                    batch_size=batch, method=method)
        return per_position, exp.memory["materialized_bytes"], pm.peak_bytes or 0

    models = {}
    for method in methods:
        per_position, mats, _ = probe(method, 1)
        big = min(PROBE_CAP[method], fit_batch(MemoryModel(), per_position, len(origins), budget, mats, None))
        # A fresh heap understates a long-lived worker's peaks (resnet18: 327 MB on the first run, up
        # to 517 MB on the next ones): one unmeasured run first, then the measured probes.
        probe(method, big)
        points = {}
        for batch in sorted({1, min(SMALL_PROBE, big), big}):
            per_position_b, _, peak = probe(method, batch)
            points[per_position_b * batch] = peak
        xs = sorted(points)
        ys = np.maximum.accumulate([points[x] for x in xs])  # a larger run never peaks lower
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else DEFAULT_FACTOR
        models[method] = MemoryModel(tuple((int(x), int(y)) for x, y in zip(xs, ys)),
                                     float(max(1.0, SLOPE_MARGIN * slope)), "calibrated")
    explainer.clear_cache()
    return models
