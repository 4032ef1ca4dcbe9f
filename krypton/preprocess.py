"""The one implementation of the default models' input preprocessing.

torchvision ``Resize(resize)`` (int: the shorter side becomes ``resize``, bilinear, PIL's antialiasing
when shrinking) + ``CenterCrop(crop)`` + ``ToTensor`` + ``Normalize(mean, std)`` on a PIL image, with
the same arithmetic as torchvision and without needing it. Used by the TorchServe handler
(``krypton/torchserve/request.py``), the tuning scripts (``krypton/tuning.py``) and the benchmark
(``bench/images.py``), so all three feed the model the same tensor for the same photo.

Optional bounds (the handler passes its ``limits``) are checked on the arithmetic alone, BEFORE any
pixel is resized: a 60000x10 image resized to 256 px on its short side would be 1,536,000x256
pixels. Violations raise ``PreprocessError`` (a ``ValueError``) naming the limit, the value and the
allowed range. Nothing here imports TorchServe.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np


class PreprocessError(ValueError):
    """An image outside the configured bounds. ``limit``: the setting at fault; ``status``: the
    HTTP status a server should answer (413 too large, 400 otherwise)."""

    def __init__(self, message: str, limit: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.limit = limit
        self.status = status


def resized_size(w: int, h: int, size: int) -> Tuple[int, int]:
    """torchvision Resize(int): the shorter side becomes ``size``, the longer keeps the aspect
    (truncated, as torchvision's ``int(size * long / short)``)."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def center_crop_box(w: int, h: int, crop: int) -> Tuple[int, int, int, int]:
    """torchvision CenterCrop's box (left, top, right, bottom): offsets ``int(round(d / 2.0))``."""
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    return left, top, left + crop, top + crop


def check_bounds(w: int, h: int, resize: Optional[int], crop: Optional[int], *,
                 min_side: Optional[int] = None, max_aspect_ratio: Optional[float] = None,
                 max_resized_pixels: Optional[int] = None) -> Tuple[int, int]:
    """Validate a ``w`` x ``h`` image against the bounds before any work; returns the size after
    resizing. A bound that is None is not checked."""
    if max_aspect_ratio is not None:
        ratio = max(w, h) / max(1, min(w, h))
        if ratio > max_aspect_ratio:
            raise PreprocessError(f"image is {w}x{h}: aspect ratio {ratio:.4g} exceeds the limit "
                                  f"max_aspect_ratio={max_aspect_ratio:g} (allowed: long side <= "
                                  f"{max_aspect_ratio:g} x short side)", "max_aspect_ratio", 413)
    if min_side is not None and min(w, h) < min_side:
        raise PreprocessError(f"image is {w}x{h}: its shorter side {min(w, h)} px is below the limit "
                              f"min_image_side={min_side} (allowed: both sides >= {min_side} px; "
                              "a smaller image would only be upscaled)", "min_image_side")
    nw, nh = resized_size(w, h, resize) if resize is not None else (w, h)
    if max_resized_pixels is not None and nw * nh > max_resized_pixels:
        how = f"resizing its short side to {resize} px gives" if resize is not None else "it is"
        raise PreprocessError(f"image is {w}x{h}: {how} {nw}x{nh} = {nw * nh} pixels, over the limit "
                              f"max_resized_pixels={max_resized_pixels} (checked before resizing)",
                              "max_resized_pixels", 413)
    if crop is not None and (nw < crop or nh < crop):
        raise PreprocessError(f"image is {nw}x{nh} after resizing, smaller than the model's input crop "
                              f"{crop}x{crop}", "crop")
    return nw, nh


def preprocess_pil(im, resize: Optional[int], crop: Optional[int], mean: Sequence[float],
                   std: Sequence[float], *, min_side: Optional[int] = None,
                   max_aspect_ratio: Optional[float] = None, max_resized_pixels: Optional[int] = None):
    """PIL RGB image -> (float32 tensor (3, H, W) normalized, uint8 array (H, W, 3) of the same view).

    ``resize`` None keeps the size; ``crop`` None keeps the whole (resized) image.
    """
    import torch
    from PIL import Image

    if im.mode != "RGB":
        raise ValueError(f"preprocess expects an RGB image, got PIL mode {im.mode}")
    nw, nh = check_bounds(im.width, im.height, resize, crop, min_side=min_side,
                          max_aspect_ratio=max_aspect_ratio, max_resized_pixels=max_resized_pixels)
    if (nw, nh) != im.size:
        im = im.resize((nw, nh), Image.BILINEAR)
    if crop is not None:
        im = im.crop(center_crop_box(nw, nh, crop))
    view = np.asarray(im, dtype=np.uint8).copy()
    x = torch.from_numpy(view).permute(2, 0, 1).to(torch.float32).div_(255.0)
    m = torch.tensor(tuple(mean), dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(tuple(std), dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s).contiguous(), view


def preprocess_array(arr: np.ndarray, resize: Optional[int], crop: Optional[int], mean: Sequence[float],
                     std: Sequence[float], **bounds):
    """uint8 (H, W, 3) array -> the same as ``preprocess_pil``."""
    from PIL import Image

    return preprocess_pil(Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB"), resize, crop,
                          mean, std, **bounds)
