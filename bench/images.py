"""The benchmark's inputs: real photos from scikit-image, preprocessed per model without torchvision.

Preprocessing follows krypton.models.PREPROCESS[name] through krypton.preprocess (the server's own
implementation): resize the short side to `resize` (PIL bilinear, which antialiases when shrinking
like torchvision's Resize), centre-crop `crop` x `crop` (torchvision's rounded offsets), scale to
[0, 1], then (x - mean) / std per channel.
"""
from __future__ import annotations

import numpy as np
import torch

from krypton.preprocess import preprocess_array

# Bundled with scikit-image (no download): distinct natural scenes, in the order --images takes them.
IMAGE_NAMES = ("chelsea", "coffee", "astronaut", "rocket")


def load_photo(name: str) -> np.ndarray:
    from skimage import data
    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def preprocess(img: np.ndarray, resize: int, crop: int, mean, std, dtype=torch.float32) -> torch.Tensor:
    """uint8 HxWx3 -> normalized (1, 3, crop, crop) tensor, exactly what the server feeds the model."""
    x, _ = preprocess_array(img, resize, crop, mean, std)
    return x.unsqueeze(0).to(dtype).contiguous()


def model_inputs(preprocess_cfg: dict, count: int, dtype=torch.float32) -> list[tuple[str, torch.Tensor]]:
    if not 1 <= count <= len(IMAGE_NAMES):
        raise ValueError(f"--images={count} is out of range: allowed 1..{len(IMAGE_NAMES)}")
    cfg = preprocess_cfg
    return [(n, preprocess(load_photo(n), cfg["resize"], cfg["crop"], cfg["mean"], cfg["std"], dtype))
            for n in IMAGE_NAMES[:count]]
