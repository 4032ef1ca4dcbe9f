"""TorchServe model file of the `resnet18` archive.

ResNet-18 (torchvision layout: torchvision's resnet18 .pth loads as is).

TorchServe builds the one nn.Module class defined here with no arguments and then, if the archive
has a serialized file, loads that state_dict into it (scripts/archive_models.py writes one whose
keys fit exactly). ``__new__`` hands back ``krypton.models.build_model("resnet18")`` itself, so the
module tree and state_dict keys are krypton's torchvision-compatible ones, not a wrapper's.
"""

import torch.nn as nn

from krypton.models import build_model


class Resnet18(nn.Module):
    def __new__(cls):
        return build_model("resnet18")
