"""Static plan of an incremental run, for one (input shape, rect size, stride, tau, set of positions).

The input's changed region is a rect of one shared size (h, w) at every position's origin (OBE: the
square patch; segments and edited images: a bounding box), holding per-position content that
execution supplies (execute.py `BatchRunner`'s `content`); positions with other rect sizes get their
own plans.

Two passes share one walk over the captured graph. `Walk` is geometry only: each node is constant
(does not depend on the image), incremental (a per-position rect of one shared size, from its rule's
`rect`) or full (a whole tensor per position, after the changed regions were projected into copies of
the materialized activations); it counts multiply-adds, which prices position groups and gives the
theoretical speedup without building anything. `Builder` extends the same walk with the steps that
execution runs: per-position origins as int64 tensors (no Python loop over positions at run time),
folded batch norms, in-place activations and the bytes each step keeps alive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from . import geometry as geo
from .capture import Capture
from .errors import ModelError
from .execute import FULL_ACTION, INPUT_ACTION, PROJECT_ACTION, run_graph
from .nodes import CONST, FULL, INC, OpSpec, Rect, Step
from .rules import BatchNormRule


@dataclass
class LayerCost:
    """Multiply-adds of one layer for one position: full inference, the executed (shared) window, and the
    cells that really changed (`changed_macs`: the mean over the positions of each one's own change; a layer
    that runs in full counts in full)."""

    name: str
    kind: str
    full_macs: int
    incremental_macs: int
    changed_macs: float


class Costed:
    """Conv multiply-adds of one position, from `layers` (Plan and Walk both have them)."""

    layers: list[LayerCost]

    def macs(self) -> tuple[int, int]:
        """(full, incremental) multiply-adds of the conv layers for one position."""
        convs = [c for c in self.layers if c.kind == "conv"]
        return sum(c.full_macs for c in convs), sum(c.incremental_macs for c in convs)

    def theoretical_speedup(self) -> float:
        full, inc = self.macs()
        return full / inc if inc else 1.0

    def changed_macs(self) -> float:
        """Mean conv multiply-adds per position over the cells that really changed: what windows fitted to
        each position's own change would cost (the true-change bound; executed windows are shared)."""
        return sum(c.changed_macs for c in self.layers if c.kind == "conv")


@dataclass
class Plan(Costed):
    input_shape: tuple[int, ...]
    patch_size: int | tuple[int, int]  # the input rect: a square side (OBE) or (h, w)
    stride: int
    tau: float
    origins: np.ndarray  # [N, 2] top-left corners of the patch
    states: dict[fx.Node, str]
    rects: dict[fx.Node, Rect]
    origin_tensors: dict[fx.Node, torch.Tensor]
    steps: list[Step]
    shapes: dict[fx.Node, torch.Size | None]
    output: fx.Node
    last_use: dict[fx.Node, int]
    layers: list[LayerCost]
    peak_bytes_per_position: int
    fallback: str | None  # where and why the incremental part ends (None: it reaches the output)
    clean_reads: frozenset[str]  # the nodes whose clean activations the steps read (_clean_reads)

    @property
    def positions(self) -> int:
        return len(self.origins)

    @property
    def rect_size(self) -> tuple[int, int]:
        """(h, w) of the input's changed rect at every position."""
        return rect_size(self.patch_size)


def rect_size(size) -> tuple[int, int]:
    """(h, w) of an input rect given as a square side or a pair."""
    if isinstance(size, (tuple, list, np.ndarray)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def propagate_shapes(capture: Capture, input_shape: tuple[int, ...], dtype: torch.dtype) -> dict:
    """Every node's output shape (None for non-tensors), from one run of a zero image.

    A real run, not fake tensors (nor fx's ShapeProp, which imports them): it costs one inference of one
    image, where fake tensors cost seconds of one-time imports (torch._dynamo, sympy) on the first
    request, and it also works for an opaque model with data-dependent control flow. Values are dropped after
    their last use, as in the clean pass (VGG16: the run holds its live set, not all 110 MB of activations).
    Cached on the capture: plans for other patches, strides or position subsets reuse it.
    """
    key = (tuple(input_shape), dtype)
    if key in capture.shape_cache:
        return capture.shape_cache[key]
    shapes: dict = {}
    try:
        run_graph(capture, torch.zeros(input_shape, dtype=dtype, device=capture.device), keep=frozenset(),
                  shapes=shapes)
    except Exception as exc:  # noqa: BLE001 - the model rejects this input shape
        raise ModelError(f"the model cannot run on an input of shape {tuple(input_shape)}: "
                         f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    capture.shape_cache[key] = shapes
    return shapes


def _describe(capture: Capture, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(capture.module(node)).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({target})"


class Walk(Costed):
    """Changed regions and multiply-adds of every node for a set of positions; geometry only.

    `patch_size` is the input rect of every position: a square side or (h, w); `origins` its per-position
    top-left corners, inside the image."""

    def __init__(self, capture: Capture, input_shape, dtype, patch_size, tau: float, origins: np.ndarray):
        self.c = capture
        self.input_shape = tuple(input_shape)
        self.patch_size, self.tau = patch_size, tau
        self.origins = origins
        self.shapes = propagate_shapes(capture, self.input_shape, dtype)
        self.states: dict[fx.Node, str] = {}
        self.rects: dict[fx.Node, Rect] = {}
        self.layers: list[LayerCost] = []
        self.output: fx.Node | None = None
        self.fallback: str | None = None
        self._walk()

    def spatial(self, node) -> tuple[int, int] | None:
        shape = self.shapes.get(node)
        return (int(shape[2]), int(shape[3])) if shape is not None and len(shape) == 4 else None

    def _walk(self) -> None:
        for node in self.c.nodes:
            if node.op == "placeholder":
                h, w = self.input_shape[2], self.input_shape[3]
                ph, pw = rect_size(self.patch_size)
                rect = Rect(geo.Rect1D(self.origins[:, 0].copy(), ph, h), geo.Rect1D(self.origins[:, 1].copy(), pw, w))
                self.states[node], self.rects[node] = INC, rect
                self.input(node, rect)
            elif node.op == "get_attr":
                self.states[node] = CONST
            elif node.op == "output":
                self.output = node
                self.finish(node)
            else:
                self._call(node)

    def _call(self, node) -> None:
        inputs = list(node.all_input_nodes)
        states = [self.states[i] for i in inputs]
        if all(s == CONST for s in states):
            self.states[node] = CONST
            return
        spec = self.c.specs.get(node)
        # the rule's changing inputs are incremental; any other input (weights, a layer scale) is constant
        incremental = (spec is not None and self.spatial(node) is not None
                       and all(self.states[i] == INC if i in spec.inputs else self.states[i] == CONST for i in inputs))
        rect = spec.rule.rect(self, node, spec) if spec is not None and incremental else None
        if rect is not None:
            self.states[node], self.rects[node] = INC, rect
            full_hw = self.spatial(node)
            (ylo, yhi), (xlo, xhi) = rect.y.changed(), rect.x.changed()
            areas = (yhi - ylo) * (xhi - xlo)
            changed = spec.rule.macs(self, node, spec, (1, 1)) * (float(areas.mean()) if areas.size else 0.0)
            self._count(node, spec, spec.rule.macs(self, node, spec, full_hw),
                        spec.rule.macs(self, node, spec, rect.size), changed)
            self.incremental(node, spec, rect)
            return
        self.states[node] = FULL
        if self.fallback is None and any(s == INC for s in states):
            why = ("no rule runs it incrementally" if spec is None else
                   f"its {spec.rule.kind} region covers the whole map" if incremental else
                   "it is not spatial")
            self.fallback = f"stops at node {_describe(self.c, node)}: {why}"
        self._count_full(node, spec)
        self.full(node, inputs, spec)

    def _count(self, node, spec: OpSpec, full: int, inc: int, changed: float) -> None:
        if full:
            self.layers.append(LayerCost(node.name, "conv", full, inc, changed))

    def _count_full(self, node, spec: OpSpec | None) -> None:
        if spec is not None and self.spatial(node) is not None:
            macs = spec.rule.macs(self, node, spec, self.spatial(node))
            self._count(node, spec, macs, macs, macs)
        elif node.op == "call_module" and isinstance(self.c.module(node), torch.nn.Linear):
            m = self.c.module(node)
            macs = m.in_features * m.out_features
            self.layers.append(LayerCost(node.name, "linear", macs, macs, macs))

    # hooks for Builder: the geometry walk itself records nothing more
    def input(self, node, rect: Rect) -> None:
        pass

    def incremental(self, node, spec: OpSpec, rect: Rect) -> None:
        pass

    def full(self, node, inputs: list[fx.Node], spec: OpSpec | None) -> None:
        pass

    def finish(self, output: fx.Node) -> None:
        pass


class Builder(Walk):
    """The walk plus the steps of batched execution (what the rules' `plan` and `full_step` return)."""

    def __init__(self, capture, input_shape, dtype, patch_size, stride, tau, origins):
        self.dtype = dtype
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.stride = stride
        self.steps: list[Step] = []
        self.producer: dict[fx.Node, Step] = {}  # node -> the step that makes its patch
        self.full_producer: dict[fx.Node, Step] = {}  # node -> the step that makes its full tensor
        self._folded: dict[fx.Node, fx.Node] = {}  # batch-norm node -> the conv folded into it
        super().__init__(capture, input_shape, dtype, patch_size, tau, origins)

    # ---- what rules ask the builder ---------------------------------------------------------------
    def numel1(self, node) -> int:
        shape = self.shapes.get(node)
        return int(math.prod(shape[1:])) if shape is not None else 0

    def patch_bytes(self, node, rect: Rect) -> int:
        return int(self.shapes[node][1]) * rect.size[0] * rect.size[1] * self.elem

    def foldable_batchnorm(self, node) -> fx.Node | None:
        """The eval batch norm that is `node`'s only user, if any (it can be folded into the conv)."""
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        spec = self.c.specs.get(user)
        return user if spec is not None and isinstance(spec.rule, BatchNormRule) else None

    def folded_into(self, bn_node) -> fx.Node | None:
        return self._folded.get(bn_node)

    def conv_weights(self, node, spec: OpSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conv's weights, with its batch norm folded in when it has one (cached on the capture)."""
        bn = self.foldable_batchnorm(node)
        if bn is None:
            return spec.weight, spec.bias
        self._folded[bn] = node
        return folded_weights(self.c, node, bn)

    def exclusive(self, node) -> bool:
        """True when no other node can see `node`'s patch tensor (following aliases back to its maker)."""
        while True:
            if len(node.users) != 1 or self.states.get(node) != INC:
                return False
            step = self.producer.get(node)
            if step is None:
                return False
            if not step.may_alias:
                return True
            node = step.inputs[0]

    # ---- walk hooks ------------------------------------------------------------------------------------
    def input(self, node, rect):
        self._add(Step(INPUT_ACTION, node, fresh=True), self.patch_bytes(node, rect))

    def incremental(self, node, spec, rect):
        self._add(spec.rule.plan(self, node, spec, rect), self.patch_bytes(node, rect))

    def full(self, node, inputs, spec):
        for i in inputs:
            self._project(i)
        step = spec.rule.full_step(self, node, spec, inputs) if spec is not None else None
        self._add(step or Step(FULL_ACTION, node, inputs, full=True), self.numel1(node) * self.elem)

    def finish(self, output):
        for i in output.all_input_nodes:
            self._project(i)

    def _project(self, node) -> None:
        if self.states[node] == INC and node not in self.full_producer:
            self._add(Step(PROJECT_ACTION, node, full=True, fresh=True), self.numel1(node) * self.elem)

    def _add(self, step: Step, out_bytes: int) -> None:
        step.out_bytes = out_bytes if step.allocates else 0
        (self.full_producer if step.full else self.producer)[step.node] = step
        self.steps.append(step)

    def build(self) -> Plan:
        steps = self.steps
        last_use: dict[fx.Node, int] = {}
        for idx, step in enumerate(steps):
            for i in step.inputs:
                last_use[i] = idx
            if step.action is PROJECT_ACTION:  # reads the node's patch
                last_use[step.node] = max(last_use.get(step.node, idx), idx)
        for i in self.output.all_input_nodes:
            last_use[i] = len(steps)
        return Plan(
            input_shape=self.input_shape, patch_size=self.patch_size, stride=self.stride, tau=self.tau,
            origins=self.origins, states=self.states, rects=self.rects,
            origin_tensors={n: r.origin_tensor() for n, r in self.rects.items()}, steps=steps,
            shapes=self.shapes, output=self.output, last_use=last_use, layers=self.layers,
            peak_bytes_per_position=_peak_bytes(steps, last_use), fallback=self.fallback,
            clean_reads=_clean_reads(steps, self.states, self.output),
        )


def _clean_reads(steps: list[Step], states: dict, output: fx.Node) -> frozenset[str]:
    """Names of the nodes whose materialized (clean) values the steps read: a window step's input and a
    boxed step's stitched inputs (the stitch op pastes the patches into them), a projection's node, and the
    constant inputs of the global part and of the output. Only these need keeping: the clean pass drops
    the rest (Inception3 at 299 px: 124 -> 36 MB, EfficientNet-Lite0 85 -> 23 MB)."""
    reads = set()
    for step in steps:
        if step.read_origin is not None:
            reads.add(step.inputs[0].name)
        reads.update(i.name for i, stitched in zip(step.inputs, step.stitch_inputs) if stitched)
        if step.action is PROJECT_ACTION:
            reads.add(step.node.name)
        if step.full:
            reads.update(i.name for i in step.node.all_input_nodes if states.get(i) == CONST)
    reads.update(i.name for i in output.all_input_nodes if states.get(i) != INC)
    return frozenset(reads)


def _peak_bytes(steps: list[Step], last_use: dict) -> int:
    """Largest per-position working set over the steps: live outputs plus the step's temporaries. A step
    that allocates nothing and may alias (a folded batch norm, an in-place ReLU or add) hands on its input's
    tensor: when the input dies, its bytes stay counted under the alias while that is live."""
    live: dict[fx.Node, int] = {}
    heirs: dict[fx.Node, list[fx.Node]] = {}  # node -> the aliases of its tensor
    peak = 0
    for idx, step in enumerate(steps):
        if step.may_alias and not step.allocates and step.inputs:
            heirs.setdefault(step.inputs[0], []).append(step.node)
        live[step.node] = live.get(step.node, 0) + step.out_bytes
        peak = max(peak, sum(live.values()) + step.tmp_bytes)
        for n in [n for n in live if last_use.get(n, -1) <= idx]:
            freed = live.pop(n)
            heir = next((a for a in heirs.get(n, ()) if a in live), None)
            if heir is not None:
                live[heir] += freed
    return peak


def folded_weights(capture: Capture, conv: fx.Node, bn: fx.Node) -> tuple[torch.Tensor, torch.Tensor]:
    """`conv`'s weights with the batch norm `bn` folded in, cached on the capture. A converted capture
    (a low precision) folds its source's weights and statistics and rounds the result once: folding the
    already rounded ones would round twice (bf16 running variances lose ~0.4% of the scale)."""
    key = (conv, bn)
    if key not in capture.folded_weights:
        source = capture.source
        if source is None:
            spec = capture.specs[conv]
            capture.folded_weights[key] = fold_batchnorm(spec.weight, spec.bias, capture.specs[bn].extra["batchnorm"])
        else:
            dtype = capture.specs[conv].weight.dtype
            weight, bias = folded_weights(source, source.node_named(conv.name), source.node_named(bn.name))
            capture.folded_weights[key] = weight.to(dtype), bias.to(dtype)
    return capture.folded_weights[key]


def fold_batchnorm(weight, bias, bn) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm2d into the preceding conv's weights (saves one pass over patches)."""
    with torch.no_grad():
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        if bias is not None:
            shift = shift + bias.double() * scale
        w = (weight.double() * scale.view(-1, 1, 1, 1)).to(weight.dtype)
        return w.contiguous(), shift.to(weight.dtype)


def build_plan(capture: Capture, input_shape, dtype, patch_size, stride: int, tau: float = 1.0,
               origins: np.ndarray | None = None) -> Plan:
    """Plan the incremental run of `capture` for an input of `input_shape` (1, C, H, W); `patch_size` is
    the input rect (a square side or (h, w)), `origins` its corners (default: the OBE grid)."""
    if origins is None:
        origins = geo.grid_origins(input_shape[2], input_shape[3], patch_size, stride)
    return Builder(capture, input_shape, dtype, patch_size, stride, tau, np.asarray(origins, np.int64)).build()
