"""Group positions by how far they are from the image border, so each group gets tighter windows.

A plan runs every position of a batch with ONE window size per node: the largest any member needs.
Positions near a border need smaller windows (their projective field is clipped), so running the
whole grid with the centre's window size does ~35% more convolution work than the true changed
regions need (VGG16, patch 16, stride 4). Splitting rows and columns into classes by their distance
to the nearest border, and running each (row class, column class) pair as its own plan, recovers most
of that while keeping batches large. Classes are by distance, not by side, so the top and bottom
border rows share one class (their window sizes mirror each other).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

# Candidate class boundaries, in pixels of distance from the border; the planner keeps the cheapest.
CANDIDATE_BOUNDARIES_PX = ([], [32], [24, 48], [16, 32, 64], [20, 36, 60], [24, 48, 96], [12, 28, 48, 80])
# Smaller groups lose more to per-batch overhead than tighter windows win. 16 (it was 48) lets a stride-16
# grid (14 x 14) split off its 4 x 4 corner cells. One-process A/B, warm, 2 threads, random inputs, identical
# heatmaps: VGG16 5.23 -> 4.59 s (executed speedup 7.38 -> 8.67), ResNet18 1.65 -> 1.44 s, EfficientNet-Lite0
# 0.91 -> 0.86 s; Inception3 at 299 px (executed 1.80 -> 1.86) 12.3 / 13.5 s, within its run-to-run spread
# of 11-14 s. The cost: a cold first request builds more plans and window shapes (EfficientNet-Lite0 S16 cold /
# warm 1.40x on the Intel run at 4f4a7f7, was 1.06x; 1.70x on the EPYC at 2f0b580, 1.50x at e3c75a2). At stride 8
# VGG16's grid splits into 9 groups (was 4; executed 7.87 -> 8.36; the memory benchmark's request 37.7 ->
# 30.3 s, estimates 1.00-1.06x of the peaks).
MIN_GROUP = 16
GROUP_OVERHEAD = 0.01  # fixed cost of one more group (extra batches, plan), as a fraction of all work


def distance_classes(cells: int, stride: int, boundaries_px: list[int]) -> np.ndarray:
    """Class of each grid row (or column): how many boundaries its distance to the border passes."""
    index = np.arange(cells)
    distance_px = np.minimum(index, cells - 1 - index) * stride
    return np.searchsorted(np.asarray(boundaries_px, dtype=np.int64), distance_px, side="right")


def groups_for(grid: tuple[int, int], stride: int, boundaries_px: list[int]) -> list[np.ndarray]:
    """Flat (row-major) position indices of each (row class, column class) group."""
    rows = distance_classes(grid[0], stride, boundaries_px)
    cols = distance_classes(grid[1], stride, boundaries_px)
    flat = (rows[:, None] * (cols.max() + 1) + cols[None, :]).ravel()
    return [np.flatnonzero(flat == g) for g in np.unique(flat)]


def choose_groups(grid: tuple[int, int], stride: int, cost: Callable[[np.ndarray], float]) -> list[np.ndarray]:
    """The candidate grouping with the least total cost; `cost(indices)` is a group's work."""
    everything = np.arange(grid[0] * grid[1])
    overhead = GROUP_OVERHEAD * cost(everything)
    best, best_cost = [everything], cost(everything) + overhead
    seen = set()
    for boundaries in CANDIDATE_BOUNDARIES_PX[1:]:
        groups = groups_for(grid, stride, boundaries)
        key = tuple(tuple(g[:3]) + (len(g),) for g in groups)
        if len(groups) < 2 or key in seen or min(len(g) for g in groups) < MIN_GROUP:
            continue
        seen.add(key)
        total = sum(cost(g) for g in groups) + overhead * len(groups)
        if total < best_cost:
            best, best_cost = groups, total
    return best
