"""Public entry points: explain(), Explainer (with plan and activation caches), estimate_speedup()."""
from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from . import geometry as geo
from . import ops
from .capture import Capture
from .grouping import choose_groups
from .execute import BatchRunner, Materialized, materialize
from .plan import Plan, build_plan

METHODS = ("incremental", "naive")
NAMED_FILLS = {"black": 0.0, "gray": 0.5, "grey": 0.5}  # on [0, 1] RGB, before normalization
DEFAULT_MEMORY_BUDGET = 1 << 30
MAX_AUTO_BATCH = 256
ALLOCATOR_OVERHEAD = 3  # measured peak RSS / planned live bytes, worst case seen (EfficientNet-Lite0)


@dataclass
class Explanation:
    """An occlusion heatmap and how it was computed.

    heatmap[i, j] is the softmax probability of `label` with the patch's top-left corner at
    (i * stride, j * stride); low values mark the regions the prediction depends on.
    """

    heatmap: torch.Tensor
    label: int
    probability: float
    predicted: int
    patch_size: int
    stride: int
    fill: list[float]
    batch_size: int
    method: str
    image_shape: tuple[int, int]
    timings_ms: dict[str, float]
    memory: dict[str, int]
    theoretical_speedup: float
    cache: str
    executed_speedup: float = 1.0  # conv multiply-adds of full inference / those actually executed
    groups: int = 1  # position groups run as separate plans (tighter windows near borders)
    tau: float = 1.0
    extra: dict = field(default_factory=dict)

    @property
    def positions(self) -> int:
        return int(self.heatmap.numel())

    def attribution(self) -> torch.Tensor:
        """Captum-style view: input-shaped mean drop (clean - occluded) over the windows covering each pixel.

        Only windows that lie fully inside the image are used (Captum also adds cut-off windows at the
        far border), so pixels that no window covers get 0.
        """
        h, w = self.image_shape
        p, s = self.patch_size, self.stride
        drop = (self.probability - self.heatmap.double()).numpy()
        total, count = np.zeros((h + 1, w + 1)), np.zeros((h + 1, w + 1))
        gh, gw = drop.shape
        ys, xs = np.meshgrid(np.arange(gh) * s, np.arange(gw) * s, indexing="ij")
        for dy, dx, sign in ((0, 0, 1), (p, 0, -1), (0, p, -1), (p, p, 1)):  # 2-D difference array
            np.add.at(total, (ys + dy, xs + dx), sign * drop)
            np.add.at(count, (ys + dy, xs + dx), sign)
        total = total.cumsum(0).cumsum(1)[:h, :w]
        count = count.cumsum(0).cumsum(1)[:h, :w]
        out = np.divide(total, count, out=np.zeros_like(total), where=count > 0.5)
        return torch.from_numpy(out)

    def to_dict(self) -> dict:
        return {
            "heatmap": self.heatmap.tolist(), "label": self.label, "probability": self.probability,
            "predicted": self.predicted, "positions": self.positions, "patch_size": self.patch_size,
            "stride": self.stride, "fill": self.fill, "batch_size": self.batch_size, "method": self.method,
            "tau": self.tau, "timings_ms": self.timings_ms, "memory": self.memory,
            "theoretical_speedup": self.theoretical_speedup, "executed_speedup": self.executed_speedup,
            "groups": self.groups, "cache": self.cache, **self.extra,
        }


class _LRU:
    """A byte-bounded LRU cache (materialized activations) or a count-bounded one (plans)."""

    def __init__(self, capacity: int, weigh=lambda v: 1):
        self.capacity, self.weigh = capacity, weigh
        self.items: OrderedDict = OrderedDict()
        self.used = 0

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        return None

    def put(self, key, value):
        weight = self.weigh(value)
        if weight > self.capacity:
            return
        if key in self.items:
            self.used -= self.weigh(self.items.pop(key))
        self.items[key] = value
        self.used += weight
        while self.used > self.capacity:
            _, old = self.items.popitem(last=False)
            self.used -= self.weigh(old)


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.get_default_dtype()


def _as_batch(image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must have shape (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
    if image.dtype != dtype:
        raise ValueError(f"image dtype {image.dtype} must match the model's dtype {dtype}")
    if not torch.isfinite(image).all():
        raise ValueError("image contains NaN or infinite values")
    return image.contiguous()


def fill_values(fill, channels: int, normalize=None) -> list[float]:
    """Per-channel values written over the patch, in the model's (normalized) input space."""
    if isinstance(fill, str):
        if normalize is None:
            raise ValueError(f"fill={fill!r} needs normalize=(mean, std) to be converted to the model's input "
                             "space; pass a number instead")
        mean, std = (list(map(float, v)) for v in normalize)
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"normalize needs {channels} means and stds, got {len(mean)} and {len(std)}")
        if fill == "mean":
            return [0.0] * channels
        if fill not in NAMED_FILLS:
            raise ValueError(f"fill={fill!r} is not allowed: use a number or one of gray, black, mean")
        return [(NAMED_FILLS[fill] - m) / s for m, s in zip(mean, std)]
    values = [fill] if isinstance(fill, (int, float)) else list(fill) if isinstance(fill, (list, tuple)) else None
    if values is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"fill={fill!r} must be a number, a list of {channels} numbers or gray/black/mean")
    if len(values) == 1:
        values = values * channels
    if len(values) != channels or not all(math.isfinite(v) for v in values):
        raise ValueError(f"fill={fill!r} must have 1 or {channels} finite values")
    return [float(v) for v in values]


def choose_batch_size(bytes_per_position: int, positions: int, memory_budget: int | None) -> int:
    """The largest batch whose working set fits `memory_budget` (at most MAX_AUTO_BATCH).

    The plan's working set counts live tensors only; the peak RSS measured around a run was up to
    ~3x that (allocator reuse, oneDNN reorders and scratch), so the budget is divided by that factor.
    """
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise ValueError(f"memory_budget={memory_budget!r} must be a positive number of bytes")
    return max(1, min(positions, MAX_AUTO_BATCH, budget // (ALLOCATOR_OVERHEAD * max(1, bytes_per_position))))


def _checked_origins(origins, height: int, width: int, patch_size: int) -> np.ndarray:
    """Explicit patch positions (top-left corners) that must keep the patch inside the image."""
    origins = np.asarray(origins, dtype=np.int64)
    if origins.ndim != 2 or origins.shape[1] != 2 or len(origins) == 0:
        raise ValueError(f"origins must be a non-empty (n, 2) array of (y, x) corners, got shape {origins.shape}")
    low, high = origins.min(axis=0), origins.max(axis=0)
    if low.min() < 0 or high[0] > height - patch_size or high[1] > width - patch_size:
        raise ValueError(f"origins must lie in 0..{height - patch_size} (y) and 0..{width - patch_size} (x) "
                         f"for patch_size={patch_size}")
    return origins


def _image_key(image: torch.Tensor) -> str:
    data = image.detach().cpu().contiguous()
    digest = hashlib.blake2b(data.numpy().tobytes(), digest_size=16)
    digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
    return digest.hexdigest()


class Explainer:
    """Explanations for one model, with a plan cache and an LRU cache of materialized activations.

    cache_bytes bounds the activations kept between calls (keyed by the image's hash), so a second
    explanation of the same image with other options does not re-run the clean image.
    """

    def __init__(self, model: nn.Module, cache_bytes: int = 512 << 20, max_plans: int = 32,
                 channels_last: bool | None = None):
        self.model = model
        self.capture = Capture(model)
        self.dtype = _model_dtype(model)
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._plans = _LRU(max_plans)
        self._mats = _LRU(int(cache_bytes), weigh=lambda m: m.nbytes)
        self._groups: dict = {}
        # channels_last windows and projections (measured on the 2-core CPU, one process, stride 16):
        # Inception3 1.57x, VGG16 1.16x, ResNet18 1.07x faster than NCHW; EfficientNet-Lite0's depthwise
        # convolutions ~1.5x. The projected full tensors inherit the layout, so the global part gains too.
        self.channels_last = True if channels_last is None else bool(channels_last)

    # ---- caches ---------------------------------------------------------------------------------
    def plan(self, input_shape, patch_size: int, stride: int, tau: float = 1.0, origins=None) -> Plan:
        origin_key = None if origins is None else hashlib.blake2b(np.asarray(origins, np.int64).tobytes()).hexdigest()
        key = (tuple(input_shape), patch_size, stride, float(tau), origin_key)
        plan = self._plans.get(key)
        if plan is None:
            plan = build_plan(self.capture, input_shape, self.dtype, patch_size, stride, tau, origins)
            self._plans.put(key, plan)
        return plan

    def prepare(self, input_shape, patch_size: int, stride: int, tau: float = 1.0) -> None:
        """Build and cache every plan explain() needs for the full grid (e.g. when a server starts)."""
        h, w = input_shape[2], input_shape[3]
        origins = geo.grid_origins(h, w, patch_size, stride)
        for group in self.groups(tuple(input_shape), patch_size, stride, tau):
            self.plan(tuple(input_shape), patch_size, stride, tau, origins[group])
        self.estimate(tuple(input_shape), patch_size, stride, tau)

    def clear_cache(self) -> None:
        """Forget the materialized activations kept between calls (plans stay cached)."""
        self._mats = _LRU(self._mats.capacity, weigh=self._mats.weigh)

    def materialized(self, image: torch.Tensor) -> tuple[Materialized, str]:
        key = _image_key(image)
        mats = self._mats.get(key)
        if mats is not None:
            return mats, "hit"
        mats = materialize(self.capture, image)
        self._mats.put(key, mats)
        return mats, "miss"

    # ---- the verb -------------------------------------------------------------------------------
    def explain(self, image: torch.Tensor, patch_size: int = 16, stride: int = 4, fill=0.0, target=None,
                batch_size: int | None = None, method: str = "incremental", normalize=None,
                memory_budget: int | None = None, tau: float = 1.0, origins=None, target_ssim=None,
                drilldown=None, mode=None, progress=None) -> Explanation:
        if target_ssim is not None or drilldown not in (None, False) or mode is not None:
            # Approximate OBE: tau from a target SSIM, adaptive drill-down, mode shortcut (approx.py).
            from .approx import explain_approximate
            return explain_approximate(self, image, patch_size=patch_size, stride=stride, fill=fill,
                                       target=target, batch_size=batch_size, method=method, normalize=normalize,
                                       memory_budget=memory_budget, tau=tau, origins=origins,
                                       target_ssim=target_ssim, drilldown=drilldown, mode=mode, progress=progress)
        t0 = time.perf_counter()
        image = _as_batch(image, self.dtype).to(self.device)
        _, c, h, w = image.shape
        geo.grid_shape(h, w, patch_size, stride)
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not allowed: use one of {', '.join(METHODS)}")
        if not (isinstance(tau, (int, float)) and 0.0 < tau <= 1.0):
            raise ValueError(f"tau={tau!r} is out of range: allowed (0, 1]")
        if method == "naive" and tau != 1.0:
            raise ValueError("tau < 1 is an approximation of the incremental method; use method='incremental'")
        values = fill_values(fill, c, normalize)
        if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                       or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} is out of range: allowed integers >= 1")
        shape = tuple(image.shape)
        all_origins = geo.grid_origins(h, w, patch_size, stride) if origins is None else \
            _checked_origins(origins, h, w, patch_size)
        mats, cache = self.materialized(image)
        probs = torch.softmax(mats.output.double(), dim=1)[0]
        classes = probs.numel()
        predicted = int(probs.argmax())
        label = predicted if target is None else target
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < classes:
            raise ValueError(f"target={target!r} is out of range: allowed 0..{classes - 1}")
        t1 = time.perf_counter()

        n = len(all_origins)
        if method == "incremental":
            # an explicit list of origins (drill-down) runs as one group
            groups = self.groups(shape, patch_size, stride, tau) if origins is None else [np.arange(n)]
            plans = [self.plan(shape, patch_size, stride, tau, all_origins[g]) for g in groups]
            per_position = max(p.peak_bytes_per_position for p in plans)
        else:
            groups = [np.arange(n)]
            plans = [self.plan(shape, patch_size, stride, tau, all_origins)]
            per_position = self._naive_bytes(plans[0])
        batch = min(n, batch_size) if batch_size else choose_batch_size(per_position, n, memory_budget)
        fill_t = torch.tensor(values, dtype=self.dtype, device=self.device).view(c, 1, 1)
        scores = torch.empty(n, dtype=torch.float64)
        full_macs, executed_macs = 0, 0
        for indices, plan in zip(groups, plans):
            run = self._incremental_runner(plan, mats, fill_t) if method == "incremental" else \
                self._naive_runner(plan, image, fill_t)
            full, inc = plan.macs()
            full_macs += full * len(indices)
            executed_macs += (inc if method == "incremental" else full) * len(indices)
            for start in range(0, len(indices), batch):
                stop = min(len(indices), start + batch)
                logits = run(start, stop)
                scores[indices[start:stop]] = torch.softmax(logits.double(), dim=1)[:, label].cpu()
        theoretical = self.estimate(shape, patch_size, stride, tau).theoretical_speedup()
        t2 = time.perf_counter()

        grid = geo.grid_shape(h, w, patch_size, stride) if origins is None else (1, n)
        heatmap = scores.view(grid).to(self.dtype)
        return Explanation(
            heatmap=heatmap, label=label, probability=float(probs[label]), predicted=predicted,
            patch_size=patch_size, stride=stride, fill=values, batch_size=batch, method=method,
            image_shape=(h, w),
            timings_ms={"materialize": 0.0 if cache == "hit" else (t1 - t0) * 1e3, method: (t2 - t1) * 1e3,
                        "total": (t2 - t0) * 1e3},
            memory={"materialized_bytes": mats.nbytes, "peak_working_bytes": per_position * batch},
            theoretical_speedup=theoretical,
            executed_speedup=full_macs / executed_macs if executed_macs else 1.0,
            groups=len(groups), cache=cache, tau=float(tau),
        )

    def groups(self, input_shape, patch_size: int, stride: int, tau: float = 1.0) -> list:
        """Position groups of the full grid that run as separate plans with tighter windows (grouping.py).

        Returns row-major index arrays into geometry.grid_origins(...); cached per shape/patch/stride/tau.
        """
        key = (tuple(input_shape), patch_size, stride, float(tau))
        if key not in self._groups:
            h, w = input_shape[2], input_shape[3]
            origins = geo.grid_origins(h, w, patch_size, stride)

            def cost(indices):
                return self.plan(input_shape, patch_size, stride, tau, origins[indices]).macs()[1] * len(indices)

            self._groups[key] = choose_groups(geo.grid_shape(h, w, patch_size, stride), stride, cost)
        return self._groups[key]

    def estimate(self, input_shape, patch_size: int, stride: int, tau: float = 1.0) -> Plan:
        """The plan of one position with the patch at the centre (the paper's worst case)."""
        h, w = input_shape[2], input_shape[3]
        geo.grid_shape(h, w, patch_size, stride)
        return self.plan(input_shape, patch_size, stride, tau, geo.centre_origin(h, w, patch_size))

    def _incremental_runner(self, plan, mats, fill_t):
        return BatchRunner(self.capture, plan, mats, fill_t, self.channels_last).run

    def _naive_runner(self, plan: Plan, image: torch.Tensor, fill_t: torch.Tensor):
        """Batched full re-inference of every occluded image: the baseline, kept for verification."""
        origins = torch.from_numpy(plan.origins).to(image.device)
        zeros = torch.zeros_like(origins)
        clean = image[0]
        p = plan.patch_size

        @torch.no_grad()
        def run(start, stop):
            b = stop - start
            patch = fill_t.expand(b, clean.shape[0], p, p).contiguous()
            batch = ops.stitch(clean, patch, origins[start:stop], zeros[start:stop], clean.shape[1],
                               clean.shape[2], 0.0)
            return self.model(batch)

        return run

    def _naive_bytes(self, plan: Plan) -> int:
        """Per-position working set of full inference: the two largest consecutive activations."""
        sizes = [int(math.prod(s[1:])) for s in plan.shapes.values() if s is not None]
        pairs = [a + b for a, b in zip(sizes, sizes[1:])] or sizes
        return max(pairs) * torch.empty((), dtype=self.dtype).element_size()


def explain(model: nn.Module, image: torch.Tensor, **options) -> Explanation:
    """One-shot occlusion explanation; see Explainer.explain for the options."""
    return Explainer(model).explain(image, **options)


@dataclass
class SpeedupEstimate:
    speedup: float
    full_macs: int
    incremental_macs: int
    layers: list[dict]

    def __float__(self) -> float:
        return self.speedup


def estimate_speedup(model: nn.Module, input_shape, patch_size: int = 16, stride: int = 4,
                     tau: float = 1.0) -> SpeedupEstimate:
    """Theoretical speedup (conv multiply-adds, patch at the centre) without running inference."""
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    plan = Explainer(model, cache_bytes=0).estimate(shape, patch_size, stride, tau)
    full, inc = plan.macs()
    layers = [{"name": c.name, "kind": c.kind, "full_macs": c.full_macs, "incremental_macs": c.incremental_macs,
               "speedup": c.full_macs / c.incremental_macs if c.incremental_macs else 1.0} for c in plan.layers]
    return SpeedupEstimate(full / inc if inc else 1.0, full, inc, layers)
