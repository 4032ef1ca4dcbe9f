"""TorchServe model file shared by the default archives (vgg16, resnet18, inception_v3, efficientnet_lite0/1/2).

TorchServe builds the one nn.Module class defined here with no arguments and then, if the archive has
a serialized file, loads that state_dict into it. Which architecture to build comes from
``krypton_arch.json``, which scripts/archive_models.py packs next to this file. ``__new__`` hands back
``krypton.models.build_model(arch)`` itself, so the module tree and state_dict keys are krypton's
torchvision-compatible ones (torchvision .pth files load as they are), not a wrapper's.
"""

import json
import os

import torch.nn as nn

from krypton.models import build_model


class KryptonModel(nn.Module):
    def __new__(cls):
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "krypton_arch.json")) as f:
            return build_model(json.load(f)["arch"])
