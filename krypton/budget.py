"""The memory budget as a promise: a measured model of a run's peak memory, and the batch that fits.

A plan knows the bytes its live tensors take per position (`peak_bytes_per_position`; times the batch:
the run's planned bytes), but the process's peak is larger and not proportional to it: the materialized
activations and their channels_last copies, every position group's runner (its weights in channels_last),
oneDNN's reorders and scratch, and the arena's free blocks between the tensors it holds. Measured with
glibc's heap, before the arena (resnet18, 224 px, P16 S8, one thread, peak RSS delta of whole-grid
requests): 189-203 / 201-211 / 254-260 / 410-435 MB at batch 1 / 16 / 64 / 256 against 0.7 / 11 / 43 / 170 MB
planned: a large part every run holds and a slope that changes with the batch (a line through a probe of
one position, one plan, and one at batch 256 estimated batch 16 at 0.6-0.7x its peak).

So `calibrate()` measures peaks at a few batch sizes through the request's own code path (every position
group of the grid with its own plan, a few positions of each, in explain()'s order; see `probe_batches`),
and `MemoryModel` interpolates between them in planned bytes, which carries over to the other strides, tau
and precisions a request may ask for (their plans plan other bytes per position). Uncalibrated, it is the
conservative line 2 x materialized bytes + 3 x planned. `fit_batch` picks the largest batch whose modelled
peak, times SAFETY, fits the budget; an explicit batch size above it is clamped, and the response says so.

The heap's history used to move peaks by up to 1.7x between identical requests (glibc placed a run's
tensors over whatever earlier work left free in its heap); an explanation's clean pass and batches now
allocate every tensor of 64 KB or more in krypton's arena (memory.batch_arena), where a run's peak depends
on its own allocations only, so the probes measure what requests will peak at (bench/results/memory-cpu.md
at e3c75a2: every estimate 0.70-1.37x its measured peak, every default model, method and batch choice).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from . import geometry as geo
from .errors import OptionError
from .memory import PeakMemory, batch_arena

MAX_AUTO_BATCH = 256
DEFAULT_FACTOR = 3.0
# The modelled peak times this must fit the budget. Sized on glibc's heap, before the arena, where identical
# requests in one worker peaked up to ~40% apart (efficientnet_lite0's first naive request at batch 23
# peaked at 1.54x its estimate, 1120 MB, over a 1 GiB budget at SAFETY 1.35); kept at 1.5 with the arena,
# whose estimates measure 0.70-1.37x of peaks (bench/results/memory-cpu.md at e3c75a2): a batch chosen by this
# factor keeps its peak within the budget as long as the estimate is at least 1/1.5 = 0.67x of the peak.
SAFETY = 1.5
# The measured points are raised by this, so that the estimate bounds a run's usual peak. With glibc's heap
# it was 1.15 (the heap's history moved identical requests' peaks up to 1.7x apart); in the arena a run's
# peak repeats and the probes' batches are a request's, so it only covers what still varies outside the
# arena (resnet18 at 1.15: every estimate 1.09-1.67x its peak, i.e. over, except drill-down at 0.88x).
PEAK_MARGIN = 1.05
PROBE_DIVISORS = (16, 4)  # probe batches: 1, largest // 16, largest // 4 and the largest that fits the budget
# A run's peak grows over its first batches (efficientnet_lite0 naive at batch 60: 800 MB after one, 860-920
# after two to four): each probe runs this many batches of every position group.
BATCHES_PER_PROBE = 2


@dataclass(frozen=True)
class MemoryModel:
    """A run's peak from its planned bytes (bytes per position x batch), plus `extra_bytes`.

    Calibrated: measured (planned bytes, peak bytes) `points` of runs whose clean activations were already
    held (a cache hit), in increasing order. Below the first the peak is the first's (what every run holds
    whatever its batch), past the last it grows by `factor` peak bytes per planned byte; in between, the
    chord of the two points around it, or where the measured curve bends down (it does: the per-position
    cost falls as batches grow) the previous segment continued, at most the next point: an upper bound
    whichever way the curve bends between two points. A run that makes its clean pass first (a cache
    miss, `clean_pass`) peaks at the larger of that pass's measured peak (`clean_bytes`) and the
    activations it keeps plus the run's: in krypton's arena the batches reuse what the pass freed.
    Uncalibrated (no points): 2 x the materialized bytes + `factor` x planned, which over-estimates every
    default model.

    `extra_bytes`: what a run holds besides what the points were measured with (model-dtype runs): for a low
    precision, its cast copy of the activations (counted twice, like the model's own: the values and the
    stitch op's channels_last copies) and, on the run that builds it, the converted copy of the weights.
    The planned bytes are in the dtype that runs, so a bf16 run reads the curve at half its float32 bytes.
    """

    points: tuple[tuple[int, int], ...] = ()
    factor: float = DEFAULT_FACTOR
    source: str = "default"  # "default" or "calibrated"
    clean_bytes: int = 0

    def peak(self, per_position: int, batch: int, materialized_bytes: int, extra_bytes: int = 0,
             clean_pass: bool = True) -> int:
        planned = per_position * batch
        if not self.points:
            return int(2 * materialized_bytes + extra_bytes + self.factor * planned)
        run = self._run_peak(planned)
        if clean_pass:
            run = max(self.clean_bytes, materialized_bytes + run)
        return int(run + extra_bytes)

    def _run_peak(self, planned: int) -> float:
        xs, ys = zip(*self.points)
        if planned >= xs[-1]:
            return ys[-1] + self.factor * (planned - xs[-1])
        i = bisect.bisect_right(xs, planned)  # xs[i - 1] <= planned < xs[i]
        if i == 0:
            return ys[0]

        def line(a: int, b: int) -> float:  # through points a and b, at `planned`
            return ys[a] + (ys[b] - ys[a]) * (planned - xs[a]) / (xs[b] - xs[a])

        bent = min(ys[i], line(i - 2, i - 1)) if i >= 2 else 0
        return max(line(i - 1, i), bent)

    @classmethod
    def measured(cls, samples, clean_bytes: int = 0) -> "MemoryModel":
        """The model through measured (planned bytes, peak bytes) samples (repeats allowed: the largest peak
        counts), raised by PEAK_MARGIN and made non-decreasing (more planned bytes never peak lower). Past
        the last point it grows by the steeper of the last segment and the chord from the first point, and
        at least 1 byte per planned byte. `clean_bytes`: the measured peak of the clean pass (raised too)."""
        best: dict[int, int] = {}
        for planned, peak in samples:
            best[int(planned)] = max(best.get(int(planned), 0), int(peak))
        xs = sorted(best)
        ys = np.maximum.accumulate([PEAK_MARGIN * best[x] for x in xs])
        slopes = [1.0]
        if len(xs) > 1:
            slopes += [(ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), (ys[-1] - ys[0]) / (xs[-1] - xs[0])]
        return cls(tuple((x, int(y)) for x, y in zip(xs, ys)), float(max(slopes)), "calibrated",
                   int(PEAK_MARGIN * clean_bytes))


def fit_batch(model: MemoryModel, per_position: int, positions: int, budget: int, materialized_bytes: int,
              requested: int | None, extra_bytes: int = 0, clean_pass: bool = True) -> int:
    """The batch size to run: the requested one or the largest automatic one, never over the budget."""
    def peak(batch: int) -> int:
        return model.peak(per_position, batch, materialized_bytes, extra_bytes, clean_pass)

    def fits(batch: int) -> bool:
        return SAFETY * peak(batch) <= budget

    if not fits(1):
        least = int(SAFETY * peak(1))
        raise OptionError("memory_budget", budget, f"at least {least} bytes for this model, input, method and "
                          "precision (one position per batch)", "is too small")
    cap = max(1, min(positions, requested if requested is not None else MAX_AUTO_BATCH))
    lo, hi = 1, cap  # the modelled peak grows with the batch: the largest batch that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def probe_batches(largest: int) -> list[int]:
    """The batch sizes calibrate() measures below `largest` (the largest it measures)."""
    return sorted({1, *(max(1, largest // d) for d in PROBE_DIVISORS)} - {largest})


def calibrate(explainer, input_shape, patch_size: int, stride: int, budget: int,
              methods=("incremental", "naive")) -> dict:
    """Measure `MemoryModel`s of `explainer` for an input shape and budget. Returns {method: MemoryModel}.

    Per method: the peak of its clean pass (`Explainer._probe_clean`, in the arena like a request's), then
    BATCHES_PER_PROBE batches of each position group at each of `probe_batches` below the largest batch the
    uncalibrated model lets the budget hold, then as many at the largest batch the model measured so far
    lets the budget hold, so that the batch a request gets is interpolated, not extrapolated. (A probe of
    one batch per group is no sample: a request runs a group in even batches, e.g. 361 positions at batch
    256 as 181 + 180, and resnet18's one batch of 256 peaked at 249 MB against 176-181 MB for the request.)
    Each probe is `Explainer._probe`: a request's code path for a few positions of each group, against
    clean activations made before it is measured (a cache hit; a miss adds the clean pass, MemoryModel).
    Measured as misses, the naive batch-1 probes held the clean pass's peak (in channels_last: resnet18
    19 MB, a batch-1 naive run 10 MB) and over-estimated the hits of a repeated image 1.5-2.5x.
    """
    _, c, h, w = input_shape
    positions = len(geo.grid_origins(h, w, patch_size, stride))
    image = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(0)).to(explainer.dtype)

    def clean_peak(method: str) -> int:
        explainer.clear_cache()
        with PeakMemory(explainer.device) as pm, batch_arena():
            explainer._probe_clean(image, method, patch_size, stride)
        return pm.peak_bytes or 0

    def probe(method: str, batch: int, batches: int = BATCHES_PER_PROBE) -> tuple[int, int, int, int]:
        """(bytes per position, planned bytes, measured peak bytes, materialized bytes) of one probe."""
        explainer.clear_cache()
        held = explainer._probe_clean(image, method, patch_size, stride)
        with PeakMemory(explainer.device) as pm:
            exp = explainer._probe(image, method, batch, patch_size, stride, batches * batch, held)
        mem = exp.memory
        planned = mem["peak_working_bytes"]
        return planned // mem["largest_batch_run"], planned, pm.peak_bytes or 0, mem["materialized_bytes"]

    def largest_fitting(model: MemoryModel, per_position: int, mats: int) -> int:
        try:
            return fit_batch(model, per_position, positions, budget, mats, None)
        except OptionError:  # not even one position: calibrate at one, the request will say so
            return 1

    models = {}
    for method in methods:
        # right before its samples: after another method's probes a run pays its one-time costs again
        # (resnet18 naive at batch 1: 48, then 20 MB; its batch-1 sample after the incremental probes ~40 MB)
        per_position, _, _, mats = probe(method, 1, 1)  # its peak includes one-time costs: not a sample
        clean = clean_peak(method)
        largest = largest_fitting(MemoryModel(), per_position, mats)
        samples = [probe(method, batch)[1:3] for batch in probe_batches(largest)]
        samples.append(probe(method, largest_fitting(MemoryModel.measured(samples, clean), per_position, mats))[1:3])
        models[method] = MemoryModel.measured(samples, clean)
    explainer.clear_cache()
    return models
