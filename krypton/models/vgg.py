"""VGG16 with torchvision's module layout, so torchvision ``.pth`` files load as-is.

The ``state_dict`` keys are exactly torchvision's: ``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}``
(conv weight/bias), ``classifier.{0,3,6}`` (linear weight/bias); ``avgpool`` is an
``AdaptiveAvgPool2d((7, 7))`` with no parameters.

Deliberate difference from torchvision: the ReLUs are *not* in-place. The keys and the
numbers are the same; in-place activations would overwrite a conv output that the incremental
engine keeps as a materialized tensor.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Union

import torch
from torch import nn

__all__ = ["VGG", "make_layers", "CFGS", "vgg16"]

# Numbers are 3x3 conv output channels, "M" is a 2x2/stride-2 max pool (torchvision's cfgs).
CFGS: Dict[str, List[Union[int, str]]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_layers(cfg: Sequence[Union[int, str]], batch_norm: bool = False) -> nn.Sequential:
    """The ``features`` Sequential; indices (hence state_dict keys) follow torchvision."""
    layers: List[nn.Module] = []
    in_ch = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_ch = int(v)
        layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=False))
        in_ch = out_ch
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, features: nn.Module, num_classes: int = 1000, init_weights: bool = True,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=False),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=False),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            self._initialize_weights()

    def _initialize_weights(self) -> None:
        # torchvision's scheme: He-normal (fan_out) convs, N(0, 0.01) linears, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg16(num_classes: int = 1000, init_weights: bool = True) -> VGG:
    """VGG 16-layer model (configuration "D"), randomly initialised like torchvision."""
    return VGG(make_layers(CFGS["D"]), num_classes=num_classes, init_weights=init_weights)
