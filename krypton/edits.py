"""Incremental inference for edited images: frames of a video, inpainting, erasing.

`IncrementalModel(model).reference(image)` materializes the reference's activations once;
`.forward(images)` returns model(images) for a batch of images that differ from the reference in small
regions. Each image's change is found from the difference (its bounding box, size rounded up to a few
buckets so that images share plans, changes.py) and run through the same engine as occlusion
(`Explainer.run_changes`: the rect holds the image's own pixels); images whose change is too large to
gain anything run stock full inference.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import changes
from .errors import OptionError
from .obe import MIN_SPEEDUP, ChangeRun, Explainer, _as_batch
from .options import DEFAULT_MEMORY_BUDGET


class IncrementalModel:
    """model(images) for images close to a reference, exact (same values as the stock model, to float
    rounding), computed incrementally.

    min_speedup: an image group whose plan saves less than this (conv multiply-adds) runs stock.
    `last_run` (a ChangeRun) says how the last forward ran: groups, stock positions, executed speedup.
    """

    def __init__(self, model: nn.Module, batch_size: int | None = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 min_speedup: float = MIN_SPEEDUP, channels_last: bool | None = None, rules=()):
        self.explainer = Explainer(model, cache_bytes=0, channels_last=channels_last, rules=rules)
        self.batch_size, self.memory_budget, self.min_speedup = batch_size, memory_budget, min_speedup
        self._image: torch.Tensor | None = None
        self._mats = None
        self._fingerprint = None
        self.last_run: ChangeRun | None = None

    @property
    def model(self) -> nn.Module:
        return self.explainer.model

    def reference(self, image: torch.Tensor) -> torch.Tensor:
        """Materialize `image` ((C, H, W) or (1, C, H, W)) as the reference; returns model(image)."""
        self.explainer._check_model()
        self._image = _as_batch(image, self.explainer.dtype).to(self.explainer.device)
        self._mats, _ = self.explainer.materialized(self._image, stock_layout=True)
        self._fingerprint = self.explainer._fingerprint
        return self._mats.output.clone()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """model(images) for a batch (N, C, H, W) of images shaped like the reference."""
        if self._image is None:
            raise OptionError("reference", None, "an image given to reference() first", "is missing")
        ref = self._image
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != tuple(ref.shape[1:]):
            raise OptionError("images", getattr(images, "shape", type(images).__name__),
                              f"a tensor (N, {', '.join(map(str, ref.shape[1:]))}) like the reference", "has the wrong shape")
        if images.dtype != ref.dtype:
            raise OptionError("images", f"dtype {images.dtype}", f"the model's dtype {ref.dtype}", "does not match")
        self.explainer._check_model()
        if self.explainer._fingerprint != self._fingerprint:  # weights changed: the reference is stale
            self.reference(ref)
        images = images.to(ref.device)
        _, _, h, w = ref.shape
        changed = (images != ref).any(dim=1).cpu().numpy()
        lo, hi = changes.boxes(changed)
        origins, sizes = changes.bucketed_rects(lo, hi, h, w)
        self.last_run = self.explainer.run_changes(
            ref, origins, sizes, lambda idx: changes.gather_rects(images, idx, origins[idx], tuple(sizes[idx[0]])),
            batch_size=self.batch_size, memory_budget=self.memory_budget, min_speedup=self.min_speedup, mats=self._mats)
        return self.last_run.outputs

    __call__ = forward
