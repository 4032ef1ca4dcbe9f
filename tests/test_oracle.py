"""The exactness oracle (tests/oracle.py) itself, against a closed-form model, and its independence."""
from __future__ import annotations

import ast
import os

import numpy as np
import pytest
import torch

from oracle import occlusion_oracle, occlusion_oracle_origins


class MeanLinear(torch.nn.Module):
    """logits = A @ (per-channel mean of the image) + b: the occluded probability has a closed form."""

    def __init__(self, a: np.ndarray, b: np.ndarray):
        super().__init__()
        self.fc = torch.nn.Linear(a.shape[1], a.shape[0]).double()
        with torch.no_grad():
            self.fc.weight.copy_(torch.from_numpy(a))
            self.fc.bias.copy_(torch.from_numpy(b))

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


C, H, W = 3, 7, 10
A = 0.1 * np.array([[0.3, -0.2, 0.05], [-0.1, 0.25, -0.05], [0.02, 0.01, 0.1], [-0.2, -0.1, 0.3]])
B = np.array([0.1, -0.3, 0.2, 0.0])


def _image() -> torch.Tensor:
    """image[c, y, x] = (c + 1) * (y * W + x) + c: every patch position has a different pixel sum."""
    y, x = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    return torch.from_numpy(np.stack([(c + 1) * (y * W + x) + c for c in range(C)]).astype(np.float64))


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _closed_form(y0: int, x0: int, p: int, fill) -> np.ndarray:
    """Class probabilities with the p x p patch at (y0, x0), from sums of arithmetic series only."""
    n = H * W
    total = n * (n - 1) / 2  # sum of y * W + x over the image
    # sum of y * W + x over rows y0..y0+p-1 and columns x0..x0+p-1
    under = p * W * (p * y0 + p * (p - 1) / 2) + p * (p * x0 + p * (p - 1) / 2)
    means = np.array([((c + 1) * (total - under) + c * (n - p * p) + p * p * fill[c]) / n for c in range(C)])
    return _softmax(A @ means + B)


def _clean() -> np.ndarray:
    n = H * W
    return _softmax(A @ np.array([((c + 1) * n * (n - 1) / 2 + c * n) / n for c in range(C)]) + B)


@pytest.mark.parametrize("patch, stride, rows, cols", [
    (3, 2, 3, 4),  # rows 0, 2, 4 (4 + 3 = 7 = H); columns 0, 2, 4, 6 (8 + 3 > W)
    (4, 3, 2, 3),  # rows 0, 3; columns 0, 3, 6: the last patches touch the bottom and right borders
    (1, 1, 7, 10),
    (7, 5, 1, 1),  # as tall as the image
])
@pytest.mark.parametrize("fill", [[0.0, 0.0, 0.0], [-5.0, 40.0, 3.5]])
def test_oracle_matches_the_closed_form(patch, stride, rows, cols, fill):
    model = MeanLinear(A, B).eval()
    image = _image()
    label = int(np.argmax(_clean()))
    res = occlusion_oracle(model, image, patch, stride, fill, batch=5)  # batches of 5 split the grid unevenly
    assert res.heatmap.shape == (rows, cols) and res.heatmap.dtype == torch.float64
    assert res.label == label and res.probability == pytest.approx(_clean()[label], abs=1e-12)
    want = np.array([[_closed_form(i * stride, j * stride, patch, fill)[label] for j in range(cols)]
                     for i in range(rows)])
    assert np.abs(res.heatmap.numpy() - want).max() < 1e-12
    assert rows * cols == 1 or np.ptp(want) > 1e-3  # the positions are really told apart
    # an explicit target, and a single number as the fill of every channel
    other = occlusion_oracle(model, image[None], patch, stride, 2.0, target=3)
    want3 = np.array([[_closed_form(i * stride, j * stride, patch, [2.0] * C)[3] for j in range(cols)]
                      for i in range(rows)])
    assert other.label == 3 and np.abs(other.heatmap.numpy() - want3).max() < 1e-12


def test_oracle_origins_in_the_given_order():
    model = MeanLinear(A, B).eval()
    corners = [(4, 6), (0, 0), (4, 6), (2, 7), (0, 3)]  # any order, repeats allowed
    res = occlusion_oracle_origins(model, _image(), 3, corners, [1.0, -1.0, 0.5], target=0, batch=2)
    want = [_closed_form(y, x, 3, [1.0, -1.0, 0.5])[0] for y, x in corners]
    assert res.heatmap.shape == (1, 5) and np.abs(res.heatmap.numpy()[0] - want).max() < 1e-12
    with pytest.raises(AssertionError):
        occlusion_oracle_origins(model, _image(), 3, [(5, 0)], 0.0)  # patch would cross the bottom border


def test_oracle_shares_no_code_with_the_engine():
    path = os.path.join(os.path.dirname(__file__), "oracle.py")
    tree = ast.parse(open(path).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "dataclasses", "torch"}, imported


@pytest.mark.parametrize("name", ["strided", "branchy", "pooling", "unknown"])
def test_engine_leaves_shared_models_alone(net, name):
    """The model fixtures are shared by the whole session: explaining must not change them."""
    import krypton
    from nets import rand_image

    model = net(name, torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    krypton.Explainer(model).explain(rand_image(3, 17, 19, dtype=torch.float64), patch_size=5, stride=4, tau=0.5)
    krypton.Explainer(model).explain(rand_image(3, 17, 19, dtype=torch.float64), patch_size=5, stride=4,
                                     method="naive")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
