"""Patch and window arithmetic of incremental inference (SIGMOD'19 eq. 13-16, 20, 22-27, 31).

Pure functions on integer numpy arrays, one entry per occlusion position, applied to one spatial
dimension at a time (height and width are independent). No tensors, no model: everything here is
unit-testable on its own.

Conventions: a *rect* is the region of a feature map whose values differ from the clean image's for a
position; it is described by per-position origins (int64 array, shape [N]) and ONE size shared by all
positions (uniform sizes keep every batch one dense tensor). An origin is always shifted so that the
rect lies inside the map (App. C, eq. 31): a rect that is bigger than needed is still exact, because
every value inside it is recomputed from correct inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import OptionError


@dataclass(frozen=True)
class Rect1D:
    """Per-position origins and a shared size along one dimension of a map of length `extent`.

    `lo`/`hi` (int64 [N], optional) are the cells that really changed for each position, [lo, hi), inside
    the rect; None means the whole rect. The shared size can exceed a position's change, and at the
    borders the rect is shifted inside the map (eq. 31), so its centre is not the change's centre: the
    tau shrink (eq. 23-24) centres on [lo, hi). Exact mode (tau = 1) never reads them.
    """

    origin: np.ndarray  # int64 [N]
    size: int
    extent: int
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    def covers_map(self) -> bool:
        return self.size >= self.extent

    def changed(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-position [lo, hi) of the cells that really changed."""
        if self.lo is None:
            return self.origin, self.origin + self.size
        return self.lo, self.hi


@dataclass(frozen=True)
class Window1D:
    """What a sliding-window node (conv, pool) computes along one dimension.

    `out` is the output rect; `read_origin`/`read_size` is the read-in context in the input
    (eq. 15-16), which may reach into the padding (negative or past the end).
    """

    out: Rect1D
    read_origin: np.ndarray
    read_size: int


def effective_kernel(kernel: int, dilation: int) -> int:
    return dilation * (kernel - 1) + 1


def cap_size(exact_size: int, extent: int, tau: float) -> int:
    """Projective-field threshold (eq. 22): at most round(tau * extent) cells, at least 1."""
    if tau >= 1.0:
        return exact_size
    return max(1, min(exact_size, int(np.floor(tau * extent + 0.5))))


def shift_inside(origin: np.ndarray, size: int, extent: int) -> np.ndarray:
    """Clamp origins so that [origin, origin + size) lies inside [0, extent) (eq. 31)."""
    return np.clip(origin, 0, max(extent - size, 0)).astype(np.int64)


def sliding_window(
    rect: Rect1D,
    out_extent: int,
    kernel: int,
    stride: int,
    pad_before: int,
    dilation: int = 1,
    tau: float = 1.0,
) -> Window1D:
    """Output rect and read-in window of a conv/pool node for an input rect (eq. 13-16).

    The exact per-position output range is [ceil((x + p - Ke + 1) / s), floor((x + W - 1 + p) / s)]
    clipped to the map; the shared size is the largest of those ranges (never more than eq. 14's bound).
    With tau < 1 the output size is capped at round(tau * extent) and each position's changed input
    range [lo, hi) shrinks to W^I' = W^O * s - K + 1 cells around its centre (eq. 22-27); a change that
    is already narrower stays as it is. The shared rect then starts at the shrunk range's eq. 13 origin.
    """
    ke = effective_kernel(kernel, dilation)
    x, w = rect.origin, rect.size
    lo = np.maximum(-((-(x + pad_before - ke + 1)) // stride), 0)  # ceil division
    hi = np.minimum((x + w - 1 + pad_before) // stride, out_extent - 1)
    size = int(max(1, (hi - lo + 1).max(initial=1)))
    size = min(size, out_extent)
    x_in, w_in = rect.changed()
    w_in = w_in - x_in
    capped = cap_size(size, out_extent, tau)
    if capped < size:
        # Shrink each position's change to what `capped` outputs can see, keeping its centre (eq. 23-24).
        w_cap = max(1, capped * stride - ke + 1)
        x_in = np.where(w_in > w_cap, x_in + (w_in - w_cap) // 2, x_in)
        w_in = np.minimum(w_in, w_cap)
    c_lo = np.maximum(-((-(x_in + pad_before - ke + 1)) // stride), 0)
    c_hi = np.maximum(np.minimum((x_in + w_in - 1 + pad_before) // stride, out_extent - 1) + 1, c_lo)
    if capped < size:
        lo, size = c_lo, capped
        c_hi = np.minimum(c_hi, c_lo + capped)
    origin = shift_inside(lo, size, out_extent)
    read_origin = origin * stride - pad_before
    read_size = (size - 1) * stride + ke
    out = Rect1D(origin, size, out_extent, c_lo.astype(np.int64), c_hi.astype(np.int64))
    return Window1D(out, read_origin.astype(np.int64), read_size)


def bounding_box(rects: list[Rect1D], tau: float = 1.0) -> Rect1D:
    """Union of the rects of several inputs of one element-wise add / channel concat (eq. 20).

    With tau < 1 the box is capped like any other node, keeping the centre of the union of the changes.
    """
    extent = rects[0].extent
    if any(r.extent != extent for r in rects):
        raise ValueError("bounding_box: inputs have different map extents")
    lo = np.min([r.origin for r in rects], axis=0)
    hi = np.max([r.origin + r.size for r in rects], axis=0)
    size = int(min((hi - lo).max(initial=1), extent))
    c_lo = np.min([r.changed()[0] for r in rects], axis=0)
    c_hi = np.max([r.changed()[1] for r in rects], axis=0)
    capped = cap_size(size, extent, tau)
    if capped < size:
        width = c_hi - c_lo
        c_lo = np.where(width > capped, c_lo + (width - capped) // 2, c_lo)
        c_hi = c_lo + np.minimum(width, capped)
        lo, size = c_lo, capped
    return Rect1D(shift_inside(lo, size, extent), size, extent, c_lo.astype(np.int64), c_hi.astype(np.int64))


def padded(rect: Rect1D, pad_before: int, out_extent: int) -> Rect1D:
    """Explicit constant padding only moves the rect: the padded border never changes."""
    c_lo, c_hi = rect.changed()
    return Rect1D(rect.origin + pad_before, rect.size, out_extent, c_lo + pad_before, c_hi + pad_before)


def grid_shape(height: int, width: int, patch_size: int, stride: int) -> tuple[int, int]:
    """Heatmap size: every top-left corner (i*stride, j*stride) whose patch lies inside the image."""
    limit = min(height, width)
    for name, value in (("patch_size", patch_size), ("stride", stride)):
        allowed = f"integers 1..{limit} for a {height}x{width} image"
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise OptionError(name, value, allowed, "must be an integer")
        if not 1 <= value <= limit:
            raise OptionError(name, value, allowed)
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


def grid_origins(height: int, width: int, patch_size: int, stride: int) -> np.ndarray:
    """Top-left corners of all positions, row-major, as an int64 array [N, 2] of (y, x)."""
    gh, gw = grid_shape(height, width, patch_size, stride)
    ys, xs = np.meshgrid(np.arange(gh) * stride, np.arange(gw) * stride, indexing="ij")
    return np.stack([ys.ravel(), xs.ravel()], axis=1).astype(np.int64)


def centre_origin(height: int, width: int, patch_size: int) -> np.ndarray:
    """The worst-case position used for the theoretical speedup: the patch at the image centre."""
    return np.array([[(height - patch_size) // 2, (width - patch_size) // 2]], dtype=np.int64)
