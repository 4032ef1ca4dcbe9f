"""occlusion=segments: SLIC superpixels of the preprocessed view, each occluded with the fill inside its mask.

FeatureAblation semantics (captum.attr.FeatureAblation with a spatial feature_mask): copy k of the image
holds the fill where the label map is k and the image elsewhere. Each copy is one changed rect (the
segment's bounding box, rounded up to a size bucket) holding where(mask, fill, image), run by the engine's
``Explainer.run_changes`` (incremental where the box is small enough to gain, stock inference otherwise),
against the same materialized activations (and LRU cache) as the grid.

JSON: per-segment probabilities of the target with the segment occluded, drops (clean - occluded) and the
label map as row-major run lengths ``[value, count, value, count, ...]`` (``from_rle`` decodes it).
PNG: each segment filled with jet_r of its probability (the grid's colour map and clipping), outlined.
"""

from __future__ import annotations

import io
import json
import time
from typing import List

import numpy as np
import torch
from PIL import Image

from krypton import changes
from krypton.memory import PeakMemory
from krypton.obe import MIN_SPEEDUP
from krypton.options import DEFAULT_MEMORY_BUDGET, fill_values

from . import render as obe_render
from .request import RequestError

COMPACTNESS = 10.0  # skimage's default for SLIC on RGB: fixed, not a request option
OUTLINE = (255, 255, 255)


def slic_labels(view: np.ndarray, n_segments: int, compactness: float = COMPACTNESS) -> np.ndarray:
    """SLIC superpixels of an (H, W, 3) uint8 view: an (H, W) int32 label map, labels 0..K-1 consecutive."""
    from skimage.segmentation import slic

    lab = slic(view, n_segments=int(n_segments), compactness=compactness, start_label=0, channel_axis=-1)
    _, inverse = np.unique(lab, return_inverse=True)
    return inverse.reshape(lab.shape).astype(np.int32)


def rle(labels: np.ndarray) -> List[int]:
    """Row-major run lengths of a label map: [value, count, value, count, ...]."""
    flat = np.asarray(labels).reshape(-1)
    if flat.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    counts = np.diff(np.r_[starts, flat.size])
    return np.stack([flat[starts], counts], axis=1).reshape(-1).astype(np.int64).tolist()


def from_rle(runs, shape) -> np.ndarray:
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    return np.repeat(runs[:, 0], runs[:, 1]).reshape(shape)


@torch.no_grad()
def ablate(explainer, x: torch.Tensor, labels: np.ndarray, fill, target=None, batch_size=None,
           min_speedup: float = MIN_SPEEDUP, memory_budget: int = DEFAULT_MEMORY_BUDGET):
    """Occlude every segment of ``labels`` (H, W) in ``x`` (1, C, H, W) with ``fill`` (per-channel values of
    the normalized input). Returns (run, mats cache state, label, probs [C], segment probabilities [K])."""
    _, c, h, w = x.shape
    k = int(labels.max()) + 1
    masks = labels[None] == np.arange(k)[:, None, None]
    lo, hi = changes.boxes(masks)
    origins, sizes = changes.bucketed_rects(lo, hi, h, w)
    lab = torch.as_tensor(labels, device=x.device)[None]  # (1, H, W)
    base = torch.as_tensor(fill, dtype=x.dtype, device=x.device).view(c, 1, 1).expand(c, h, w)

    def content(indices):
        size = tuple(int(v) for v in sizes[indices[0]])
        at = origins[indices]
        ids = torch.as_tensor(np.asarray(indices), device=x.device).view(-1, 1, 1, 1)
        which = changes.gather_rects(lab, None, at, size) == ids
        return torch.where(which, changes.gather_rects(base, None, at, size), changes.gather_rects(x[0], None, at, size))

    mats, cache = explainer.materialized(x)
    probs = torch.softmax(mats.output.double(), dim=1)[0]
    label = int(probs.argmax()) if target is None else int(target)
    run = explainer.run_changes(x, origins, sizes, content, batch_size=batch_size, memory_budget=memory_budget,
                                min_speedup=min_speedup, mats=mats)
    seg_probs = torch.softmax(run.outputs.double(), dim=1)[:, label].cpu().numpy()
    return run, cache, label, probs, seg_probs


def overlay(view: np.ndarray, labels: np.ndarray, seg_probs: np.ndarray, probability: float,
            alpha: float = 0.5) -> np.ndarray:
    """jet_r of each segment's probability (clipped as the grid's overlay) over the view, segments outlined."""
    from skimage.segmentation import find_boundaries

    colours = obe_render.jet_r(obe_render.scaled(np.asarray(seg_probs, np.float64), probability))[labels]
    out = (1.0 - alpha) * view.astype(np.float64) / 255.0 + alpha * colours
    out = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    out[find_boundaries(labels + 1, mode="inner")] = OUTLINE  # label 0 is no background
    return out


def overlay_png(view, labels, seg_probs, probability, alpha: float = 0.5) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(overlay(view, labels, seg_probs, probability, alpha), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def explain(h, idx, x, opts, t0, decode_ms):
    """The handler's occlusion=segments request (``h``: a KryptonExplainMixin with its request state).
    Superpixels are found on the model's input view (the preprocessed crop), where the occlusion happens."""
    s = h.settings
    view = h._view(x)
    t1 = time.perf_counter()
    labels = slic_labels(view, opts.n_segments)
    k = int(labels.max()) + 1
    t_seg = (time.perf_counter() - t1) * 1e3
    if k > s.limits.max_positions:  # SLIC may make a few more segments than asked for
        raise RequestError(f"option n_segments: SLIC made {k} segments, over the limit max_positions="
                           f"{s.limits.max_positions}; ask for fewer", parameter="n_segments")
    h.budget.check(h.context, k, "naive")  # at most a full forward per segment: refused before the work
    try:
        fill = fill_values(opts.fill, int(x.shape[0]), h._normalization())
    except Exception as e:  # OptionError: a 400 naming fill
        raise RequestError(str(e), parameter="fill") from None
    naive = opts.method == "naive" or bool(h.fallback_reason)
    t2 = time.perf_counter()
    with PeakMemory(h.device) as pm:
        run, cache, label, probs, seg_probs = ablate(
            h.explainer, x.unsqueeze(0), labels, fill, opts.target, opts.batch_size,
            min_speedup=float("inf") if naive else MIN_SPEEDUP,
            memory_budget=s.memory_budget or DEFAULT_MEMORY_BUDGET)
    total = (time.perf_counter() - t2) * 1e3
    prob = float(probs[label])
    h._metric(idx, "KryptonExplainRequests", 1, counter=True)
    h._metric(idx, "KryptonCacheHits" if cache == "hit" else "KryptonCacheMisses", 1, counter=True)
    h._metric(idx, "KryptonExplainLatency", total, "Milliseconds")
    h._metric(idx, "KryptonPositions", k)
    incremental = run.stock_positions < k - run.unchanged
    if opts.format == "png":
        png = overlay_png(view, labels, seg_probs, prob)
        c = h.context
        c.set_response_content_type(idx, "image/png")
        for key, v in (("Label", label), ("Probability", f"{prob:.6g}"), ("Cache", cache), ("Positions", k),
                       ("Occlusion", "segments"), ("Weights", h.weights), ("Total-Ms", f"{total:.1f}")):
            c.set_response_header(idx, f"X-Krypton-{key}", str(v))
        return png
    body = {"model": h.model_name, "arch": s.arch, "weights": h.weights, "model_format": h.model_format,
            "occlusion": "segments", "label": label, "probability": prob, "predicted": int(probs.argmax()),
            "positions": k,
            "segments": {"count": k, "shape": [int(v) for v in labels.shape], "compactness": COMPACTNESS,
                         "labels_rle": rle(labels), "probabilities": seg_probs.tolist(),
                         "drops": (prob - seg_probs).tolist()},
            "method": "naive" if naive else "incremental", "incremental": incremental,
            "fallback_reason": h.fallback_reason, "groups": run.groups,
            "executed_speedup": run.executed_speedup, "stock_positions": run.stock_positions, "cache": cache,
            "timings_ms": {"decode_preprocess": decode_ms, "segment": t_seg, "total": total,
                           "request": (time.perf_counter() - t0) * 1e3},
            "memory": pm.to_dict(), "input_shape": [int(v) for v in x.shape],
            "options": {"occlusion": "segments", "n_segments": opts.n_segments, "fill": opts.fill,
                        "target": opts.target, "method": opts.method, "batch_size": opts.batch_size,
                        "format": opts.format}}
    for key, cls in (("label_name", label), ("predicted_name", int(probs.argmax()))):
        name = h._name(cls)
        if name is not None:
            body[key] = name
    c = h.context
    c.set_response_content_type(idx, "application/json")
    return json.dumps(body)
