"""One class per op kind: how it is recognised in the fx graph, its geometry, its plan and its execution.

A `Rule` answers four questions about the nodes it owns:

- `match(capture, node)`: is this node mine? Return an `OpSpec` (parameters + the changing inputs) or
  None. Capture asks every rule in order; a node no rule claims is *global*: it runs on full tensors
  after the changed regions are projected into copies of the materialized activations. An unknown op
  therefore only ends the incremental part earlier, it never gives a wrong answer.
- `rect(walk, node, spec)`: the node's changed region (a `Rect`) from its inputs' regions, with the pure
  functions of geometry.py; None means "not incremental here" (e.g. the window covers the whole map).
  This is all the cost model needs: position grouping prices candidates with it, without building plans.
- `plan(builder, node, spec, rect)`: the `Step` that executes the node for a batch of positions.
- `run(runner, step, state)`: the batch of output patches.

Optional: `rewrite(gm)` (a graph pass at capture, before matching, e.g. fusing an NHWC per-pixel chain
into one node), `leaf_modules` (module types the tracer must keep as one call_module node instead of tracing
into them, e.g. a user's LayerNorm2d), `macs(...)` (conv multiply-adds, for speedups), `full_step(...)`
(a cheaper way to run the node in the global part, e.g. a conv with its batch norm folded in).

Teaching the engine a new layer is one subclass here (plus a pure geometry function if the layer moves
regions in a new way) registered in `DEFAULT_RULES`, or passed as `Explainer(model, rules=[...])`.
"""
from __future__ import annotations

import inspect
import operator
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import geometry as geo
from . import ops
from .nodes import OpSpec, Rect, Step


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        if len(v) not in (1, 2):
            raise ValueError(f"expected 1 or 2 values, got {v!r}")
        return int(v[0]), int(v[-1])
    return int(v), int(v)


def _bind(signature_of: Callable, args, kwargs) -> dict[str, Any]:
    bound = inspect.signature(signature_of).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


# Python signatures of the functionals we understand (fx records positional/keyword args as written).
def _sig_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...
def _sig_max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False): ...
def _sig_avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None): ...
def _sig_pad(input, pad, mode="constant", value=None): ...
def _sig_cat(tensors, dim=0): ...
def _sig_adaptive(input, output_size): ...


def _module_input(capture, node: fx.Node, types) -> tuple[nn.Module, fx.Node] | None:
    """(module, its single tensor input) when `node` calls a module of one of `types`, else None."""
    if node.op != "call_module":
        return None
    m = capture.module(node)
    if not isinstance(m, types) or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
        return None
    return m, node.args[0]


class Rule:
    """Base class of the op-kind rules; see the module docstring."""

    kind = "rule"  # a label for plans, logs and tests; never used for dispatch
    leaf_modules: tuple[type, ...] = ()  # module types fx must keep as one node (not trace into) for match()

    def match(self, capture, node: fx.Node) -> OpSpec | None:
        raise NotImplementedError

    def rect(self, walk, node: fx.Node, spec: OpSpec) -> Rect | None:
        raise NotImplementedError

    def plan(self, builder, node: fx.Node, spec: OpSpec, rect: Rect) -> Step:
        raise NotImplementedError

    def run(self, runner, step: Step, state) -> torch.Tensor:
        raise NotImplementedError

    def rewrite(self, gm: fx.GraphModule) -> fx.GraphModule:
        """A graph pass run once at capture, before any node is matched (default: none)."""
        return gm

    def macs(self, walk, node: fx.Node, spec: OpSpec, out_hw: tuple[int, int]) -> int:
        """Multiply-adds of the node over an output of `out_hw` cells (counted for conv layers only)."""
        return 0

    def full_step(self, builder, node: fx.Node, spec: OpSpec, inputs: list[fx.Node]) -> Step | None:
        """A cheaper step for the node in the global part, or None for the stock op."""
        return None

    def __repr__(self) -> str:
        return type(self).__name__


# ---- sliding windows: conv, max / average pooling ------------------------------------------------------
class WindowRule(Rule):
    """A node that computes each output cell from a window of its input (eq. 13-16)."""

    kind = "window"
    pad_value = 0.0

    def window_spec(self, walk, node, spec) -> OpSpec | None:
        """The spec with shape-dependent parameters resolved, or None when a padding-0 window can't do it."""
        return spec

    def rect(self, walk, node, spec):
        x = spec.inputs[0]
        in_hw, out_hw = walk.spatial(x), walk.spatial(node)
        if in_hw is None:
            return None
        spec = self.window_spec(walk, node, spec)
        if spec is None:
            return None
        rin = walk.rects[x]
        wy = self._window1d(rin.y, out_hw[0], spec, 0, walk.tau)
        wx = self._window1d(rin.x, out_hw[1], spec, 1, walk.tau)
        rect = Rect(wy.out, wx.out)
        return None if rect.covers_map() else rect  # the whole map: stock execution is as cheap

    @staticmethod
    def _window1d(rect1d, out_extent, spec, d, tau) -> geo.Window1D:
        return geo.sliding_window(rect1d, out_extent, spec.kernel[d], spec.stride[d], spec.pad_before[d],
                                  spec.dilation[d], tau)

    def plan(self, builder, node, spec, rect):
        x = spec.inputs[0]
        spec = self.window_spec(builder, node, spec)
        rin = builder.rects[x]
        wy = self._window1d(rin.y, rect.y.extent, spec, 0, builder.tau)
        wx = self._window1d(rin.x, rect.x.extent, spec, 1, builder.tau)
        step = Step(self, node, [x], spec, fresh=True)
        step.read_origin = torch.from_numpy(np.stack([wy.read_origin, wx.read_origin], axis=1).copy())
        step.read_size = (wy.read_size, wx.read_size)
        step.pad_value = self.pad_value
        step.tmp_bytes = int(builder.shapes[x][1]) * wy.read_size * wx.read_size * builder.elem
        return step

    def run(self, runner, step, state):
        x = step.inputs[0]
        window = ops.stitch(runner.mat3[x], state.patches[x], runner.origins_of(x, state),
                            runner.read_origins[step.node][state.start:state.stop], step.read_size[0],
                            step.read_size[1], step.pad_value)
        return self.window_op(runner, step, window)

    def window_op(self, runner, step, window: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ConvRule(WindowRule):
    """nn.Conv2d (zero padding) and F.conv2d with constant weights; batch norm after it is folded in."""

    def match(self, capture, node):
        found = _module_input(capture, node, nn.Conv2d)
        if found is not None:
            m, x = found
            if m.padding_mode != "zeros":
                return None
            return self._spec([x], m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        if node.op == "call_function" and node.target is F.conv2d:
            return self.functional_spec(capture, _bind(_sig_conv2d, node.args, node.kwargs))
        return None

    def functional_spec(self, capture, a: dict) -> OpSpec | None:
        """The spec of a functional conv (arguments bound as in F.conv2d) with constant weights."""
        w = capture.constant(a["weight"])
        b = capture.constant(a["bias"]) if a["bias"] is not None else None
        if w is None or (a["bias"] is not None and b is None) or not isinstance(a["input"], fx.Node):
            return None
        return self._spec([a["input"]], w, b, a["stride"], a["padding"], a["dilation"], a["groups"])

    def _spec(self, inputs, weight, bias, stride, padding, dilation, groups) -> OpSpec | None:
        if weight.dim() != 4:
            return None
        kernel = (int(weight.shape[2]), int(weight.shape[3]))
        dilation = _pair(dilation)
        if isinstance(padding, str):
            if padding == "valid":
                pad_before = (0, 0)
            else:  # "same": PyTorch puts the odd extra cell at the end
                pad_before = tuple((d * (k - 1)) // 2 for k, d in zip(kernel, dilation))
        else:
            pad_before = _pair(padding)
        return OpSpec(self, inputs, kernel=kernel, stride=_pair(stride), pad_before=pad_before,
                      dilation=dilation, weight=weight, bias=bias, groups=int(groups),
                      extra={"padding": padding})

    def macs(self, walk, node, spec, out_hw):
        c_in_per_group = int(spec.weight.shape[1])
        return c_in_per_group * spec.kernel[0] * spec.kernel[1] * int(walk.shapes[node][1]) * out_hw[0] * out_hw[1]

    def plan(self, builder, node, spec, rect):
        step = super().plan(builder, node, spec, rect)
        step.weight, step.bias = builder.conv_weights(node, spec)
        return step

    def window_op(self, runner, step, window):
        spec = step.spec
        return F.conv2d(window, runner.weights[step.node], step.bias, spec.stride, 0, spec.dilation, spec.groups)

    def full_step(self, builder, node, spec, inputs):
        if builder.foldable_batchnorm(node) is None:
            return None
        # stock conv with batch norm folded in: one pass over the full tensor less
        weight, bias = builder.conv_weights(node, spec)
        return Step(_FULL_CONV, node, inputs, spec, full=True, weight=weight, bias=bias, fresh=True)


class _FullConv:
    """Global-part conv with its batch norm folded in (ConvRule.full_step)."""

    kind = "full_conv"

    def run(self, runner, step, state):
        spec = step.spec
        # the runner's copy of the weight is in the windows' memory format: handing oneDNN the plain one with
        # a channels_last input made it reorder the weight on every call (resnet18 S16: 1.3% of a request)
        return F.conv2d(state.fulls[step.inputs[0]], runner.weights[step.node], step.bias, spec.stride,
                        spec.extra["padding"], spec.dilation, spec.groups)


_FULL_CONV = _FullConv()


class LinearRule(Rule):
    """nn.Linear (a classifier head): never incremental (its output is not spatial); in the global part it
    runs on oneDNN's matmul where torch has it (CPU): F.linear goes to MKL's sgemm, which reached 37 GMAC/s
    on VGG16's fc6 (batch 191, one core) against 92 GMAC/s for oneDNN on the same weights (no copy of them).
    Its rounding differs from sgemm's by float32 ulps (the exactness tests bound it)."""

    kind = "linear"

    def match(self, capture, node):
        found = _module_input(capture, node, nn.Linear)
        if found is None:
            return None
        m, x = found
        return OpSpec(self, [x], weight=m.weight, bias=m.bias)

    def rect(self, walk, node, spec):
        return None

    def full_step(self, builder, node, spec, inputs):
        if not _onednn_linear_runs(spec.weight):
            return None
        return Step(_FULL_LINEAR, node, inputs, spec, full=True, fresh=True)


def _onednn_linear_runs(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class _FullLinear:
    """Global-part nn.Linear on oneDNN (LinearRule.full_step)."""

    kind = "full_linear"

    def run(self, runner, step, state):
        x = state.fulls[step.inputs[0]]
        weight, bias = step.spec.weight, step.spec.bias
        if x.dim() != 2 or x.dtype != weight.dtype:  # what oneDNN's op takes; anything else: the stock op
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


_FULL_LINEAR = _FullLinear()


class _PoolRule(WindowRule):
    functional: Callable
    module_type: type
    signature: Callable

    def match(self, capture, node):
        found = _module_input(capture, node, self.module_type)
        if found is not None:
            m, x = found
            params = inspect.signature(self.signature).parameters
            return self.pool_spec(x, {k: getattr(m, k) for k in params if k != "input" and hasattr(m, k)})
        if node.op == "call_function" and node.target is self.functional:
            a = _bind(self.signature, node.args, node.kwargs)
            return self.pool_spec(a.pop("input"), a)
        return None

    def pool_spec(self, x, a: dict) -> OpSpec | None:
        if not isinstance(x, fx.Node) or a.get("return_indices"):
            return None
        kernel = _pair(a["kernel_size"])
        stride = a.get("stride")
        stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
        return OpSpec(self, [x], kernel=kernel, stride=stride, pad_before=_pair(a.get("padding", 0)),
                      dilation=_pair(a.get("dilation", 1)), ceil_mode=bool(a.get("ceil_mode", False)),
                      extra={"divisor_override": a.get("divisor_override"),
                             "count_include_pad": a.get("count_include_pad", True)})


class MaxPoolRule(_PoolRule):
    """nn.MaxPool2d / F.max_pool2d (ceil_mode too: the window pads with -inf, which max ignores)."""

    functional, signature, module_type = staticmethod(F.max_pool2d), staticmethod(_sig_max_pool2d), nn.MaxPool2d
    pad_value = float("-inf")

    def window_op(self, runner, step, window):
        spec = step.spec
        return F.max_pool2d(window, spec.kernel, spec.stride, 0, spec.dilation)


class AvgPoolRule(_PoolRule):
    """nn.AvgPool2d / F.avg_pool2d. Not incremental (global) where the divisor varies at the borders:
    count_include_pad=False with padding, or a ceil_mode window that overflows the map."""

    functional, signature, module_type = staticmethod(F.avg_pool2d), staticmethod(_sig_avg_pool2d), nn.AvgPool2d

    def pool_spec(self, x, a):
        spec = super().pool_spec(x, a)
        if spec is not None and not spec.extra["count_include_pad"] and any(spec.pad_before):
            return None  # a padding-0 window would not know how many cells the divisor counts
        return spec

    def window_spec(self, walk, node, spec):
        in_hw, out_hw = walk.spatial(spec.inputs[0]), walk.spatial(node)
        for d in range(2):
            floor_out = (in_hw[d] + 2 * spec.pad_before[d] - spec.kernel[d]) // spec.stride[d] + 1
            if out_hw[d] != floor_out:
                return None  # ceil_mode overflow: the divisor shrinks at the end
        return spec

    def window_op(self, runner, step, window):
        spec = step.spec
        return F.avg_pool2d(window, spec.kernel, spec.stride, 0, False, True, spec.extra["divisor_override"])


class AdaptiveAvgPoolRule(AvgPoolRule):
    """nn.AdaptiveAvgPool2d / F.adaptive_avg_pool2d: a plain average pooling when the input divides evenly."""

    adaptive = staticmethod(F.adaptive_avg_pool2d)

    def match(self, capture, node):
        found = _module_input(capture, node, nn.AdaptiveAvgPool2d)
        if found is not None:
            return OpSpec(self, [found[1]], extra={"output_size": found[0].output_size})
        if node.op == "call_function" and node.target is self.adaptive:
            a = _bind(_sig_adaptive, node.args, node.kwargs)
            if isinstance(a["input"], fx.Node):
                return OpSpec(self, [a["input"]], extra={"output_size": a["output_size"]})
        return None

    def window_spec(self, walk, node, spec):
        in_hw, out_hw = walk.spatial(spec.inputs[0]), walk.spatial(node)
        if in_hw[0] % out_hw[0] or in_hw[1] % out_hw[1]:
            return None
        k = (in_hw[0] // out_hw[0], in_hw[1] // out_hw[1])
        return OpSpec(self, spec.inputs, kernel=k, stride=k, extra={"divisor_override": None})


# ---- element-wise ops ------------------------------------------------------------------------------------
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity,
    nn.Threshold, nn.LogSigmoid, nn.Tanhshrink, nn.Softsign,
)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.sigmoid, F.tanh, F.logsigmoid, torch.relu, torch.relu_,
    torch.sigmoid, torch.tanh, torch.exp, torch.clamp, torch.clip, torch.neg, torch.abs, torch.square,
    operator.neg,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clamp_min",
    "clamp_max", "neg", "abs", "exp", "square", "contiguous",
}
# add/sub/mul/div in every spelling fx records, mapped to the out-of-place function
_ARITHMETIC = {
    operator.add: torch.add, operator.iadd: torch.add, torch.add: torch.add, "add": torch.add,
    "add_": torch.add, operator.sub: torch.sub, operator.isub: torch.sub, torch.sub: torch.sub,
    "sub": torch.sub, "sub_": torch.sub, operator.mul: torch.mul, operator.imul: torch.mul,
    torch.mul: torch.mul, "mul": torch.mul, "mul_": torch.mul, operator.truediv: torch.div,
    operator.itruediv: torch.div, "div": torch.div, "div_": torch.div,
}


def _arithmetic(node: fx.Node) -> Callable | None:
    if node.op in ("call_function", "call_method") and not node.kwargs and len(node.args) == 2:
        try:
            return _ARITHMETIC.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


def _per_channel_constant(capture, value) -> torch.Tensor | None:
    """A get_attr tensor that broadcasts against (N, C, H, W) without varying over N, H or W, else None."""
    t = capture.constant(value)
    if t is None or t.dim() > 4:
        return None
    shape = (1,) * (4 - t.dim()) + tuple(t.shape)
    return t if shape[0] == 1 and shape[2] == 1 and shape[3] == 1 else None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _relu6_(x: torch.Tensor) -> torch.Tensor:
    return F.hardtanh_(x, 0.0, 6.0)


class ElementwiseRule(Rule):
    """Per-cell ops with one changing input: activations, eval dropout, arithmetic with a scalar."""

    kind = "unary"

    def match(self, capture, node):
        found = _module_input(capture, node, _ELEMENTWISE_MODULES + _DROPOUT_MODULES)
        if found is not None:
            m, x = found
            if isinstance(m, _DROPOUT_MODULES):
                return OpSpec(self, [x], apply=_identity) if not m.training else None
            extra = {"inplace": bool(getattr(m, "inplace", False))}
            if type(m) is nn.ReLU:
                extra["inplace_fn"] = torch.relu_
            elif type(m) is nn.ReLU6:
                extra["inplace_fn"] = _relu6_
            return OpSpec(self, [x], apply=m, extra=extra)
        fn = _arithmetic(node)
        if fn is not None:
            return self.operand_spec(capture, node, fn)
        t, args, kwargs = node.target, node.args, node.kwargs
        if node.op == "call_function":
            if t is F.dropout or t is F.dropout2d:
                training = kwargs.get("training", args[2] if len(args) > 2 else True)
                return None if training else OpSpec(self, [args[0]], apply=_identity)
            if t in _ELEMENTWISE_FUNCTIONS:
                spec = self._call_spec(node, lambda p, *a, **k: t(p, *a, **k))
                if spec is not None and t in (F.relu, torch.relu) and len(args) == 1:
                    spec.extra["inplace_fn"] = torch.relu_
                return spec
        if node.op == "call_method" and t in _ELEMENTWISE_METHODS:
            return self._call_spec(node, lambda p, *a, **k: getattr(p, t)(*a, **k))
        return None

    def operand_spec(self, capture, node, fn) -> OpSpec | None:
        """Arithmetic of a changing map with a scalar, or with a constant tensor that is the same at every
        pixel (one value per channel, e.g. ConvNeXt's layer scale `gamma * x`): element-wise."""
        a, b = node.args
        ca, cb = _per_channel_constant(capture, a), _per_channel_constant(capture, b)
        if isinstance(a, fx.Node) and ca is None and (isinstance(b, (int, float)) or cb is not None):
            b = b if cb is None else cb
            return OpSpec(self, [a], apply=lambda p: fn(p, b))
        if isinstance(b, fx.Node) and cb is None and (isinstance(a, (int, float)) or ca is not None):
            a = a if ca is None else ca
            return OpSpec(self, [b], apply=lambda p: fn(a, p))
        return None

    def _call_spec(self, node, call) -> OpSpec | None:
        """Element-wise function/method whose only tensor argument is the first one."""
        args, kwargs = list(node.args), dict(node.kwargs)
        if not args or not isinstance(args[0], fx.Node):
            return None
        rest = args[1:]
        if any(isinstance(v, fx.Node) for v in rest + list(kwargs.values())):
            return None
        inplace = bool(kwargs.get("inplace", False)) or str(node.target).endswith("_")
        return OpSpec(self, [args[0]], apply=lambda p: call(p, *rest, **kwargs), extra={"inplace": inplace})

    def rect(self, walk, node, spec):
        x = spec.inputs[0]
        return walk.rects[x] if walk.shapes[node] == walk.shapes[x] else None

    def plan(self, builder, node, spec, rect):
        x = spec.inputs[0]
        step = Step(self, node, [x], spec, may_alias=True)
        step.clone_input = bool(spec.extra.get("inplace")) and len(x.users) > 1
        step.inplace = "inplace_fn" in spec.extra and builder.exclusive(x)
        return step

    def run(self, runner, step, state):
        p = state.patches[step.inputs[0]]
        if step.inplace:
            return step.spec.extra["inplace_fn"](p)
        return step.spec.apply(p.clone() if step.clone_input else p)

    def full_step(self, builder, node, spec, inputs):
        if "inplace_fn" not in spec.extra or len(inputs) != 1 or len(inputs[0].users) != 1:
            return None
        producer = builder.full_producer.get(inputs[0])
        if producer is None or not (producer.full and producer.fresh):
            return None
        # the input tensor is fresh and seen only here: update it in place
        return Step(_FULL_INPLACE, node, inputs, spec, full=True, may_alias=True, allocates=False)


class _FullInplace:
    kind = "full_inplace"

    def run(self, runner, step, state):
        return step.spec.extra["inplace_fn"](state.fulls[step.inputs[0]])


_FULL_INPLACE = _FullInplace()


class BatchNormRule(Rule):
    """Eval-mode nn.BatchNorm2d: folded into the conv before it when that conv feeds only it."""

    kind = "unary"

    def match(self, capture, node):
        found = _module_input(capture, node, nn.BatchNorm2d)
        if found is None:
            return None
        m, x = found
        if m.training or not m.track_running_stats or m.running_mean is None:
            return None
        return OpSpec(self, [x], apply=m, extra={"batchnorm": m})

    def rect(self, walk, node, spec):
        x = spec.inputs[0]
        return walk.rects[x] if walk.shapes[node] == walk.shapes[x] else None

    def plan(self, builder, node, spec, rect):
        x = spec.inputs[0]
        if builder.folded_into(node) is not None:
            return Step(_ALIAS, node, [x], spec, may_alias=True, allocates=False)
        return Step(self, node, [x], spec)

    def run(self, runner, step, state):
        return step.spec.apply(state.patches[step.inputs[0]])

    def full_step(self, builder, node, spec, inputs):
        if builder.folded_into(node) is None:
            return None
        fresh = builder.full_producer[inputs[0]].fresh  # the conv's own new tensor: still seen by no one else
        return Step(_FULL_ALIAS, node, inputs, spec, full=True, may_alias=True, allocates=False, fresh=fresh)


class _Alias:
    """The value of a batch norm that was folded into its conv: the conv's output, unchanged."""

    kind = "alias"

    def run(self, runner, step, state):
        return state.patches[step.inputs[0]]


class _FullAlias(_Alias):
    kind = "full_alias"

    def run(self, runner, step, state):
        return state.fulls[step.inputs[0]]


_ALIAS, _FULL_ALIAS = _Alias(), _FullAlias()


# ---- several changing inputs: element-wise binary ops and channel concat -------------------------------
class _BoxedRule(Rule):
    """Inputs are stitched into the bounding box of their changed regions (eq. 20)."""

    def rect(self, walk, node, spec):
        rects = [walk.rects[i] for i in spec.inputs]
        return Rect(geo.bounding_box([r.y for r in rects], walk.tau), geo.bounding_box([r.x for r in rects], walk.tau))

    def plan(self, builder, node, spec, rect):
        step = Step(self, node, list(spec.inputs), spec, fresh=True)
        step.stitch_inputs = [not builder.rects[i].same_as(rect) for i in spec.inputs]
        step.tmp_bytes = sum(builder.patch_bytes(i, rect) for i, s in zip(spec.inputs, step.stitch_inputs) if s)
        return step

    def boxed_inputs(self, runner, step, state) -> list[torch.Tensor]:
        rect = runner.plan.rects[step.node]
        box_origin = runner.origins_of(step.node, state)
        parts = []
        for i, needs in zip(step.inputs, step.stitch_inputs):
            if needs:
                parts.append(ops.stitch(runner.mat3[i], state.patches[i], runner.origins_of(i, state), box_origin,
                                        rect.size[0], rect.size[1], 0.0))
            else:
                parts.append(state.patches[i])
        return parts


class BinaryRule(_BoxedRule):
    """add/sub/mul/div of two changing maps of the same shape."""

    kind = "binary"

    def match(self, capture, node):
        fn = _arithmetic(node)
        if fn is None or not all(isinstance(v, fx.Node) for v in node.args):
            return None
        return OpSpec(self, list(node.args), binary=fn)

    def rect(self, walk, node, spec):
        a, b = spec.inputs
        if not walk.shapes[a] == walk.shapes[b] == walk.shapes[node]:
            return None
        return super().rect(walk, node, spec)

    def run(self, runner, step, state):
        a, b = self.boxed_inputs(runner, step, state)
        return step.spec.binary(a, b)

    def full_step(self, builder, node, spec, inputs):
        """Global part (e.g. ResNet's residual adds once the change covers the map): written into an operand
        that is a fresh full tensor of the output's shape seen only here, else a new tensor. Either way the
        output is fresh, so a ReLU after it runs in place too (resnet18 S16: two fewer full maps per add)."""
        a, b = spec.inputs
        if spec.binary not in _BINARY_INTO or any(builder.shapes.get(n) is None for n in (node, a, b)):
            return None  # sizes (e.g. h * w of x.size()) and a subclass's own ops: the stock op
        shape = builder.shapes[node]
        for target, other in ((a, b), (b, a)) if spec.binary in _COMMUTATIVE else ((a, b),):
            producer = builder.full_producer.get(target)
            if (len(target.users) == 1 and builder.shapes[target] == shape and producer is not None
                    and producer.fresh and target is not other):
                return Step(_FULL_BINARY_INTO, node, [target, other], spec, full=True, may_alias=True,
                            allocates=False, fresh=True)
        return Step(_FULL_BINARY, node, [a, b], spec, full=True, fresh=True)


_COMMUTATIVE = (torch.add, torch.mul)
_BINARY_INTO = {torch.add: torch.Tensor.add_, torch.sub: torch.Tensor.sub_, torch.mul: torch.Tensor.mul_,
                torch.div: torch.Tensor.div_}


class _FullBinary:
    """A global binary op into a new tensor (fresh, unlike the stock op's result, which may be anything)."""

    kind = "full_binary"

    def run(self, runner, step, state):
        a, b = step.inputs  # full batch tensors, or the clean values of constant nodes (state.env)
        return step.spec.binary(state.env[a], state.env[b])


class _FullBinaryInto:
    """inputs = [target, other]: target's tensor (fresh, read only here) receives the result. The target is
    the first operand unless the op commutes, so binary(target, other) is always the node's own value."""

    kind = "full_binary_into"

    def run(self, runner, step, state):
        target, other = state.fulls[step.inputs[0]], state.env[step.inputs[1]]
        if torch.result_type(target, other) != target.dtype:  # would not fit the target's dtype (planned as
            return step.spec.binary(target, other)  # in place: never the case for a model in one dtype)
        return _BINARY_INTO[step.spec.binary](target, other)


_FULL_BINARY, _FULL_BINARY_INTO = _FullBinary(), _FullBinaryInto()


class CatRule(_BoxedRule):
    """torch.cat along channels of maps with one spatial size."""

    kind = "cat"
    function = staticmethod(torch.cat)

    def match(self, capture, node):
        if node.op != "call_function" or node.target is not self.function:
            return None
        a = _bind(_sig_cat, node.args, node.kwargs)
        tensors = a["tensors"]
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(v, fx.Node) for v in tensors):
            return None
        if a.get("dim", 0) not in (1, -3):
            return None
        return OpSpec(self, list(tensors))

    def rect(self, walk, node, spec):
        if any(walk.spatial(i) != walk.spatial(node) for i in spec.inputs):
            return None
        return super().rect(walk, node, spec)

    def run(self, runner, step, state):
        return torch.cat(self.boxed_inputs(runner, step, state), dim=1)


# ---- explicit constant padding ---------------------------------------------------------------------------
class PadRule(Rule):
    """nn.ZeroPad2d / nn.ConstantPad2d / F.pad(mode="constant"): only moves the region (the border is constant)."""

    kind = "pad"

    def match(self, capture, node):
        found = _module_input(capture, node, (nn.ZeroPad2d, nn.ConstantPad2d))
        if found is not None:
            return self._spec(found[1], found[0].padding)
        a = self.functional_args(node)
        if a is not None:
            pad = tuple(a["pad"])
            if a.get("mode", "constant") != "constant" or len(pad) not in (2, 4):
                return None
            return self._spec(a["input"], pad + (0, 0) if len(pad) == 2 else pad)
        return None

    def functional_args(self, node) -> dict | None:
        """F.pad's arguments (input, pad, mode) when `node` is a functional constant pad."""
        if node.op == "call_function" and node.target is F.pad:
            return _bind(_sig_pad, node.args, node.kwargs)
        return None

    def _spec(self, x, pad) -> OpSpec | None:
        left, right, top, bottom = (int(v) for v in pad)
        if not isinstance(x, fx.Node) or min(left, right, top, bottom) < 0:
            return None
        return OpSpec(self, [x], pads=(top, bottom, left, right))

    def rect(self, walk, node, spec):
        top, _, left, _ = spec.pads
        h, w = walk.spatial(node)
        rin = walk.rects[spec.inputs[0]]
        return Rect(geo.padded(rin.y, top, h), geo.padded(rin.x, left, w))

    def plan(self, builder, node, spec, rect):
        return Step(self, node, [spec.inputs[0]], spec, may_alias=True, allocates=False)

    def run(self, runner, step, state):
        return state.patches[step.inputs[0]]


DEFAULT_RULES: tuple[Rule, ...] = (
    ConvRule(), MaxPoolRule(), AvgPoolRule(), AdaptiveAvgPoolRule(), BatchNormRule(), ElementwiseRule(),
    BinaryRule(), CatRule(), PadRule(), LinearRule(),
)
