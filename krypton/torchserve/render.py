"""Heatmap rendering for format=png: colormap jet_r, clipped as in the Krypton paper, over the photo.

No matplotlib: jet is matplotlib's piecewise-linear ``_jet_data`` evaluated with numpy.interp,
and jet_r(x) = jet(1 - x). Clipping: the heatmap holds the probability of the explained label
with the patch at each position; values are mapped to [0, 1] over [0.75 p, min(1, 1.25 p)] where
p is the probability on the clean image, so a strong drop (important region) is red and
"no change" is blue.
"""

from __future__ import annotations

import io
from typing import Tuple

import numpy as np
from PIL import Image

# matplotlib/_cm.py _jet_data: (x, y0, y1) breakpoints per channel
_JET = {
    "red": ((0.0, 0.0, 0.0), (0.35, 0.0, 0.0), (0.66, 1.0, 1.0), (0.89, 1.0, 1.0), (1.0, 0.5, 0.5)),
    "green": ((0.0, 0.0, 0.0), (0.125, 0.0, 0.0), (0.375, 1.0, 1.0), (0.64, 1.0, 1.0),
              (0.91, 0.0, 0.0), (1.0, 0.0, 0.0)),
    "blue": ((0.0, 0.5, 0.5), (0.11, 1.0, 1.0), (0.34, 1.0, 1.0), (0.65, 0.0, 0.0), (1.0, 0.0, 0.0)),
}


def jet(x: np.ndarray) -> np.ndarray:
    """matplotlib 'jet' on values in [0, 1] -> (..., 3) floats in [0, 1]."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    chans = []
    for c in ("red", "green", "blue"):
        xs = [p[0] for p in _JET[c]]
        ys = [p[1] for p in _JET[c]]
        chans.append(np.interp(x, xs, ys))
    return np.stack(chans, axis=-1)


def jet_r(x: np.ndarray) -> np.ndarray:
    return jet(1.0 - np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0))


def clip_range(probability: float) -> Tuple[float, float]:
    """The paper's display range [0.75 p, min(1, 1.25 p)]."""
    p = float(probability)
    lo, hi = 0.75 * p, min(1.0, 1.25 * p)
    if hi <= lo:  # p == 0 (or p > 1 by rounding): avoid dividing by zero
        hi = lo + 1e-12
    return lo, hi


def scaled(heatmap: np.ndarray, probability: float) -> np.ndarray:
    lo, hi = clip_range(probability)
    return np.clip((np.asarray(heatmap, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def cell_index(size: int, cells: int, patch: int, stride: int) -> np.ndarray:
    """For each pixel along one axis, the heatmap cell whose patch centre is nearest.

    Cell i covers the patch with top-left i*stride, centre i*stride + patch/2.
    """
    pos = np.arange(size, dtype=np.float64) + 0.5
    idx = np.floor((pos - patch / 2.0) / stride + 0.5).astype(np.int64)
    return np.clip(idx, 0, cells - 1)


def overlay(view: np.ndarray, heatmap: np.ndarray, probability: float, patch: int, stride: int,
            alpha: float = 0.5) -> np.ndarray:
    """Blend jet_r(heatmap) over the photo (H, W, 3) uint8 the model saw; returns (H, W, 3) uint8."""
    hm = np.asarray(heatmap, dtype=np.float64)
    H, W = view.shape[:2]
    rows = cell_index(H, hm.shape[0], patch, stride)
    cols = cell_index(W, hm.shape[1], patch, stride)
    colours = jet_r(scaled(hm, probability))[rows][:, cols]  # (H, W, 3)
    out = (1.0 - alpha) * view.astype(np.float64) / 255.0 + alpha * colours
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def overlay_png(view: np.ndarray, heatmap: np.ndarray, probability: float, patch: int,
                stride: int, alpha: float = 0.5) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(overlay(view, heatmap, probability, patch, stride, alpha), "RGB").save(
        buf, format="PNG", optimize=False)
    return buf.getvalue()
