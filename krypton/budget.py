"""The memory budget as a promise: a measured model of a run's peak memory, and the batch that fits.

A plan knows the bytes its live tensors take per position (`peak_bytes_per_position`), but the
process's real peak is larger: the materialized activations and their channels_last copies, oneDNN's
reorders and scratch, the allocator's slack. Measured here (resnet18, 224 px, P16 S4, peak RSS delta):
incremental 154 / 168 / 357 MB at batch 8 / 32 / 128 against 37 / 53 / 117 MB planned. So the engine
models a run's peak as

    peak(batch) = fixed + factor * planned_bytes_per_position * batch

with `fixed` and `factor` measured per model and method by `calibrate()` (a probe run of one position
gives `fixed`, a larger one the slope; the server does it at model load), or, uncalibrated, the conservative
default fixed = 2 x materialized bytes and factor = 3 (the worst ratio measured on the default models).
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
PROBE_CAP = {"incremental": 256, "naive": 8}  # naive peaks grow linearly; its probe images are costly
SLOPE_MARGIN = 1.1  # the slope is extrapolated past the probe's batch (naive) and varies run to run


@dataclass(frozen=True)
class MemoryModel:
    """peak = fixed + extra + factor * per_position * batch; `fixed` None means 2 x the materialized bytes.

    `extra_bytes`: what a run holds besides what `fixed` was measured with (a model-dtype run): for a low
    precision, its cast copy of the activations (counted twice, like `fixed` counts the model's own: the
    values and the stitch op's channels_last copies) and, on the run that builds it, the converted copy
    of the weights. `per_position` is in the dtype that runs, so it scales with its element size;
    `factor` (measured / planned bytes) is taken to hold in every dtype (bf16 runs measured 0.96-1.08x
    of their estimate on efficientnet_lite0 and vgg16)."""

    factor: float = DEFAULT_FACTOR
    fixed_bytes: int | None = None
    source: str = "default"  # "default" or "calibrated"

    def peak(self, per_position: int, batch: int, materialized_bytes: int, extra_bytes: int = 0) -> int:
        fixed = 2 * materialized_bytes if self.fixed_bytes is None else self.fixed_bytes
        return int(fixed + extra_bytes + self.factor * per_position * batch)


def fit_batch(model: MemoryModel, per_position: int, positions: int, budget: int, materialized_bytes: int,
              requested: int | None, extra_bytes: int = 0) -> int:
    """The batch size to run: the requested one or the largest automatic one, never over the budget."""
    fixed = model.peak(per_position, 0, materialized_bytes, extra_bytes)
    room = budget / SAFETY - fixed
    fits = int(room // max(1.0, model.factor * per_position)) if room > 0 else 0
    if fits < 1:
        least = int(SAFETY * model.peak(per_position, 1, materialized_bytes, extra_bytes))
        raise OptionError("memory_budget", budget, f"at least {least} bytes for this model, input, method and "
                          "precision (one position per batch)", "is too small")
    cap = positions if requested is not None else min(positions, MAX_AUTO_BATCH)
    return max(1, min(cap, fits, requested or fits))


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
        batch = min(PROBE_CAP[method], fit_batch(MemoryModel(), per_position, len(origins), budget, mats, None))
        if batch > 1:
            # A fresh heap understates a long-lived worker's peaks (resnet18: 327 MB on the first run, up
            # to 517 MB on the next ones): one unmeasured run first, then the two measured probes.
            probe(method, batch)
            _, _, fixed = probe(method, 1)
            per_position, mats, peak = probe(method, batch)
            slope = (peak - fixed) / ((batch - 1) * per_position)
            models[method] = MemoryModel(max(1.0, SLOPE_MARGIN * slope), int(fixed), "calibrated")
        else:  # the budget holds one position at a time: nothing to extrapolate
            _, _, fixed = probe(method, 1)
            models[method] = MemoryModel(DEFAULT_FACTOR, int(fixed), "calibrated")
    explainer.clear_cache()
    return models
