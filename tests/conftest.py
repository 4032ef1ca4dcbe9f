import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
# Tiny convolutions run fastest single-threaded, and CI's 2 cores are shared with TorchServe workers.
torch.set_num_threads(1)
