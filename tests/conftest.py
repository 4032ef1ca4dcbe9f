import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# The repo's bench/ package, imported before any test puts scripts/ (which holds bench.py) on sys.path.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench.images  # noqa: E402,F401
# Tiny convolutions run fastest single-threaded, and CI's 2 cores are shared with TorchServe workers.
torch.set_num_threads(1)

from nets import NETS, randomize_batchnorm  # noqa: E402


# Models are built once per session and shared. Tests must not modify them (no .to(), .train(),
# attribute assignment or weight changes; test_oracle.py checks that the engine leaves them alone):
# use monkeypatch for attributes, or build a private copy.

@pytest.fixture(scope="session")
def net():
    """net(name, dtype=float32): a hand-made CNN from nets.py, seeded, with random batch-norm statistics."""
    cache = {}

    def get(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        if (name, dtype) not in cache:
            torch.manual_seed(0)
            cache[name, dtype] = randomize_batchnorm(NETS[name]()).to(dtype).eval()
        return cache[name, dtype]

    return get


@pytest.fixture(scope="session")
def product_model():
    """product_model(name, dtype=float32): one of krypton.models' models, built once (seed 0).

    Random-init models get random batch-norm statistics (so that folding is really tested);
    the EfficientNet-Lite ones keep their real weights. The float64 copy is cast from the float32 one.
    """
    from krypton.models import build_model

    cache = {}

    def get(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        if (name, torch.float32) not in cache:
            torch.manual_seed(0)
            model = build_model(name)
            if not model.krypton_pretrained:
                randomize_batchnorm(model)
            cache[name, torch.float32] = model.eval()
        if (name, dtype) not in cache:
            cache[name, dtype] = copy.deepcopy(cache[name, torch.float32]).to(dtype).eval()
        return cache[name, dtype]

    return get
