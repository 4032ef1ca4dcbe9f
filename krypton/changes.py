"""Arbitrary changes of the input: per-position rects with per-position content (pure numpy, no model).

OBE's occluding patch is one case of the engine's input change: a rect of one shared size at each
position's origin, holding a constant fill. Captum-style windows cut at the far border, superpixel
segments and edited images change rects of other sizes and hold other content (the baseline under a
mask, the edited pixels). The engine runs any of them the same way (`Explainer.run_changes`): positions
are grouped by rect size, each group is one plan (plan.py) and its content is supplied per batch
(execute.py `BatchRunner`). Here: the rect arithmetic that turns changed regions into those groups.

A rect bigger than the change is still exact, as long as its content is the changed image's own pixels
there (a segment's content is where(mask, baseline, image) over its bounding box): so sizes may be
rounded up to a few buckets (fewer plans, larger batches) and shifted inside the image.
"""
from __future__ import annotations

import numpy as np


def _ladder(limit: int = 1 << 14) -> np.ndarray:
    values, v = [4, 8, 12, 16], 16
    while v < limit:
        v = int(np.ceil(v * 1.25 / 4) * 4)
        values.append(v)
    return np.asarray(values, dtype=np.int64)


SIZE_BUCKETS = _ladder()  # 4, 8, 12, 16, 20, 28, 36, 48, ...: ~25% apart, multiples of 4


def bucket_sizes(sizes: np.ndarray, extent: int) -> np.ndarray:
    """Each size (> 0) rounded up to the next bucket, at most `extent`; 0 (no change) stays 0."""
    sizes = np.asarray(sizes, dtype=np.int64)
    up = SIZE_BUCKETS[np.minimum(np.searchsorted(SIZE_BUCKETS, sizes, side="left"), len(SIZE_BUCKETS) - 1)]
    return np.where(sizes > 0, np.minimum(np.maximum(up, sizes), extent), 0)


def place(lo: np.ndarray, size: np.ndarray, extent: int) -> np.ndarray:
    """Origins of rects of `size` that contain [lo, lo + change) and lie inside [0, extent)."""
    return np.clip(np.asarray(lo, np.int64), 0, np.maximum(extent - np.asarray(size, np.int64), 0))


def boxes(changed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes of boolean maps [N, H, W]: (lo [N, 2], hi [N, 2]) as (y, x); empty maps give lo = hi = 0."""
    changed = np.asarray(changed, dtype=bool)
    rows, cols = changed.any(axis=2), changed.any(axis=1)
    lo = np.zeros((len(changed), 2), np.int64)
    hi = np.zeros((len(changed), 2), np.int64)
    for axis, m in enumerate((rows, cols)):
        present = m.any(axis=1)
        lo[:, axis] = np.where(present, m.argmax(axis=1), 0)
        hi[:, axis] = np.where(present, m.shape[1] - m[:, ::-1].argmax(axis=1), 0)
    return lo, hi


def bucketed_rects(lo: np.ndarray, hi: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(origins, sizes) [N, 2] of rects covering [lo, hi), sizes rounded up to buckets, inside the image."""
    extent = hi - lo
    sizes = np.stack([bucket_sizes(extent[:, 0], height), bucket_sizes(extent[:, 1], width)], axis=1)
    origins = np.stack([place(lo[:, 0], sizes[:, 0], height), place(lo[:, 1], sizes[:, 1], width)], axis=1)
    return np.where(sizes > 0, origins, 0), sizes


def group_by_size(sizes: np.ndarray) -> list[tuple[tuple[int, int], np.ndarray]]:
    """((h, w), position indices) per distinct rect size, largest group first; empty rects excluded."""
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    keep = np.flatnonzero((sizes > 0).all(axis=1))
    if len(keep) == 0:
        return []
    unique, inverse = np.unique(sizes[keep], axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    groups = [((int(u[0]), int(u[1])), keep[inverse == g]) for g, u in enumerate(unique)]
    return sorted(groups, key=lambda g: -len(g[1]))


def gather_rects(images, which, origins, size):
    """images[which[i], :, y:y + h, x:x + w] for every i, as one [len(which), C, h, w] tensor (one gather).

    images: [N, C, H, W] (or [C, H, W]: every position reads the same image); which: image index per
    position; origins: [b, 2] (y, x); size: (h, w)."""
    import torch

    if images.dim() == 3:
        images = images.unsqueeze(0)
        which = np.zeros(len(origins), np.int64)
    device = images.device
    h, w = size
    o = torch.as_tensor(np.asarray(origins, np.int64), device=device)
    rows = (o[:, 0:1] + torch.arange(h, device=device))[:, None, :, None]
    cols = (o[:, 1:2] + torch.arange(w, device=device))[:, None, None, :]
    n = torch.as_tensor(np.asarray(which, np.int64), device=device)[:, None, None, None]
    ch = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return images[n, ch, rows, cols]
