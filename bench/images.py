"""The benchmark's inputs: real photos from scikit-image, preprocessed per model without torchvision.

Preprocessing follows krypton.models.PREPROCESS[name]: resize the short side to `resize` (PIL
bilinear, which antialiases when shrinking like torchvision's Resize), centre-crop `crop` x `crop`,
scale to [0, 1], then (x - mean) / std per channel.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Bundled with scikit-image (no download): distinct natural scenes, in the order --images takes them.
IMAGE_NAMES = ("chelsea", "coffee", "astronaut", "rocket")


def load_photo(name: str) -> np.ndarray:
    from skimage import data
    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def preprocess(img: np.ndarray, resize: int, crop: int, mean, std, dtype=torch.float32) -> torch.Tensor:
    """uint8 HxWx3 -> normalized (1, 3, crop, crop) tensor."""
    pil = Image.fromarray(img)
    w, h = pil.size
    # torchvision's rule: the short side becomes `resize`, the long side int(resize * long / short)
    nw, nh = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    pil = pil.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - crop) // 2, (nh - crop) // 2
    pil = pil.crop((left, top, left + crop, top + crop))
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0).permute(2, 0, 1)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s).unsqueeze(0).to(dtype).contiguous()


def model_inputs(preprocess_cfg: dict, count: int, dtype=torch.float32) -> list[tuple[str, torch.Tensor]]:
    if not 1 <= count <= len(IMAGE_NAMES):
        raise ValueError(f"--images={count} is out of range: allowed 1..{len(IMAGE_NAMES)}")
    cfg = preprocess_cfg
    return [(n, preprocess(load_photo(n), cfg["resize"], cfg["crop"], cfg["mean"], cfg["std"], dtype))
            for n in IMAGE_NAMES[:count]]
