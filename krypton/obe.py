"""Public entry points: explain(), Explainer (with plan and activation caches), estimate_speedup()."""
from __future__ import annotations

import hashlib
import math
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn as nn

from . import approx
from . import changes
from . import formats
from . import geometry as geo
from . import ops
from .budget import MemoryModel, calibrate, fit_batch
from .capture import Capture
from .errors import OptionError
from .execute import BatchRunner, Materialized, constant_content, laid_out_weights, materialize, tensor_content
from .grouping import choose_groups
from .memory import batch_arena
from .options import DEFAULT_MEMORY_BUDGET, PRECISIONS, ExplainOptions, check_precision, resolve
from .plan import Plan, Walk, build_plan, propagate_shapes
from .tuning import tuning_for



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
    true_change_speedup: float = 1.0  # full / windows fitted to each position's own change (plan.Costed)
    groups: int = 1  # position groups run as separate plans (tighter windows near borders)
    tau: float = 1.0
    precision: str = "float32"  # what the occluded positions ran in (the clean image: the model's dtype)
    incremental: bool = True  # False: every position ran full inference (method naive, untraceable model)
    fallback_reason: str | None = None  # why it is not incremental, or where the incremental part ends
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
        """Plain JSON types only: what a server sends (it adds its own fields next to these)."""
        heatmap = self.heatmap.detach().double().cpu()
        return _jsonable({
            "heatmap": heatmap.tolist(), "heatmap_shape": list(heatmap.shape), "label": self.label,
            "probability": self.probability, "predicted": self.predicted, "positions": self.positions,
            "patch_size": self.patch_size, "stride": self.stride, "fill": self.fill, "batch_size": self.batch_size,
            "method": self.method, "tau": self.tau, "precision": self.precision, "incremental": self.incremental,
            "fallback_reason": self.fallback_reason, "timings_ms": self.timings_ms, "memory": self.memory,
            "theoretical_speedup": self.theoretical_speedup, "executed_speedup": self.executed_speedup,
            "true_change_speedup": self.true_change_speedup, "groups": self.groups, "cache": self.cache, **self.extra,
        })


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return value.tolist()
    return value


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

    def clear(self) -> None:
        self.items.clear()
        self.used = 0

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

    __setitem__ = put


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        return p.dtype
    return torch.get_default_dtype()


def even_batch(positions: int, batch: int) -> int:
    """A batch size <= `batch` that runs `positions` in as few batches as `batch` does, of (nearly) equal
    sizes: 196 positions at batch 191 run as 98 + 98, not 191 + 5 (a tiny last batch costs nearly as much
    as a full one: the weights are read and every op is dispatched all the same)."""
    batches = max(1, -(-positions // max(1, batch)))
    return max(1, -(-positions // batches))


def batch_slices(positions: int, batch: int) -> list[tuple[int, int]]:
    """(start, stop) of every batch of `positions` at a batch size of at most `batch` (see even_batch)."""
    step = even_batch(positions, batch)
    return [(start, min(positions, start + step)) for start in range(0, positions, step)]


def _as_batch(image: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        raise OptionError("image", type(image).__name__, "a torch.Tensor", "is not a tensor")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise OptionError("image", f"shape {tuple(image.shape)}", "shape (C, H, W) or (1, C, H, W)", "has the wrong shape")
    if image.dtype != dtype:
        raise OptionError("image", f"dtype {image.dtype}", f"the model's dtype {dtype}", "does not match")
    if not torch.isfinite(image).all():
        raise OptionError("image", "with NaN or infinite values", "finite values", "is not finite")
    return image.contiguous()


def _image_key(image: torch.Tensor) -> str:
    """The hash of a tensor's bytes, shape and dtype (any dtype: numpy sees its bytes, never bf16 values)."""
    data = image.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16)
    digest.update(f"{tuple(image.shape)}{image.dtype}".encode())
    return digest.hexdigest()


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _fingerprint(model: nn.Module) -> tuple:
    """Identity and in-place version of every parameter and buffer: changes when the weights change."""
    return tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in (*model.parameters(), *model.buffers()))


MIN_SPEEDUP = 1.25  # a change group whose plan saves less than this runs stock full inference


@dataclass
class ChangeRun:
    """Outputs of Explainer.run_changes and how each rect-size group ran."""

    outputs: torch.Tensor  # [N, classes]
    unchanged: int = 0  # positions with an empty rect: the clean output
    groups: list = field(default_factory=list)  # per size group: size, positions, method, speedup, batch
    full_macs: int = 0
    executed_macs: int = 0
    fallback_reason: str | None = None  # the model is not traceable: every group ran stock inference

    @property
    def stock_positions(self) -> int:
        return sum(g["positions"] for g in self.groups if g["method"] == "naive")

    @property
    def executed_speedup(self) -> float:
        return self.full_macs / self.executed_macs if self.executed_macs else 1.0


@dataclass
class _Run:
    """One pass over a set of positions (a whole explanation, or one drill-down stage)."""

    explanation: Explanation
    full_macs: int  # conv multiply-adds that naive re-inference of these positions would run
    executed_macs: int  # those this run executed
    changed_macs: float  # those of the cells that really changed (the true-change bound)


class Explainer:
    """Explanations for one model, with plan caches and an LRU cache of materialized activations.

    cache_bytes bounds the activations kept between calls (keyed by the image's hash), so a second
    explanation of the same image with other options does not re-run the clean image. Plans are cached
    per (input shape, patch, stride, tau): `max_grids` full grids (each grid's position groups as one
    entry, so a grid is never half evicted) and `max_plans` plans of explicit positions (drill-down's
    stage 2). `rules` are extra op-kind rules (krypton.rules.Rule), tried before the built-in ones.
    When the model's weights change in place (training, load_state_dict), every cache is dropped.
    A low `precision` (explain) runs the occluded positions on a converted copy of the traced model (built
    once per dtype, the model itself untouched) with its own plans and a cast copy of the activations.
    `model` may also be a torch.export ExportedProgram (incremental over its aten graph) or a TorchScript
    module (naive, with fallback_reason "TorchScript model: not traceable by torch.fx"); see formats.py.
    """

    def __init__(self, model: nn.Module, cache_bytes: int = 512 << 20, max_plans: int = 32,
                 channels_last: bool | None = None, rules=(), max_grids: int = 8):
        model = formats.as_module(model)
        self._model_ref = lambda m=model: m
        self._rules = tuple(rules)
        self.capture = Capture(model, self._rules)
        self.dtype = _model_dtype(model)
        self.device = self.capture.device
        self._plans = _LRU(max_plans)
        self._grids = _LRU(max_grids)
        self._mats = _LRU(int(cache_bytes), weigh=lambda m: m.nbytes)
        self._groups = _LRU(64)  # keyed by request options (tau is any float): bounded like every cache here
        self._estimates = _LRU(64)
        self._reads = _LRU(64)  # input shape -> the clean activations its plans read (_needed)
        self._opaque_bytes: dict = {}  # (input shape, dtype) -> measured per-position bytes of an opaque model
        self._converted: dict = {}  # dtype -> Capture.converted(dtype): what a low precision runs on
        self._fingerprint = _fingerprint(model)
        self.plan_builds = 0  # plans built so far (cache misses), for tests and logs
        self.memory_models = {"incremental": MemoryModel(), "naive": MemoryModel()}  # see budget.py
        # channels_last windows and projections (measured on the 2-core CPU, one process, stride 16):
        # Inception3 1.57x, VGG16 1.16x, ResNet18 1.07x faster than NCHW; EfficientNet-Lite0's depthwise
        # convolutions ~1.5x. The projected full tensors inherit the layout, so the global part gains too.
        self.channels_last = True if channels_last is None else bool(channels_last)

    @property
    def model(self) -> nn.Module:
        return self._model_ref()

    # ---- caches ---------------------------------------------------------------------------------
    def _check_model(self) -> None:
        """Drop every cache (and re-capture) when the model's weights changed since they were filled."""
        fingerprint = _fingerprint(self.model)
        if fingerprint != self._fingerprint:
            self.capture = Capture(self.model, self._rules)
            self._converted.clear()
            for cache in (self._plans, self._grids, self._mats, self._estimates, self._groups, self._reads):
                cache.clear()
            self._fingerprint = fingerprint

    def capture_in(self, dtype: torch.dtype | None = None) -> Capture:
        """The capture that runs positions in `dtype` (None: the model's own): this one, or a converted copy
        of it (Capture.converted: weights cast, folded batch norms and shapes of its own; built once)."""
        if dtype is None or dtype == self.dtype:
            return self.capture
        if dtype not in self._converted:
            self._converted[dtype] = self.capture.converted(dtype)
        return self._converted[dtype]

    def _check_precision_runs(self, input_shape, precision: str, dtype: torch.dtype | None) -> None:
        """A model that cannot run in the requested precision (a TorchScript module or a program with
        float32 hard-wired, an op without that dtype) is an OptionError naming `precision`, not a crash."""
        if dtype is None or dtype == self.dtype:
            return
        try:
            propagate_shapes(self.capture_in(dtype), tuple(input_shape), dtype)  # one zero image, cached
        except Exception as exc:  # noqa: BLE001 - any failure means: not in this precision
            self._converted.pop(dtype, None)
            raise OptionError("precision", precision, "float32 for this model", f"does not run: the model fails in "
                              f"{dtype} ({type(exc).__name__}: {str(exc)[:200]})") from None

    def _build(self, input_shape, patch_size, stride, tau, origins, dtype) -> Plan:
        self.plan_builds += 1
        capture = self.capture_in(dtype)
        plan = build_plan(capture, input_shape, dtype, patch_size, stride, tau, origins)
        laid_out_weights(capture, plan, self.channels_last)  # now, outside any batch arena (see there)
        return plan

    def plan(self, input_shape, patch_size: int, stride: int, tau: float = 1.0, origins=None,
             dtype: torch.dtype | None = None) -> Plan:
        """The plan of one set of positions run as one group (default: the whole grid) in `dtype` (None: the
        model's); cached."""
        dtype = dtype or self.dtype
        origin_key = None if origins is None else hashlib.blake2b(np.asarray(origins, np.int64).tobytes()).hexdigest()
        key = (tuple(input_shape), patch_size, stride, float(tau), origin_key, dtype)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._build(input_shape, patch_size, stride, tau, origins, dtype)
            self._plans.put(key, plan)
        return plan

    def grid_plans(self, input_shape, patch_size: int, stride: int, tau: float = 1.0,
                   dtype: torch.dtype | None = None) -> list[tuple[np.ndarray, Plan]]:
        """(position indices, plan) of every position group of the full grid (see groups()) in `dtype`
        (None: the model's); cached. The groups come from geometry alone: the same in every dtype."""
        dtype = dtype or self.dtype
        key = (tuple(input_shape), patch_size, stride, float(tau), dtype)
        plans = self._grids.get(key)
        if plans is None:
            origins = geo.grid_origins(input_shape[2], input_shape[3], patch_size, stride)
            plans = [(g, self._build(input_shape, patch_size, stride, tau, origins[g], dtype))
                     for g in self.groups(input_shape, patch_size, stride, tau)]
            self._grids.put(key, plans)
        return plans

    def prepare(self, input_shape, patch_size: int, stride: int, tau: float = 1.0, precision: str = "float32") -> None:
        """Build and cache the plans explain() needs for the full grid (e.g. when a server starts)."""
        self._check_model()
        dtype = PRECISIONS[check_precision(precision, self.device)]
        self._check_precision_runs(input_shape, precision, dtype)
        self.grid_plans(tuple(input_shape), patch_size, stride, tau, dtype)
        self.estimate(tuple(input_shape), patch_size, stride, tau)

    def calibrate_memory(self, input_shape, patch_size: int = 16, stride: int = 4,
                         memory_budget: int = DEFAULT_MEMORY_BUDGET) -> dict:
        """Measure this model's memory model (budget.py) with a few probe runs per method and use it from
        now on to choose batch sizes and to estimate each run's peak. Returns {method: MemoryModel}."""
        self._check_model()
        self.memory_models = calibrate(self, tuple(input_shape), patch_size, stride, memory_budget)
        return dict(self.memory_models)

    def _probe(self, image: torch.Tensor, method: str, batch: int, patch_size: int, stride: int,
               positions_per_group: int, held: Materialized | None = None) -> Explanation:
        """One probe of the memory calibration (budget.calibrate): explain()'s run of the grid of `image`
        (1, C, H, W) with `method` at `batch`, only `positions_per_group` positions of each position group:
        the plans, tensor shapes and order of a whole request at a fraction of its time (the heatmap's other
        cells are not set). `held`: the image's clean activations (_probe_clean), or None: the probe makes
        them, as a request that misses the cache does."""
        opts = resolve(tuple(image.shape), None, lambda: None, patch_size=patch_size, stride=stride,
                       batch_size=batch, method=method, memory_budget=1 << 62)  # the batch as given
        return self._run(image, opts, time.perf_counter(), positions_per_group, held).explanation

    def _probe_clean(self, image: torch.Tensor, method: str, patch_size: int, stride: int) -> Materialized:
        """The clean pass of `image` that a `method` request of its grid makes on a cache miss: the
        activations its plans read (none for naive). The cache is left empty, as the probes expect."""
        shape = tuple(image.shape)
        needed = self._needed(shape, self.grid_plans(shape, patch_size, stride)) if method == "incremental" and \
            self.capture.trace_failure is None else frozenset()
        mats = self.materialized(image, needed=needed)[0]
        self.clear_cache()
        return mats

    def clear_cache(self) -> None:
        """Forget the materialized activations kept between calls (plans stay cached)."""
        self._mats.clear()

    def materialized(self, image: torch.Tensor, dtype: torch.dtype | None = None,
                     clean: Materialized | None = None, stock_layout: bool = False,
                     needed: frozenset[str] | None = None) -> tuple[Materialized, str]:
        """The clean image's activations (cached by the image's hash), in the model's dtype or cast to `dtype`
        for a low-precision run (cached next to them, keyed by the dtype too). `clean`: the model-dtype
        activations of the same image, when the caller holds them already (cast, not looked up again).
        `stock_layout`: run the clean pass in the image's own layout, so that its output is model(image) bit
        for bit (IncrementalModel.reference); by default it runs in the windows' layout (see _materialize).
        `needed`: the nodes whose values the caller's plans read (Plan.clean_reads; None: all): only those
        are kept, and a cached copy that lacks one is a miss (the clean pass runs again, keeping both)."""
        dtype = dtype or self.dtype
        stock_layout = stock_layout or not self.channels_last
        key = (_image_key(image), dtype, stock_layout)
        mats = self._mats.get(key)
        if mats is not None and mats.covers(needed):
            return mats, "hit"
        keep = None if needed is None else needed | (mats.kept if mats is not None else frozenset())
        if dtype == self.dtype:
            mats = materialize(self.capture, image, keep) if stock_layout else self._materialize(image, keep)
        else:  # the model's own clean run, cast: closer to it than a clean run in the low precision
            if clean is None or not clean.covers(keep):
                clean = self.materialized(image, stock_layout=stock_layout, needed=keep)[0]
            mats = clean.converted(self.capture_in(dtype), dtype)
        self._mats.put(key, mats)
        return mats, "miss"

    def _materialize(self, image: torch.Tensor, keep: frozenset[str] | None = None) -> Materialized:
        """The clean run in channels_last (the windows' layout): its activations are then already laid out
        for the stitch op (Materialized.planar), not copied once more (Inception3: a probe run's peak
        270 -> 215 MB, and faster); its logits differ from model(image)'s by float rounding only. A model
        that rejects channels_last inputs gets its own layout."""
        if image.dim() == 4:
            try:
                return materialize(self.capture, image.contiguous(memory_format=torch.channels_last), keep)
            except RuntimeError:  # e.g. a .view() of a spatial map: only contiguous tensors allow it
                pass
        return materialize(self.capture, image, keep)

    def groups(self, input_shape, patch_size: int, stride: int, tau: float = 1.0) -> list:
        """Position groups of the full grid that run as separate plans with tighter windows (grouping.py).

        Returns row-major index arrays into geometry.grid_origins(...); cached per shape/patch/stride/tau.
        Candidates are priced from geometry alone (a Walk per candidate group): no plan is built.
        """
        key = (tuple(input_shape), patch_size, stride, float(tau))
        groups = self._groups.get(key)
        if groups is None:
            h, w = input_shape[2], input_shape[3]
            origins = geo.grid_origins(h, w, patch_size, stride)

            def cost(indices):
                walk = Walk(self.capture, input_shape, self.dtype, patch_size, tau, origins[indices])
                return walk.macs()[1] * len(indices)

            groups = choose_groups(geo.grid_shape(h, w, patch_size, stride), stride, cost)
            self._groups.put(key, groups)
        return groups

    def estimate(self, input_shape, patch_size: int, stride: int, tau: float = 1.0) -> Walk:
        """Costs of one position with the patch at the centre (the paper's worst case); no plan is built."""
        key = (tuple(input_shape), patch_size, stride, float(tau))
        walk = self._estimates.get(key)
        if walk is None:
            h, w = input_shape[2], input_shape[3]
            geo.grid_shape(h, w, patch_size, stride)
            walk = Walk(self.capture, input_shape, self.dtype, patch_size, tau, geo.centre_origin(h, w, patch_size))
            self._estimates.put(key, walk)
        return walk

    def num_classes(self, input_shape) -> int | None:
        """The model's number of outputs for an input shape (one zero-image run per shape, cached)."""
        shapes = propagate_shapes(self.capture, tuple(input_shape), self.dtype)
        out = next((n for n in self.capture.nodes if n.op == "output"), None)
        arg = out.args[0] if out is not None else None
        shape = shapes.get(arg) if isinstance(arg, torch.fx.Node) else None
        return int(shape[-1]) if shape is not None and len(shape) == 2 else None

    # ---- arbitrary changes of the input (Captum windows, segments, edited images) ------------------
    def plan_changes(self, input_shape, origins, sizes, min_speedup: float = MIN_SPEEDUP) -> list[tuple]:
        """(size, indices, plan, incremental, theoretical speedup) per rect-size group (see run_changes);
        plans are cached, so pricing a call first costs nothing more when it then runs."""
        origins = np.asarray(origins, np.int64).reshape(-1, 2)
        groups = []
        for size, indices in changes.group_by_size(sizes):
            plan = self.plan(tuple(input_shape), size, 1, 1.0, origins[indices])
            speedup = plan.theoretical_speedup()
            groups.append((size, indices, plan, self.capture.trace_failure is None and speedup >= min_speedup, speedup))
        return groups

    def run_changes(self, image: torch.Tensor, origins, sizes, content, batch_size: int | None = None,
                    memory_budget: int = DEFAULT_MEMORY_BUDGET, min_speedup: float = MIN_SPEEDUP,
                    mats: Materialized | None = None) -> "ChangeRun":
        """The model's output for N changed copies of `image`, incrementally where it pays off.

        Copy i differs from `image` (1, C, H, W) only inside the rect at `origins[i]` (y, x) of
        `sizes[i]` (h, w) (a zero size: no change), which holds `content(indices)` -> [len(indices), C,
        h, w] (the changed image's pixels there, for positions `indices` that share one rect size).
        Positions are grouped by rect size, one plan per group (OBE's constant patch is the special
        case `explain` runs). A group whose plan saves less than `min_speedup` (conv multiply-adds of
        full / incremental inference), or a model the engine cannot trace, runs stock full inference
        of the changed images instead. Returns ChangeRun: outputs [N, classes] as model(copies) gives.
        """
        self._check_model()
        image = _as_batch(image, self.dtype).to(self.device)
        shape = tuple(image.shape)
        origins = np.asarray(origins, np.int64).reshape(-1, 2)
        sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
        n = len(origins)
        groups = self.plan_changes(shape, origins, sizes, min_speedup)  # plans: before the arena, as in explain()
        with batch_arena():  # from the clean pass on, as in explain()
            clean_pass = False  # the caller's activations, or cached ones: no clean pass in this call
            if mats is None:
                mats, cache = self.materialized(image)
                clean_pass = cache == "miss"
            outputs = mats.output.expand(n, -1).clone()  # unchanged copies: the clean output
            run = ChangeRun(outputs, unchanged=n)
            for size, indices, plan, incremental, speedup in groups:
                full, inc = plan.macs()
                method = "incremental" if incremental else "naive"
                per_position = plan.peak_bytes_per_position if incremental else self._naive_bytes(plan)
                batch = fit_batch(self.memory_models[method], per_position, len(indices), memory_budget,
                                  mats.nbytes, batch_size, clean_pass=clean_pass)
                group_content = (lambda idx: lambda start, stop: content(idx[start:stop]))(indices)
                runner = self._incremental_runner(plan, mats, group_content) if incremental else \
                    self._naive_runner(plan, image, group_content)
                for start, stop in batch_slices(len(indices), batch):
                    outputs[torch.from_numpy(indices[start:stop]).to(outputs.device)] = \
                        runner(start, stop).to(outputs.dtype)
                run.unchanged -= len(indices)
                run.groups.append({"size": list(size), "positions": int(len(indices)), "method": method,
                                   "theoretical_speedup": speedup, "batch_size": batch})
                run.full_macs += full * len(indices)
                run.executed_macs += (inc if incremental else full) * len(indices)
        run.fallback_reason = self.capture.trace_failure
        return run

    # ---- the verb -------------------------------------------------------------------------------
    def explain(self, image: torch.Tensor, patch_size: int = 16, stride: int = 4, fill=0.0, target=None,
                batch_size: int | None = None, method: str = "incremental", normalize=None,
                memory_budget: int | None = None, tau: float = 1.0, origins=None, target_ssim=None,
                drilldown=None, mode=None, precision: str = "float32", progress=None) -> Explanation:
        """Occlusion heatmap of `image`: the probability of `target` with a patch over each position.

        Args:
            image: the preprocessed image, (C, H, W) or (1, C, H, W), in the model's dtype and device.
            patch_size: side of the square occluding patch, in pixels of `image`.
            stride: step between patch positions; the grid has every top-left corner (i*stride,
                j*stride) whose patch lies fully inside the image.
            fill: what the patch holds, in the model's (normalized) input space: a number, one number per
                channel, or "gray" / "black" / "mean" (these need `normalize`).
            target: the class whose probability is mapped; default the clean image's predicted class.
            batch_size: positions per batch; default the largest that fits `memory_budget`.
            method: "incremental" (Krypton) or "naive" (full re-inference of every occluded image, the
                baseline kept for verification; no approximations).
            normalize: (mean, std) of the model's input normalization, for the named fills.
            memory_budget: bytes the run's peak memory may take (default 1 GiB): it chooses `batch_size` and
                clamps an explicit one that would not fit (`memory["batch_size_requested"]`; budget.py).
            tau: projective-field threshold in (0, 1]; 1 is exact, lower is faster and approximate.
            origins: explicit (n, 2) patch corners (y, x) instead of the grid; the heatmap is then (1, n).
            target_ssim: choose the whole configuration (precision, tau, drill-down) as the fastest one whose
                SSIM met this target on the model's tuning photos (krypton/tuned/, krypton/tuning.py);
                `extra["approximation"]` reports it with its expected SSIM and speedup.
            drilldown: True, a dict {r, target_speedup} or {r, s1}: run the whole grid at a coarse stride,
                then the requested stride on the fraction r of cells with the largest drops (approx.py).
            mode: "exact" (forbids every approximation) or "approximate" (target_ssim 0.9 unless tau,
                drilldown or precision are given explicitly).
            precision: what the occluded positions run in: "float32" (the model's own dtype), "bf16" or
                "fp16" (CUDA only): an approximation. The clean image still runs in the model's dtype, so
                `label` and `probability` are the float32 ones; each cell is the softmax (float64) of the
                low-precision logits at that label. Composes with tau, drill-down and method="naive".
            progress: callable(stage, Explanation), called with the coarse drill-down map before stage 2.

        Returns:
            Explanation: `heatmap` (grid rows x columns, float, the model's dtype whatever the precision),
            `label`, `probability` (clean), `predicted`, the options used, `timings_ms`, `memory`,
            `theoretical_speedup`, `executed_speedup`, `incremental` / `fallback_reason`, `cache` and, for
            approximations, `extra["approximation"]` and `extra["drilldown"]`.

        Raises:
            OptionError (a ValueError): an option or the image is wrong; `.parameter`, `.value` and
                `.allowed` say which, what and what would be accepted. Raised before any inference.
            ModelError (a RuntimeError): the model cannot be explained as given (e.g. it rejects the
                input shape, or its output is not one row of logits).
        """
        t0 = time.perf_counter()
        self._check_model()
        image = _as_batch(image, self.dtype).to(self.device)
        shape = tuple(image.shape)
        opts = resolve(shape, self.num_classes(shape), lambda: tuning_for(self.model),
                       patch_size=patch_size, stride=stride, fill=fill, normalize=normalize, target=target,
                       batch_size=batch_size, method=method, memory_budget=memory_budget, tau=tau, origins=origins,
                       target_ssim=target_ssim, drilldown=drilldown, mode=mode, precision=precision,
                       device=self.device)
        if opts.drilldown is not None:
            return self._drilldown(image, opts, progress, t0)
        run = self._run(image, opts, t0)
        exp = run.explanation
        if opts.approximation is not None:
            exp.extra["approximation"] = {**opts.approximation, "estimated_speedup": self._tau_speedup(shape, opts)}
        return exp

    def _tau_speedup(self, shape, opts: ExplainOptions, stride: int | None = None) -> float:
        """Theoretical speedup of tau over exact incremental inference (conv MACs, patch at the centre)."""
        if opts.tau >= 1.0:
            return 1.0
        stride = opts.stride if stride is None else stride
        exact = self.estimate(shape, opts.patch_size, stride, 1.0).theoretical_speedup()
        return float(self.estimate(shape, opts.patch_size, stride, opts.tau).theoretical_speedup() / exact)

    def _run(self, image: torch.Tensor, opts: ExplainOptions, t0: float,
             positions_per_group: int | None = None, held: Materialized | None = None) -> _Run:
        """Every position of `opts` (its grid, or its explicit origins) against the clean image's activations;
        with `positions_per_group`, only that many of each position group, and `held`: the clean activations
        the caller holds (the memory calibration's probes)."""
        shape = tuple(image.shape)
        _, c, h, w = shape
        p, s, tau = opts.patch_size, opts.stride, opts.tau
        dtype = opts.dtype or self.dtype  # what the positions run in
        converting = dtype != self.dtype and dtype not in self._converted
        self._check_precision_runs(shape, opts.precision, dtype)  # builds the converted copy once
        planning_start = time.perf_counter()
        if opts.method == "incremental":
            # explicit origins (drill-down's stage 2) run as one group
            groups = self.grid_plans(shape, p, s, tau, dtype) if opts.origins is None else \
                [(np.arange(len(opts.origins)), self.plan(shape, p, s, tau, opts.origins, dtype))]
            per_position = max(plan.peak_bytes_per_position for _, plan in groups)
            if self.capture.trace_failure is not None:  # one opaque node: the plan knows no inner shapes
                per_position = self._naive_bytes(groups[0][1], dtype)
            fallback = groups[0][1].fallback if self.capture.trace_failure is None else self.capture.trace_failure
            incremental = self.capture.trace_failure is None
        else:
            origins = geo.grid_origins(h, w, p, s) if opts.origins is None else opts.origins
            groups = [(np.arange(len(origins)), self.plan(shape, p, s, tau, origins, dtype))]
            per_position = self._naive_bytes(groups[0][1], dtype)
            fallback = self.capture.trace_failure or "method=naive: full re-inference of every occluded image"
            incremental = False
        planning = time.perf_counter() - planning_start  # cached plans: ~0; timed with the positions
        # one arena scope from the clean pass on: the batches reuse what it freed (budget.MemoryModel)
        with batch_arena():
            mats, run_mats, cache, added = self._activations(image, dtype, converting, self._needed(shape, groups)
                                                             if incremental else frozenset(), held)
            probs = torch.softmax(mats.output.double(), dim=1)[0]
            predicted = int(probs.argmax())
            label = predicted if opts.target is None else opts.target
            # what a low precision holds besides the model's own activations (budget.MemoryModel)
            extra_bytes = 2 * added.get("cast_materialized_bytes", 0) + added.get("converted_weights_bytes", 0)
            t1 = time.perf_counter() - planning
            # the largest windows first: later groups' smaller tensors fit in the blocks the first one freed,
            # so memory does not grow group after group (glibc's heap, resnet18 P16 S8: 490-600 -> 390-460 MB)
            groups = sorted(groups, key=lambda g: -g[1].peak_bytes_per_position)
            n = sum(len(g) for g, _ in groups)
            memory_model = self.memory_models[opts.method]
            clean_pass = cache == "miss"  # the batches then follow the clean pass (budget.MemoryModel)
            batch = fit_batch(memory_model, per_position, n, opts.memory_budget, mats.nbytes, opts.batch_size,
                              extra_bytes, clean_pass)
            counts = [len(g) if positions_per_group is None else min(len(g), positions_per_group) for g, _ in groups]
            # the groups run in even batches (batch_slices): the peak is that of the largest one that runs, e.g.
            # 196 naive positions at batch 91 run as 3 x 66 (estimated at 91: 1.5x the measured peak)
            largest_run = max(even_batch(count, batch) for count in counts)
            memory = {"materialized_bytes": mats.nbytes, "peak_working_bytes": per_position * largest_run,
                      "largest_batch_run": largest_run,
                      "estimated_peak_bytes": memory_model.peak(per_position, largest_run, mats.nbytes, extra_bytes,
                                                                clean_pass),
                      "budget_bytes": opts.memory_budget, "memory_model": memory_model.source, **added}
            if opts.batch_size is not None and batch < min(n, opts.batch_size):
                memory["batch_size_requested"] = opts.batch_size  # clamped to what fits the budget
            fill_t = torch.tensor(opts.fill, dtype=dtype, device=self.device).view(c, 1, 1)
            scores = torch.empty(n, dtype=torch.float64)
            full_macs, executed_macs, changed_macs = 0, 0, 0.0
            for (indices, plan), count in zip(groups, counts):
                run = self._incremental_runner(plan, run_mats, fill_t, dtype) if opts.method == "incremental" else \
                    self._naive_runner(plan, image.to(dtype), fill_t, dtype)
                full, inc = plan.macs()
                full_macs += full * len(indices)
                executed_macs += (inc if opts.method == "incremental" else full) * len(indices)
                changed_macs += (plan.changed_macs() if opts.method == "incremental" else full) * len(indices)
                for start, stop in batch_slices(count, batch):
                    logits = run(start, stop)
                    scores[indices[start:stop]] = torch.softmax(logits.double(), dim=1)[:, label].cpu()
        theoretical = self.estimate(shape, p, s, tau).theoretical_speedup()
        t2 = time.perf_counter()

        grid = geo.grid_shape(h, w, p, s) if opts.origins is None else (1, n)
        exp = Explanation(
            heatmap=scores.view(grid).to(self.dtype), label=label, probability=float(probs[label]),
            predicted=predicted, patch_size=p, stride=s, fill=opts.fill, batch_size=batch, method=opts.method,
            image_shape=(h, w),
            timings_ms={"materialize": 0.0 if cache == "hit" else (t1 - t0) * 1e3, opts.method: (t2 - t1) * 1e3,
                        "total": (t2 - t0) * 1e3},
            memory=memory,
            theoretical_speedup=theoretical,
            executed_speedup=full_macs / executed_macs if executed_macs else 1.0,
            true_change_speedup=full_macs / changed_macs if changed_macs else 1.0, groups=len(groups),
            cache=cache, tau=float(tau), precision=opts.precision, incremental=incremental, fallback_reason=fallback,
        )
        return _Run(exp, full_macs, executed_macs, changed_macs)

    def _needed(self, shape: tuple, groups) -> frozenset[str]:
        """The clean activations the plans of `groups` read, joined with what earlier plans of the same input
        shape read (drill-down's stage 2 plans differ from stage 1's): the cached copy of an image then
        serves all of them."""
        needed = frozenset().union(*(plan.clean_reads for _, plan in groups)) | (self._reads.get(shape) or frozenset())
        self._reads.put(shape, needed)
        return needed

    def _activations(self, image: torch.Tensor, dtype, converting: bool, needed: frozenset[str] | None,
                     held: Materialized | None = None) -> tuple[Materialized, Materialized, str, dict]:
        """(the clean run's activations, in the model's dtype: label and probability; those the positions run
        against; cache hit or miss; the bytes a low precision adds): its cast copy of the activations and,
        when this request built it (`converting`), the converted copy of the weights (kept for later runs).
        `needed`: see materialized(). `held`: the model-dtype activations, held by the caller (a hit)."""
        mats, cache = (held, "hit") if held is not None else self.materialized(image, needed=needed)
        if dtype == self.dtype:
            return mats, mats, cache, {}
        run_mats, run_cache = self.materialized(image, dtype, clean=mats, needed=needed)
        added = {"cast_materialized_bytes": run_mats.nbytes}
        if converting:
            added["converted_weights_bytes"] = _weight_bytes(self.capture_in(dtype).gm)
        return mats, run_mats, cache if run_cache == "hit" else "miss", added

    def _drilldown(self, image: torch.Tensor, opts: ExplainOptions, progress, t0: float) -> Explanation:
        """Stage 1 over the whole grid at S1, stage 2 at S2 on the refined cells; see approx.py."""
        dd, p = opts.drilldown, opts.patch_size
        shape = tuple(image.shape)
        h, w = shape[2], shape[3]
        first = self._run(image, opts.stage(stride=dd.s1), t0)
        stage1 = first.explanation
        fine_shape = geo.grid_shape(h, w, p, dd.s2)
        coarse = approx.coarse_to_fine(stage1.heatmap.double().numpy(), dd.s1, fine_shape, dd.s2)
        known = approx.stage1_cells(fine_shape, dd.s1, dd.s2, tuple(stage1.heatmap.shape))
        mask = approx.select_refined(coarse, stage1.probability, dd.r, known)
        cells = np.argwhere(mask)  # row-major
        t1 = time.perf_counter()
        tau_speedup = self._tau_speedup(shape, opts, dd.s2)
        report = {**opts.approximation, "estimated_speedup": dd.estimated_speedup * tau_speedup,
                  "tau_speedup": tau_speedup, "drilldown_speedup": dd.estimated_speedup}
        info = {**dd.to_dict(), "positions": {"stage1": stage1.positions, "stage2": int(len(cells)),
                                              "full": int(mask.size), "exact_from_stage1": int(known.sum())},
                "stage1_heatmap": stage1.heatmap.tolist(),
                "position_speedup": mask.size / (stage1.positions + len(cells)),
                # with S1 > P the stage-1 patches leave gaps: a region there cannot show a drop in stage 1
                "stage1_covers_image": dd.s1 <= p}
        if progress is not None:
            progress("coarse", replace(stage1, heatmap=torch.from_numpy(coarse).to(stage1.heatmap.dtype),
                                       stride=dd.s2, extra={"stage": "coarse", "drilldown": dict(info),
                                                            "approximation": dict(report)}))
        second = self._run(image, opts.stage(stride=dd.s2, origins=cells * dd.s2, target=stage1.label),
                           time.perf_counter())
        stage2 = second.explanation
        t2 = time.perf_counter()
        info.update(refined=cells.tolist(), stage2_cache=stage2.cache)
        full_macs = second.full_macs // max(1, len(cells)) * int(mask.size)  # naive over the whole S2 grid
        executed = first.executed_macs + second.executed_macs
        changed = first.changed_macs + second.changed_macs
        timings = {"materialize": stage1.timings_ms["materialize"] + stage2.timings_ms["materialize"],
                   "stage1": stage1.timings_ms["total"], "stage2": stage2.timings_ms["total"],
                   "select": (t1 - t0) * 1e3 - stage1.timings_ms["total"], "total": (t2 - t0) * 1e3}
        return replace(stage2, heatmap=approx.merge(coarse, mask, stage2.heatmap), stride=dd.s2, timings_ms=timings,
                       cache=stage1.cache, batch_size=max(stage1.batch_size, stage2.batch_size),
                       memory=max(stage1.memory, stage2.memory, key=lambda m: m["estimated_peak_bytes"]),
                       executed_speedup=full_macs / executed if executed else 1.0,
                       true_change_speedup=full_macs / changed if changed else 1.0,
                       extra={"drilldown": info, "approximation": report})

    def _incremental_runner(self, plan, mats, content, dtype=None):
        """run(start, stop) -> logits of positions [start, stop) of `plan` (built for `dtype`), incrementally."""
        return BatchRunner(self.capture_in(dtype), plan, mats, _content(plan, content), self.channels_last).run

    def _naive_model(self, dtype=None) -> nn.Module:
        """What full re-inference runs in `dtype`: the model itself, or the converted copy of its graph."""
        return self.model if dtype is None or dtype == self.dtype else self.capture_in(dtype).gm

    def _naive_runner(self, plan: Plan, image: torch.Tensor, content, dtype=None):
        """Batched full re-inference of every changed image (the clean image with each position's rect
        holding its content), in `image`'s dtype: the baseline kept for verification, and stock execution
        where an incremental run would gain nothing."""
        origins = torch.from_numpy(plan.origins).to(image.device)
        zeros = torch.zeros_like(origins)
        clean = image[0]
        content = _content(plan, content)
        model = self._naive_model(dtype)

        @torch.no_grad()
        def run(start, stop):
            batch = ops.stitch(clean, content(start, stop).contiguous(), origins[start:stop], zeros[start:stop],
                               clean.shape[1], clean.shape[2], 0.0)
            return model(batch)

        return run

    def _naive_bytes(self, plan: Plan, dtype=None) -> int:
        """Per-position working set of full inference in `dtype` (None: the model's): the two largest
        consecutive activations, or, for a model that runs as one opaque node (TorchScript, untraceable),
        its measured per-position peak."""
        dtype = dtype or self.dtype
        if self.capture.trace_failure is not None:
            key = (plan.input_shape, dtype)
            if key not in self._opaque_bytes:
                self._opaque_bytes[key] = formats.opaque_bytes_per_position(self._naive_model(dtype), plan.input_shape,
                                                                            dtype, self.device)
            return self._opaque_bytes[key]
        sizes = [int(math.prod(s[1:])) for s in plan.shapes.values() if s is not None]
        pairs = [a + b for a, b in zip(sizes, sizes[1:])] or sizes
        return max(pairs) * torch.empty((), dtype=dtype).element_size()


def _content(plan: Plan, content):
    """A plan's content callable from a callable, a (C, 1, 1) fill or a per-position [N, C, h, w] tensor."""
    if callable(content):
        return content
    if content.dim() == 3:
        return constant_content(content, plan.input_shape[1], plan.rect_size)
    return tensor_content(content)


# One-shot calls reuse one Explainer per model object (its capture and plans, no activations), held
# weakly: the entry goes when the model does. It refers to the model only through a weak reference.
_ONE_SHOT: "weakref.WeakKeyDictionary[nn.Module, Explainer]" = weakref.WeakKeyDictionary()


def _one_shot(model: nn.Module) -> Explainer:
    explainer = _ONE_SHOT.get(model)
    if explainer is None:
        explainer = Explainer(model, cache_bytes=0)
        if explainer.capture.trace_failure is None:  # the fallback graph holds the model strongly
            if explainer.model is model:  # else (an ExportedProgram) it holds the converted graph only
                explainer._model_ref = weakref.ref(model)
            _ONE_SHOT[model] = explainer
    return explainer


def explain(model: nn.Module, image: torch.Tensor, **options) -> Explanation:
    """One-shot occlusion explanation; see Explainer.explain for the options.

    Repeated calls with the same model object reuse its traced graph and plans.
    """
    return _one_shot(model).explain(image, **options)


@dataclass
class SpeedupEstimate:
    speedup: float
    full_macs: int
    incremental_macs: int
    layers: list[dict]
    incremental: bool = True  # False: the model is not traceable, every position runs full inference
    fallback_reason: str | None = None  # why not, or where the incremental part ends

    def __float__(self) -> float:
        return self.speedup


def estimate_speedup(model: nn.Module, input_shape, patch_size: int = 16, stride: int = 4,
                     tau: float = 1.0) -> SpeedupEstimate:
    """Theoretical speedup (conv multiply-adds, patch at the centre); no occlusion is run."""
    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1,) + shape
    explainer = _one_shot(model)
    walk = explainer.estimate(shape, patch_size, stride, tau)
    full, inc = walk.macs()
    layers = [{"name": c.name, "kind": c.kind, "full_macs": c.full_macs, "incremental_macs": c.incremental_macs,
               "speedup": c.full_macs / c.incremental_macs if c.incremental_macs else 1.0} for c in walk.layers]
    failure = explainer.capture.trace_failure
    return SpeedupEstimate(full / inc if inc else 1.0, full, inc, layers, failure is None, failure or walk.fallback)
