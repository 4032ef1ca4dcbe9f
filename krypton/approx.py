"""Approximate OBE (SIGMOD'19 §4): mode resolution, tau from a target SSIM, and adaptive drill-down.

Projective-field thresholding itself lives in geometry.py / plan.py (`tau`) and the choice of tau in
options.py; this module holds the pure pieces of the two-stage drill-down, which Explainer runs: the
stage arithmetic (eq. 28-30), the stage-1 -> stage-2 mapping, the selection and the merge.

Drill-down, precisely
---------------------
- Stage 1: the full grid at the coarse stride S1 (patch corners (a*S1, b*S1)), same patch, fill, tau.
- Mapping a stage-2 cell to stage 1: cell (i, j) of the requested grid has its patch corner at
  (i*S2, j*S2). Its *coarse value* is the stage-1 map bilinearly interpolated at that corner, in units
  of S1 (u = i*S2 / S1, v = j*S2 / S1), clamped to the stage-1 grid at the borders. A cell whose corner
  coincides with a stage-1 corner gets that stage-1 value exactly.
- Selection: stage-2 cells whose corner IS a stage-1 corner already hold their exact value (when S1 is a
  multiple of S2, a 1 / (S1/S2)^2 share of the grid); they are never re-run. Of the other cells, the
  k = ceil(r * N2) with the largest drops (clean probability - coarse value, i.e. the lowest coarse values)
  are refined (fewer when fewer remain); ties go to the lower row-major index (a stable sort). The paper
  ranks every cell, corners included, which spends up to a quarter of the refinement budget (S1 = 2 S2) on
  values it already has: on EfficientNet-Lite0 (real weights, P 16, S2 4, S1 8, r 0.1) skipping them
  raises the top-r recall from 0.80-0.92 to 0.88-0.98 at the same cost (bench/results/quality.md).
- Stage 2 runs only those k positions at stride S2 (explicit origins, in row-major order) against the
  materialized activations of stage 1 (the Explainer's activation cache: "hit").
- Merge: the heatmap on the stage-2 grid holds the stage-2 value at refined cells and the coarse value
  everywhere else. With r = 1 every cell is refined and the map equals the full map at S2 bit for bit.
- S1: given (`s1`), or from r and a target speedup by eq. 29, S1 = sqrt(t / (1 - r t)) * S2, rounded UP
  to a multiple of S2 (stage-1 corners are then stage-2 corners, and eq. 28 gives at least t), and then
  capped at the largest multiple of S2 that is <= P (so that the stage-1 patches, P wide every S1 pixels,
  still occlude every pixel: no blind strips) and at the largest multiple of S2 <= min(H, W). The target
  must satisfy eq. 30 (t < min(W^2 / (S2^2 + r W^2), 1/r), W = min(H, W), the largest stride) and
  t >= 1 / (1 + r) (S1 >= S2). The estimated speedup reported is eq. 28 with the integer S1,
  S1^2 / (S2^2 + r S1^2) (lower than the target where the cap applied); the ratio of positions actually run,
  N2 / (N1 + k), is reported next to it.
- A given S1 > P leaves strips that stage 1 never occludes, so a region there cannot show a drop in stage 1
  and may go unrefined (reported as stage1_covers_image = false); eq. 29's S1 never does (the cap above).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import geometry as geo
from .errors import OptionError

DEFAULT_R = 0.25
DEFAULT_TARGET_SPEEDUP = 3.0
DRILLDOWN_KEYS = ("r", "target_speedup", "s1")


# ---- eq. 28-30 ----------------------------------------------------------------------------------------
def drilldown_speedup(s1: float, s2: float, r: float) -> float:
    """Eq. 28: speedup of drill-down over the full grid at S2 (both at the same tau)."""
    return s1 * s1 / (s2 * s2 + r * s1 * s1)


def max_drilldown_speedup(width: int, s2: int, r: float) -> float:
    """Eq. 30: the speedup must stay below min(W^2 / (S2^2 + r W^2), 1 / r)."""
    return min(width * width / (s2 * s2 + r * width * width), 1.0 / r)


def s1_for_speedup(r: float, target: float, s2: int) -> float:
    """Eq. 29: S1 = sqrt(target / (1 - r * target)) * S2 (real-valued)."""
    return math.sqrt(target / (1.0 - r * target)) * s2


def paper_s1(r: float, target: float, s2: int) -> int:
    """Eq. 29's S1 rounded UP to a multiple of S2 (the paper's stage-1 stride, before resolve_drilldown's caps)."""
    return s2 * math.ceil(s1_for_speedup(r, target, s2) / s2 - 1e-9)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise OptionError(f"drilldown.{name}", value, "a finite number", "must be a finite number")
    return float(value)


@dataclass(frozen=True)
class DrillDown:
    r: float
    s1: int
    s2: int
    target_speedup: float | None
    s1_source: str  # "eq29" or "given"

    @property
    def estimated_speedup(self) -> float:
        return drilldown_speedup(self.s1, self.s2, self.r)

    def to_dict(self) -> dict:
        return {"r": self.r, "s1": self.s1, "s2": self.s2, "target_speedup": self.target_speedup,
                "s1_source": self.s1_source, "estimated_speedup": self.estimated_speedup}


def resolve_drilldown(spec, height: int, width: int, patch_size: int, stride: int) -> DrillDown | None:
    """Validate a drill-down request (None/False: off; True or {}: defaults; dict with r, target_speedup
    or s1) against the image and the requested stride S2. Raises OptionError naming the parameter."""
    if spec is None or spec is False:
        return None
    if spec is True:
        spec = {}
    if isinstance(spec, DrillDown):
        spec = {"r": spec.r, "s1": spec.s1}
    if not isinstance(spec, dict):
        raise OptionError("drilldown", spec, f"true, false or a dict with keys {', '.join(DRILLDOWN_KEYS)}",
                          "must be a dict or a boolean")
    unknown = sorted(set(spec) - set(DRILLDOWN_KEYS))
    if unknown:
        raise OptionError("drilldown", spec, f"keys {', '.join(DRILLDOWN_KEYS)}", f"has unknown key(s) {unknown}")
    geo.grid_shape(height, width, patch_size, stride)
    s2 = stride
    r = _number("r", spec.get("r", DEFAULT_R))
    if not 0.0 < r <= 1.0:
        raise OptionError("drilldown.r", r, "(0, 1]")
    limit = min(height, width)  # the largest stride grid_shape accepts: W of eq. 30
    if spec.get("s1") is not None:
        if spec.get("target_speedup") is not None:
            raise OptionError("drilldown.s1", spec["s1"], "either target_speedup or s1, not both",
                              "conflicts with target_speedup")
        s1 = spec["s1"]
        if isinstance(s1, bool) or not isinstance(s1, (int, np.integer)) or not s2 <= s1 <= limit:
            raise OptionError("drilldown.s1", s1, f"integers {s2}..{limit} (the stage-2 stride {s2} up to "
                              f"the image side {limit})")
        return DrillDown(r, int(s1), s2, None, "given")
    target = _number("target_speedup", spec.get("target_speedup", DEFAULT_TARGET_SPEEDUP))
    lo, hi = 1.0 / (1.0 + r), max_drilldown_speedup(limit, s2, r)
    if not lo <= target < hi:
        raise OptionError("drilldown.target_speedup", target, shown=f"{target:g}", allowed=
                          f"[{lo:.4g}, {hi:.4g}) for r={r:g}, stride={s2} and a {height}x{width} image (eq. 30: "
                          f"below min(W^2/(S2^2 + r W^2), 1/r), W={limit}; at least 1/(1+r), where S1 = S2)")
    # Round S1 up to a multiple of S2: every stage-1 corner is then a stage-2 corner (its value is exact in
    # the merged map) and eq. 28 gives at least the target; never past the largest stride.
    s1 = paper_s1(r, target, s2)
    s1 = max(s2, min(s1, (min(patch_size, limit) // s2) * s2))  # no blind strips, never past the image
    return DrillDown(r, int(s1), s2, target, "eq29")


# ---- stage-1 -> stage-2 mapping --------------------------------------------------------------------------
def _axis_weights(n2: int, s2: int, n1: int, s1: int):
    pos = np.clip(np.arange(n2, dtype=np.float64) * s2 / s1, 0.0, n1 - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n1 - 1)
    return lo, hi, pos - lo


def coarse_to_fine(coarse: np.ndarray, s1: int, fine_shape: tuple[int, int], s2: int) -> np.ndarray:
    """Bilinear interpolation of the stage-1 map (corners a*S1) at the stage-2 corners (i*S2), clamped."""
    coarse = np.asarray(coarse, dtype=np.float64)
    y0, y1, wy = _axis_weights(fine_shape[0], s2, coarse.shape[0], s1)
    x0, x1, wx = _axis_weights(fine_shape[1], s2, coarse.shape[1], s1)
    wy, wx = wy[:, None], wx[None, :]
    return ((1 - wy) * (1 - wx) * coarse[np.ix_(y0, x0)] + (1 - wy) * wx * coarse[np.ix_(y0, x1)]
            + wy * (1 - wx) * coarse[np.ix_(y1, x0)] + wy * wx * coarse[np.ix_(y1, x1)])


def stage1_cells(fine_shape: tuple[int, int], s1: int, s2: int, coarse_shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the stage-2 cells whose patch corner is a stage-1 corner (their value is exact)."""
    def axis(n2, n1):
        corner = np.arange(n2) * s2
        return (corner % s1 == 0) & (corner // s1 < n1)
    return axis(fine_shape[0], coarse_shape[0])[:, None] & axis(fine_shape[1], coarse_shape[1])[None, :]


def select_refined(coarse_fine: np.ndarray, probability: float, r: float, known=None) -> np.ndarray:
    """Boolean mask of the ceil(r * N) cells outside `known` with the largest drops (all of them when fewer
    remain; ties: lower row-major index first). `known`: cells whose value is already exact (stage1_cells)."""
    drop = (probability - np.asarray(coarse_fine, dtype=np.float64)).ravel()
    candidates = np.ones(drop.size, dtype=bool) if known is None else ~np.asarray(known, dtype=bool).ravel()
    k = min(int(candidates.sum()), max(1, math.ceil(r * drop.size - 1e-9)))
    order = np.argsort(np.where(candidates, -drop, np.inf), kind="stable")
    mask = np.zeros(drop.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(np.shape(coarse_fine))


def simulate(full: np.ndarray, probability: float, s1: int, s2: int, r: float, paper_rule: bool = False):
    """(merged map, refined mask, exact mask) that drill-down would return, computed from the full map at S2
    of the same tau and precision: with S1 a multiple of S2 its stage-1 map is `full[::S1/S2, ::S1/S2]` and
    its stage-2 values are `full` at the refined cells. Tuning and the quality benchmark score many
    drill-down settings this way from one full map per (precision, tau); tests check it against the engine.
    `paper_rule`: rank corner cells too (the paper's selection), for comparison."""
    if s1 % s2:
        raise ValueError(f"simulate needs S1 a multiple of S2, got S1={s1}, S2={s2}")
    full = np.asarray(full, dtype=np.float64)
    coarse = full[::s1 // s2, ::s1 // s2]
    fine = coarse_to_fine(coarse, s1, full.shape, s2)
    corners = stage1_cells(full.shape, s1, s2, coarse.shape)
    mask = select_refined(fine, probability, r, None if paper_rule else corners)
    fine[mask] = full[mask]
    return fine, mask, mask | corners


def top_r_recall(exact: np.ndarray, probability: float, r: float, exact_cells: np.ndarray) -> float:
    """Share of the exact map's ceil(r * N) largest drops whose value drill-down computed exactly."""
    top = select_refined(exact, probability, r)
    return float((top & np.asarray(exact_cells, dtype=bool)).sum() / top.sum())


def refined_mask(explanation, with_stage1: bool = False) -> torch.Tensor:
    """The refined cells of a drill-down Explanation as a bool tensor on its heatmap grid; `with_stage1`
    adds the cells whose exact value came from stage 1 (every cell whose value is exact)."""
    dd = explanation.extra.get("drilldown")
    if dd is None:
        raise OptionError("explanation", "without drill-down", "an Explanation computed with drilldown",
                          "has no refined cells")
    mask = torch.zeros(explanation.heatmap.shape, dtype=torch.bool)
    cells = torch.as_tensor(dd["refined"], dtype=torch.int64).reshape(-1, 2)
    mask[cells[:, 0], cells[:, 1]] = True
    if with_stage1:
        stage1 = np.shape(dd["stage1_heatmap"])
        mask |= torch.from_numpy(stage1_cells(tuple(mask.shape), dd["s1"], dd["s2"], stage1))
    return mask


def merge(coarse_fine: np.ndarray, mask: np.ndarray, refined: torch.Tensor) -> torch.Tensor:
    """The drill-down map: stage-2 values (row-major) at the refined cells, the coarse values elsewhere."""
    merged = torch.from_numpy(np.array(coarse_fine, dtype=np.float64)).to(refined.dtype)
    merged[torch.from_numpy(mask)] = refined.reshape(-1)
    return merged
