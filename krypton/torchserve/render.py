"""Heatmap rendering for format=png: colormap jet_r, clipped as in the Krypton paper, over the photo.

``render_original`` draws it on the user's whole original photo (at its own resolution, its longer side
bounded by ``max_side``): the model's input (the resize + centre crop of ``krypton.preprocess``, mapped
back to original pixels by ``crop_region``) carries the heatmap, the area outside the model's view is
dimmed, and a legend strip below holds the label and a colour bar in probability units.

No matplotlib: jet is matplotlib's piecewise-linear ``_jet_data`` evaluated with numpy.interp,
and jet_r(x) = jet(1 - x). Clipping: the heatmap holds the probability of the explained label
with the patch at each position; values are mapped to [0, 1] over [0.75 p, min(1, 1.25 p)] where
p is the probability on the clean image, so a strong drop (important region) is red and
"no change" is blue.
"""

from __future__ import annotations

import io
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from krypton.preprocess import center_crop_box, resized_size

DIM = 0.35                    # brightness kept outside the model's view
LEGEND_MIN_WIDTH = 360        # the legend strip is at least this wide (a small photo sits on its left)

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


def cells_at(pos: np.ndarray, cells: int, patch: int, stride: int) -> np.ndarray:
    """For positions along one axis (model-input pixels, floats), the heatmap cell whose patch centre
    is nearest. Cell i covers the patch with top-left i*stride, centre i*stride + patch/2."""
    idx = np.floor((np.asarray(pos, dtype=np.float64) - patch / 2.0) / stride + 0.5).astype(np.int64)
    return np.clip(idx, 0, cells - 1)


def cell_index(size: int, cells: int, patch: int, stride: int) -> np.ndarray:
    """``cells_at`` for the centres of the pixels 0 .. size-1 of the model input."""
    return cells_at(np.arange(size, dtype=np.float64) + 0.5, cells, patch, stride)


# ---------------------------------------------------------------------------- the original photo
def crop_region(size: Sequence[int], resize: Optional[int], crop: Optional[int]) -> Dict[str, Any]:
    """Where the model's input lies in the original ``size`` = (W, H) image.

    The preprocessing resizes the shorter side to ``resize`` (``krypton.preprocess.resized_size``) and
    cuts the centre ``crop`` x ``crop`` box; a resized pixel edge at x maps to x * W / resized_W in the
    original (PIL's resize maps pixel centres linearly). ``box``: [left, top, right, bottom] in original
    pixels (floats, 2 decimals); ``input_size``: [w, h] of the model input; ``scale``: original pixels
    per model-input pixel [x, y]. Heatmap cell (i, j) is the patch at model pixels
    x in [j*S, j*S+P), y in [i*S, i*S+P), i.e. box_left + x * scale_x in the original.
    """
    W, H = int(size[0]), int(size[1])
    nw, nh = resized_size(W, H, int(resize)) if resize is not None else (W, H)
    l, t, r, b = center_crop_box(nw, nh, int(crop)) if crop is not None else (0, 0, nw, nh)
    sx, sy = W / nw, H / nh
    return {"original_size": [W, H],
            "box": [round(l * sx, 2), round(t * sy, 2), round(r * sx, 2), round(b * sy, 2)],
            "input_size": [r - l, b - t], "scale": [round(sx, 6), round(sy, 6)]}


def output_size(size: Sequence[int], max_side: int) -> Tuple[int, int]:
    """The photo's size in the PNG: its own, shrunk (never enlarged) to a longer side <= max_side."""
    W, H = int(size[0]), int(size[1])
    s = min(1.0, max_side / max(W, H))
    return max(1, int(round(W * s))), max(1, int(round(H * s)))


_LUT = None


def _jet_r_lut() -> np.ndarray:
    global _LUT
    if _LUT is None:
        _LUT = jet_r((np.arange(256) + 0.5) / 256).astype(np.float32)
    return _LUT


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, OSError):
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: float) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def render_original(image: Image.Image, region: Dict[str, Any], heatmap: np.ndarray, probability: float,
                    patch: int, stride: int, label_text: str, max_side: int = 1024,
                    alpha: float = 0.5) -> Image.Image:
    """jet_r(heatmap) over the box of ``region`` on the whole original RGB ``image``, the outside
    dimmed (x DIM), the box outlined, and a legend strip below: ``label_text`` and a colour bar whose
    ticks are probabilities of the explained label (the clip range [0.75 p, min(1, 1.25 p)] and p)."""
    ow, oh = output_size(image.size, max_side)
    photo = image if (ow, oh) == image.size else image.resize((ow, oh), Image.BILINEAR, reducing_gap=3.0)
    base = np.asarray(photo.convert("RGB"), dtype=np.float32) / 255.0
    out = base * DIM
    W, H = region["original_size"]
    fx, fy = ow / W, oh / H
    l, t, r, b = region["box"]
    bx0, bx1, by0, by1 = l * fx, r * fx, t * fy, b * fy
    iw, ih = region["input_size"]
    hm = np.asarray(heatmap, dtype=np.float64)
    xs = np.arange(ow) + 0.5
    ys = np.arange(oh) + 0.5
    cols_in = np.nonzero((xs >= bx0) & (xs < bx1))[0]
    rows_in = np.nonzero((ys >= by0) & (ys < by1))[0]
    if cols_in.size and rows_in.size:
        u = (xs[cols_in] - bx0) / (bx1 - bx0) * iw  # model-input coordinates of the pixel centres
        v = (ys[rows_in] - by0) / (by1 - by0) * ih
        ci, ri = cells_at(u, hm.shape[1], patch, stride), cells_at(v, hm.shape[0], patch, stride)
        q = np.clip((scaled(hm, probability) * 256).astype(np.int64), 0, 255)
        colours = _jet_r_lut()[q[ri][:, ci]]  # (rows, cols, 3)
        r0, r1, c0, c1 = rows_in[0], rows_in[-1] + 1, cols_in[0], cols_in[-1] + 1
        out[r0:r1, c0:c1] = (1.0 - alpha) * base[r0:r1, c0:c1] + alpha * colours
    img = Image.fromarray(np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8), "RGB")

    cw = max(ow, LEGEND_MIN_WIDTH)
    fs = int(min(28, max(12, round(cw / 45))))
    font, small = _font(fs), _font(max(10, int(fs * 0.8)))
    pad = max(4, fs // 2)
    bar_h = fs
    legend_h = pad + fs + pad + bar_h + 4 + int(fs * 0.8) + pad + int(fs * 0.8) + pad
    canvas = Image.new("RGB", (cw, oh + legend_h), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    lw = max(1, int(round(min(ow, oh) / 400)))
    draw.rectangle([int(round(bx0)), int(round(by0)), int(round(bx1)) - 1, int(round(by1)) - 1],
                   outline=(255, 255, 255), width=lw)
    y = oh + pad
    draw.text((pad, y), _fit(draw, label_text, font, cw - 2 * pad), fill=(0, 0, 0), font=font)
    y += fs + pad
    x0, x1 = pad + fs, cw - pad - fs
    bar = (_jet_r_lut()[np.clip((np.linspace(0, 1, x1 - x0) * 256).astype(np.int64), 0, 255)] * 255)
    bar = np.repeat(np.rint(bar).astype(np.uint8)[None], bar_h, axis=0)
    canvas.paste(Image.fromarray(bar, "RGB"), (x0, y))
    draw.rectangle([x0 - 1, y - 1, x1, y + bar_h], outline=(0, 0, 0))
    lo, hi = clip_range(probability)
    ticks = [(lo, "<="), (float(probability), "p="), (hi, ">=" if hi < 1.0 else "")]
    for value, prefix in ticks:
        tx = x0 + (value - lo) / (hi - lo) * (x1 - x0)
        draw.line([tx, y + bar_h, tx, y + bar_h + 4], fill=(0, 0, 0))
        text = f"{prefix}{value:.3g}"
        w = draw.textlength(text, font=small)
        draw.text((min(max(tx - w / 2, 0), cw - w), y + bar_h + 4), text, fill=(0, 0, 0), font=small)
    y += bar_h + 4 + int(fs * 0.8) + pad
    caption = "red: big drop (important), blue: no drop; dimmed: not seen by the model"
    draw.text((pad, y), _fit(draw, caption, small, cw - 2 * pad), fill=(60, 60, 60), font=small)
    return canvas


def render_original_png(*args, **kwargs) -> bytes:
    buf = io.BytesIO()
    render_original(*args, **kwargs).save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()
