"""An occlusion oracle that shares no code with the engine: plain slicing and the stock model.

Each occluded image is a clone of the clean (1, C, H, W) image with `img[:, c, y:y+p, x:x+p] = fill[c]`
assigned by ordinary tensor slicing, and the unmodified model runs on batches of them under
torch.no_grad(). Nothing here may import krypton: the engine's own `method="naive"` goes through the
same stitch op and fill code as the incremental path, so a bug in either would hide behind it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OracleResult:
    heatmap: torch.Tensor  # float64, (rows, cols) for a grid, (1, n) for explicit origins
    label: int  # the class whose probability is mapped
    probability: float  # its probability on the clean image


def _batch(image: torch.Tensor) -> torch.Tensor:
    if image.dim() == 3:
        image = image.unsqueeze(0)
    assert image.dim() == 4 and image.shape[0] == 1, tuple(image.shape)
    return image


def _fills(fill_values, channels: int) -> list[float]:
    values = [fill_values] if isinstance(fill_values, (int, float)) else list(fill_values)
    if len(values) == 1:
        values = values * channels
    assert len(values) == channels, (fill_values, channels)
    return [float(v) for v in values]


def grid_corners(height: int, width: int, patch_size: int, stride: int) -> list[tuple[int, int]]:
    """Row-major top-left corners (i * stride, j * stride) whose patch lies fully inside the image."""
    rows = range(0, height - patch_size + 1, stride)
    cols = range(0, width - patch_size + 1, stride)
    return [(y, x) for y in rows for x in cols]


@torch.no_grad()
def occlusion_oracle_origins(model, image, patch_size: int, origins, fill_values, target=None,
                             batch: int = 128) -> OracleResult:
    """Probabilities of `target` (default: the clean image's argmax) for explicit (y, x) corners, shape (1, n)."""
    image = _batch(image)
    _, channels, height, width = image.shape
    fills = _fills(fill_values, channels)
    p = patch_size
    clean = torch.softmax(model(image).double(), dim=1)[0]
    label = int(clean.argmax()) if target is None else int(target)
    corners = [(int(y), int(x)) for y, x in origins]
    scores = []
    for start in range(0, len(corners), batch):
        occluded = []
        for y, x in corners[start:start + batch]:
            assert 0 <= y <= height - p and 0 <= x <= width - p, (y, x)
            img = image.clone()
            for c in range(channels):
                img[:, c, y:y + p, x:x + p] = fills[c]
            occluded.append(img)
        logits = model(torch.cat(occluded))
        scores.append(torch.softmax(logits.double(), dim=1)[:, label])
    heat = torch.cat(scores).view(1, len(corners))
    return OracleResult(heat, label, float(clean[label]))


def occlusion_oracle(model, image, patch_size: int, stride: int, fill_values, target=None,
                     batch: int = 128) -> OracleResult:
    """The full-grid heatmap: cell (i, j) has the patch's top-left corner at (i * stride, j * stride)."""
    image = _batch(image)
    height, width = image.shape[2], image.shape[3]
    rows = len(range(0, height - patch_size + 1, stride))
    cols = len(range(0, width - patch_size + 1, stride))
    res = occlusion_oracle_origins(model, image, patch_size, grid_corners(height, width, patch_size, stride),
                                   fill_values, target, batch)
    return OracleResult(res.heatmap.view(rows, cols), res.label, res.probability)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert tuple(a.shape) == tuple(b.shape), (tuple(a.shape), tuple(b.shape))
    return (a.double() - b.double()).abs().max().item()


def assert_matches_oracle(explanation, ref: OracleResult, tol: float, what="") -> None:
    """An engine Explanation (duck-typed: .heatmap, .label, .probability) equals the oracle within tol."""
    assert tuple(explanation.heatmap.shape) == tuple(ref.heatmap.shape), (what, tuple(explanation.heatmap.shape))
    assert explanation.label == ref.label, what
    assert abs(explanation.probability - ref.probability) <= tol, (what, explanation.probability, ref.probability)
    err = max_error(explanation.heatmap, ref.heatmap)
    assert err <= tol, f"max |engine - oracle| = {err:g} > {tol:g} ({what})"
