"""TorchServe model file of the `inception_v3` archive.

Inception v3 (torchvision layout, no aux head, transform_input=False: torchvision's inception_v3
.pth loads with its AuxLogits keys dropped).

TorchServe builds the one nn.Module class defined here with no arguments and then, if the archive
has a serialized file, loads that state_dict into it (scripts/archive_models.py writes one whose
keys fit exactly). ``__new__`` hands back ``krypton.models.build_model("inception_v3")`` itself, so the
module tree and state_dict keys are krypton's torchvision-compatible ones, not a wrapper's.
"""

import torch.nn as nn

from krypton.models import build_model


class InceptionV3(nn.Module):
    def __new__(cls):
        return build_model("inception_v3")
