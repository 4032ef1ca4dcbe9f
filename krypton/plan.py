"""Static plan of an incremental run, cached per (input shape, patch, stride, tau, positions).

For every node of the captured graph the plan decides whether its value is constant (does not depend
on the image), incremental (a per-position rect of a shared size, see geometry.py) or full (a whole
tensor per position, after the changed regions were projected into copies of the materialized
activations). It stores per-position origins as int64 tensors so that execution never loops over
positions in Python, and it counts multiply-adds, which gives the theoretical speedup for free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from . import geometry as geo
from .capture import Capture, OpSpec

CONST, INC, FULL = "const", "inc", "full"


@dataclass
class Rect:
    """A node's changed region for every position: origins [N, 2] (y, x) and a shared (h, w)."""

    y: geo.Rect1D
    x: geo.Rect1D

    @property
    def size(self) -> tuple[int, int]:
        return self.y.size, self.x.size

    def covers_map(self) -> bool:
        return self.y.covers_map() and self.x.covers_map()

    def origin_tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.y.origin, self.x.origin], axis=1).copy())


@dataclass
class Step:
    """One unit of batched execution; `kind` selects the executor branch.

    window:  stitch the read-in window of `inputs[0]`, apply `op` (conv with folded batch norm, pool)
    unary:   apply `apply` to the input patch          binary/cat: stitch inputs into the bounding box
    pad:     the patch is reused, only its origin moves project: paste patches into full copies
    full:    run the node's own op on full tensors     input:     the occluding patch itself
    """

    kind: str
    node: fx.Node
    inputs: list[fx.Node] = field(default_factory=list)
    spec: OpSpec | None = None
    read_origin: torch.Tensor | None = None
    read_size: tuple[int, int] = (0, 0)
    pad_value: float = 0.0
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    clone_input: bool = False
    inplace: bool = False  # the input patch is owned by this step alone: update it in place
    stitch_inputs: list[bool] = field(default_factory=list)
    out_bytes: int = 0  # per position
    tmp_bytes: int = 0  # per position, freed when the step ends


@dataclass
class LayerCost:
    name: str
    kind: str
    full_macs: int
    incremental_macs: int


@dataclass
class Plan:
    input_shape: tuple[int, ...]
    patch_size: int
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

    @property
    def positions(self) -> int:
        return len(self.origins)

    def macs(self) -> tuple[int, int]:
        """(full, incremental) multiply-adds of the conv layers for one position."""
        convs = [c for c in self.layers if c.kind == "conv"]
        return sum(c.full_macs for c in convs), sum(c.incremental_macs for c in convs)

    def theoretical_speedup(self) -> float:
        full, inc = self.macs()
        return full / inc if inc else 1.0


def propagate_shapes(capture: Capture, input_shape: tuple[int, ...], dtype: torch.dtype) -> dict:
    """Every node's output shape (None for non-tensors), computed with fake tensors: no inference.

    Cached on the capture: plans for other patches, strides or position subsets reuse it.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    key = (tuple(input_shape), dtype)
    if key in capture.shape_cache:
        return capture.shape_cache[key]

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        fake = torch.empty(input_shape, dtype=dtype)
    try:
        ShapeProp(capture.gm, mode).propagate(fake)
    except Exception as exc:  # noqa: BLE001 - the model rejects this input shape
        raise ValueError(f"the model cannot run on an input of shape {tuple(input_shape)}: {exc}") from None
    shapes = {}
    for node in capture.nodes:
        meta = node.meta.get("tensor_meta")
        shapes[node] = meta.shape if hasattr(meta, "shape") else None
    capture.shape_cache[key] = shapes
    return shapes


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


class _Builder:
    def __init__(self, capture, input_shape, dtype, patch_size, stride, tau, origins):
        self.c = capture
        self.input_shape = tuple(input_shape)
        self.dtype = dtype
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.patch_size, self.stride, self.tau = patch_size, stride, tau
        self.origins = origins
        self.shapes = propagate_shapes(capture, self.input_shape, dtype)
        self.states: dict[fx.Node, str] = {}
        self.rects: dict[fx.Node, Rect] = {}
        self.steps: list[Step] = []
        self.layers: list[LayerCost] = []
        self.projected: set[fx.Node] = set()
        self.folded: dict[fx.Node, fx.Node] = {}  # batch-norm node -> conv node folded into it
        self._step_of: dict[fx.Node, Step] = {}  # node -> the step that makes its patch / full tensor
        self.folded_full: dict[fx.Node, fx.Node] = {}  # batch norm -> full conv folded into it

    # ---- helpers --------------------------------------------------------------------------------
    def _spatial(self, node) -> tuple[int, int] | None:
        shape = self.shapes.get(node)
        return (int(shape[2]), int(shape[3])) if shape is not None and len(shape) == 4 else None

    def _numel1(self, node) -> int:
        shape = self.shapes.get(node)
        return int(math.prod(shape[1:])) if shape is not None else 0

    def _patch_bytes(self, node, rect: Rect) -> int:
        return int(self.shapes[node][1]) * rect.size[0] * rect.size[1] * self.elem

    def _project(self, node):
        if self.states[node] == INC and node not in self.projected:
            self.projected.add(node)
            step = Step("project", node, out_bytes=self._numel1(node) * self.elem)
            self.steps.append(step)
            if len(node.users) == 1:
                self._step_of[node] = step  # the full copy is fresh: its single consumer may own it

    def _set_inc(self, node, rect: Rect, step: Step):
        self._step_of[node] = step
        self.states[node] = INC
        self.rects[node] = rect
        step.out_bytes = self._patch_bytes(node, rect)
        self.steps.append(step)

    def _set_full(self, node, inputs: list[fx.Node]):
        for i in inputs:
            self._project(i)
        self.states[node] = FULL
        step = Step("full", node, inputs, out_bytes=self._numel1(node) * self.elem)
        self._count_full_layer(node)
        spec = self.c.specs.get(node)
        if node in self.folded_full:  # batch norm already applied by the conv before it
            step = Step("full_alias", node, [self.folded_full[node]])
        elif spec is not None and spec.kind == "window" and spec.op == "conv" and "padding" in spec.extra:
            bn = self._foldable_batchnorm(node)
            if bn is not None:  # stock conv with batch norm folded in: one pass over the tensor less
                step.kind = "full_conv"
                step.spec = spec
                step.weight, step.bias = _fold_batchnorm(spec.weight, spec.bias, bn.extra["batchnorm"])
                self.folded_full[next(iter(node.users))] = node
        elif spec is not None and spec.kind == "unary" and "inplace_fn" in spec.extra and len(inputs) == 1:
            producer = self._step_of.get(inputs[0])
            if len(inputs[0].users) == 1 and producer is not None and producer.kind in ("full_conv", "project"):
                step.kind, step.spec = "full_inplace", spec  # the input tensor is fresh and seen only here
        self._step_of[node] = step
        self.steps.append(step)

    def _count_full_layer(self, node):
        spec = self.c.specs.get(node)
        if spec is not None and spec.kind == "window" and spec.op == "conv" and self.shapes[node] is not None:
            full = self._conv_macs(spec, self.shapes[node][1], self._spatial(node))
            self.layers.append(LayerCost(node.name, "conv", full, full))
        elif node.op == "call_module" and isinstance(self.c.gm.get_submodule(node.target), torch.nn.Linear):
            m = self.c.gm.get_submodule(node.target)
            macs = m.in_features * m.out_features
            self.layers.append(LayerCost(node.name, "linear", macs, macs))

    @staticmethod
    def _conv_macs(spec: OpSpec, c_out: int, spatial: tuple[int, int]) -> int:
        c_in_per_group = int(spec.weight.shape[1])
        return c_in_per_group * spec.kernel[0] * spec.kernel[1] * int(c_out) * spatial[0] * spatial[1]

    # ---- main loop ------------------------------------------------------------------------------
    def build(self) -> Plan:
        output = None
        for node in self.c.nodes:
            if node.op == "placeholder":
                self._input(node)
            elif node.op == "get_attr":
                self.states[node] = CONST
            elif node.op == "output":
                output = node
                for i in _tensor_inputs(node):
                    self._project(i)
            else:
                self._call(node)
        steps = self.steps
        last_use = {}
        for idx, step in enumerate(steps):
            for i in step.inputs:
                last_use[i] = idx
            if step.kind == "project":
                last_use[step.node] = max(last_use.get(step.node, idx), idx)
        for i in _tensor_inputs(output):
            last_use[i] = len(steps)
        return Plan(
            input_shape=self.input_shape, patch_size=self.patch_size, stride=self.stride, tau=self.tau,
            origins=self.origins, states=self.states, rects=self.rects,
            origin_tensors={n: r.origin_tensor() for n, r in self.rects.items()}, steps=steps,
            shapes=self.shapes, output=output, last_use=last_use, layers=self.layers,
            peak_bytes_per_position=self._peak_bytes(steps, last_use),
        )

    def _input(self, node):
        h, w = self.input_shape[2], self.input_shape[3]
        p = self.patch_size
        rect = Rect(geo.Rect1D(self.origins[:, 0].copy(), p, h), geo.Rect1D(self.origins[:, 1].copy(), p, w))
        self._set_inc(node, rect, Step("input", node))

    def _call(self, node):
        inputs = _tensor_inputs(node)
        states = [self.states[i] for i in inputs]
        if all(s == CONST for s in states):
            self.states[node] = CONST
            return
        spec = self.c.specs.get(node)
        if spec is not None and all(s == INC for s in states) and self._spatial(node) is not None:
            handler = getattr(self, f"_{spec.kind}")
            if handler(node, spec):
                return
        self._set_full(node, inputs)

    # Each handler returns True when the node was planned incrementally.
    def _window(self, node, spec: OpSpec) -> bool:
        x = spec.inputs[0]
        in_hw, out_hw = self._spatial(x), self._spatial(node)
        if in_hw is None:
            return False
        spec = self._resolve_adaptive(spec, in_hw, out_hw)
        if spec is None or not self._window_fits(spec, in_hw, out_hw):
            return False
        rin = self.rects[x]
        wy = geo.sliding_window(rin.y, out_hw[0], spec.kernel[0], spec.stride[0], spec.pad_before[0],
                                spec.dilation[0], self.tau)
        wx = geo.sliding_window(rin.x, out_hw[1], spec.kernel[1], spec.stride[1], spec.pad_before[1],
                                spec.dilation[1], self.tau)
        rect = Rect(wy.out, wx.out)
        if rect.covers_map():
            return False  # the window is the whole map: stock execution is as cheap and simpler
        step = Step("window", node, [x], spec)
        step.read_origin = torch.from_numpy(np.stack([wy.read_origin, wx.read_origin], axis=1).copy())
        step.read_size = (wy.read_size, wx.read_size)
        step.pad_value = float("-inf") if spec.op == "max" else 0.0
        step.tmp_bytes = int(self.shapes[x][1]) * wy.read_size * wx.read_size * self.elem
        if spec.op == "conv":
            step.weight, step.bias = spec.weight, spec.bias
            full = self._conv_macs(spec, self.shapes[node][1], out_hw)
            inc = self._conv_macs(spec, self.shapes[node][1], rect.size)
            self.layers.append(LayerCost(node.name, "conv", full, inc))
            bn = self._foldable_batchnorm(node)
            if bn is not None:
                step.weight, step.bias = _fold_batchnorm(spec.weight, spec.bias, bn.extra["batchnorm"])
                self.folded[next(iter(node.users))] = node
        self._set_inc(node, rect, step)
        return True

    def _foldable_batchnorm(self, node) -> OpSpec | None:
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        spec = self.c.specs.get(user)
        if spec is not None and spec.kind == "unary" and "batchnorm" in spec.extra:
            return spec
        return None

    @staticmethod
    def _resolve_adaptive(spec: OpSpec, in_hw, out_hw) -> OpSpec | None:
        """Adaptive average pooling is a plain pooling when the input divides evenly."""
        if "adaptive" not in spec.extra:
            return spec
        if in_hw[0] % out_hw[0] or in_hw[1] % out_hw[1]:
            return None
        k = (in_hw[0] // out_hw[0], in_hw[1] // out_hw[1])
        return OpSpec("window", spec.inputs, op="avg", kernel=k, stride=k)

    @staticmethod
    def _window_fits(spec: OpSpec, in_hw, out_hw) -> bool:
        """Check that a padding-0 window reproduces the node at every output cell."""
        for d in range(2):
            ke = geo.effective_kernel(spec.kernel[d], spec.dilation[d])
            floor_out = (in_hw[d] + 2 * spec.pad_before[d] - ke) // spec.stride[d] + 1
            if spec.op == "conv":
                # Output size tells the trailing padding; nothing else to check (same-padding included).
                continue
            if out_hw[d] != floor_out and spec.op == "avg":
                return False  # ceil_mode overflow: the divisor shrinks at the end, a window cannot tell
        return True

    def _unary(self, node, spec: OpSpec) -> bool:
        x = spec.inputs[0]
        if self.shapes[node] != self.shapes[x]:
            return False
        if node in self.folded:
            self.states[node] = INC
            self.rects[node] = self.rects[self.folded[node]]
            step = Step("alias", node, [self.folded[node]])
            self._step_of[node] = step
            self.steps.append(step)
            return True
        step = Step("unary", node, [x], spec)
        step.clone_input = bool(spec.extra.get("inplace")) and len(x.users) > 1
        step.inplace = "inplace_fn" in spec.extra and self._exclusive(x)
        self._set_inc(node, self.rects[x], step)
        return True

    def _exclusive(self, node) -> bool:
        """True when no other node can see `node`'s patch tensor (following aliases back to its maker)."""
        while True:
            if len(node.users) != 1 or self.states.get(node) != INC:
                return False
            step = self._step_of.get(node)
            if step is None or step.kind == "input":
                return step is not None
            if step.kind not in ("alias", "pad", "unary"):
                return True
            node = step.inputs[0]

    def _binary(self, node, spec: OpSpec) -> bool:
        a, b = spec.inputs
        if not (self.shapes[a] == self.shapes[b] == self.shapes[node]):
            return False
        return self._boxed(node, spec, [a, b])

    def _cat(self, node, spec: OpSpec) -> bool:
        dim = spec.extra["dim"]
        if dim not in (1, -3) or any(self._spatial(i) != self._spatial(node) for i in spec.inputs):
            return False
        return self._boxed(node, spec, spec.inputs)

    def _boxed(self, node, spec, inputs) -> bool:
        rects = [self.rects[i] for i in inputs]
        rect = Rect(geo.bounding_box([r.y for r in rects], self.tau), geo.bounding_box([r.x for r in rects], self.tau))
        step = Step(spec.kind, node, list(inputs), spec)
        step.stitch_inputs = [not _same_rect(r, rect) for r in rects]
        step.tmp_bytes = sum(self._patch_bytes(i, rect) for i, s in zip(inputs, step.stitch_inputs) if s)
        self._set_inc(node, rect, step)
        return True

    def _pad(self, node, spec: OpSpec) -> bool:
        x = spec.inputs[0]
        top, _, left, _ = spec.pads
        h, w = self._spatial(node)
        rin = self.rects[x]
        rect = Rect(geo.padded(rin.y, top, h), geo.padded(rin.x, left, w))
        self._set_inc(node, rect, Step("pad", node, [x], spec))
        return True

    @staticmethod
    def _peak_bytes(steps: list[Step], last_use: dict) -> int:
        """Largest per-position working set over the steps: live outputs plus the step's temporaries."""
        live: dict[fx.Node, int] = {}
        peak = 0
        for idx, step in enumerate(steps):
            if step.kind not in ("alias", "pad", "full_alias", "full_inplace"):
                live[step.node] = live.get(step.node, 0) + step.out_bytes
            peak = max(peak, sum(live.values()) + step.tmp_bytes)
            for n in [n for n in live if last_use.get(n, -1) <= idx]:
                del live[n]
        return peak


def _same_rect(a: Rect, b: Rect) -> bool:
    return (a.size == b.size and np.array_equal(a.y.origin, b.y.origin)
            and np.array_equal(a.x.origin, b.x.origin))


def _fold_batchnorm(weight, bias, bn) -> tuple[torch.Tensor, torch.Tensor]:
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


def build_plan(capture: Capture, input_shape, dtype, patch_size: int, stride: int, tau: float = 1.0,
               origins: np.ndarray | None = None) -> Plan:
    """Plan the incremental run of `capture` for an input of `input_shape` (1, C, H, W)."""
    if origins is None:
        origins = geo.grid_origins(input_shape[2], input_shape[3], patch_size, stride)
    return _Builder(capture, input_shape, dtype, patch_size, stride, tau, np.asarray(origins, np.int64)).build()
