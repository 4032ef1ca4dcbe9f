"""Small hand-made CNNs that together exercise every op the engine supports, and one it does not."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics, so that folding batch norm into convs is really tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


class Head(nn.Module):
    def __init__(self, channels: int, classes: int = 7):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(x), 1))


class StridedNet(nn.Module):
    """Stride 2-3 convs, 5x5 and 7x7 kernels, dilation, ceil_mode max pooling, batch norm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 8, 5, stride=3, padding=1)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.act = nn.ReLU6()
        self.head = Head(8)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.conv2(x))
        return self.head(self.act(self.conv3(x)))


class BranchyNet(nn.Module):
    """Residual add, channel concat, depthwise conv, asymmetric F.pad, avg pooling, SiLU, scalar ops."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.branch_a = nn.Conv2d(8, 4, 1)
        self.branch_b = nn.Conv2d(8, 4, 3, stride=1)
        self.down = nn.Conv2d(16, 12, 3, stride=2)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1)
        self.head = Head(12)

    def forward(self, x):
        x = F.silu(self.stem(x))
        x = x + self.bn(self.pw(self.dw(x)))  # residual add
        a = self.branch_a(x)
        b = self.branch_b(F.pad(x, (1, 1, 0, 2)))  # asymmetric padding keeps the size
        x = torch.cat([x, a, b * 0.5], dim=1)  # concat + scalar multiply
        x = F.hardswish(self.down(F.pad(x, (0, 1, 0, 1))))  # TF-style "same" padding
        return self.head(self.avg(x) - 0.25)


class PoolingNet(nn.Module):
    """Pooling corner cases: ceil_mode max pooling, ceil_mode avg pooling and count_include_pad=False
    with padding (both fall back to global), ZeroPad2d, a 'same'-padded even kernel."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 4, padding="same")
        self.pad = nn.ZeroPad2d((2, 0, 1, 3))
        self.conv2 = nn.Conv2d(6, 6, 3, stride=2)
        self.avg_ceil = nn.AvgPool2d(2, stride=2, ceil_mode=True)
        self.avg_nopad = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.head = Head(12)

    def forward(self, x):
        x = torch.tanh(self.conv1(x))
        x = self.conv2(self.pad(x))
        a = F.max_pool2d(x, 2, 2, ceil_mode=True)
        b = self.avg_ceil(self.avg_nopad(x))
        x = torch.cat([a, b], 1)  # an incremental and a global input
        return self.head(x)


class UnknownOpNet(nn.Module):
    """An op the engine does not know (torch.roll) in the middle of the network."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = Head(4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = torch.roll(x, shifts=1, dims=3)
        return self.head(F.relu(self.conv2(x)))


NETS = {"strided": StridedNet, "branchy": BranchyNet, "pooling": PoolingNet, "unknown": UnknownOpNet}


def rand_image(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A reproducible random image that does not depend on the global RNG (models are shared fixtures)."""
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
