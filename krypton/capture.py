"""Model capture: a torch.fx trace of the user's nn.Module turned into typed nodes.

Each fx node gets an `OpSpec` saying how it can run incrementally (a sliding window, an element-wise
op, an add/concat, an explicit padding) or None: then it is a *global* node, run on full tensors after
the changed regions are projected into copies of the materialized activations. An unknown op therefore
never gives a wrong answer or an error; it only ends the incremental part earlier.

Shapes are not known here (they depend on the input size); the planner checks the shape conditions.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class OpSpec:
    """How one fx node runs incrementally.

    kind: "window" (conv/pool), "unary" (element-wise with one changing input), "binary"
    (element-wise add/sub/mul of two changing maps), "cat" (channel concat), "pad" (constant padding).
    """

    kind: str
    inputs: list[fx.Node]  # the tensor inputs that may change with the occlusion
    # window nodes
    op: str = ""  # "conv", "max", "avg"
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pad_before: tuple[int, int] = (0, 0)  # (top, left)
    dilation: tuple[int, int] = (1, 1)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    groups: int = 1
    ceil_mode: bool = False
    # unary nodes: patch -> new patch
    apply: Callable[[torch.Tensor], torch.Tensor] | None = None
    # binary nodes
    binary: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # pad nodes: (top, bottom, left, right)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    extra: dict[str, Any] = field(default_factory=dict)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if len(v) in (1, 2) else (None, None)  # type: ignore[return-value]
    return (int(v), int(v))


def _bind(signature_of: Callable, args, kwargs) -> dict[str, Any]:
    return inspect.signature(signature_of).bind(*args, **kwargs).arguments


# Python signatures of the functionals we understand (fx records positional/keyword args as written).
def _sig_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...
def _sig_max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False): ...
def _sig_avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None): ...
def _sig_pad(input, pad, mode="constant", value=None): ...
def _sig_cat(tensors, dim=0): ...
def _sig_adaptive(input, output_size): ...


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
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
               operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul}
_ARITHMETIC_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_"}
_OUT_OF_PLACE = {
    operator.add: torch.add, operator.iadd: torch.add, torch.add: torch.add, "add": torch.add,
    "add_": torch.add, operator.sub: torch.sub, operator.isub: torch.sub, torch.sub: torch.sub,
    "sub": torch.sub, "sub_": torch.sub, operator.mul: torch.mul, operator.imul: torch.mul,
    torch.mul: torch.mul, "mul": torch.mul, "mul_": torch.mul, operator.truediv: torch.div,
    operator.itruediv: torch.div, "div": torch.div, "div_": torch.div,
}


def trace(model: nn.Module) -> fx.GraphModule:
    """Symbolically trace `model`; a model fx cannot trace becomes one global node (naive execution)."""
    try:
        return fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure only means "no incremental part"
        graph = fx.Graph()
        x = graph.placeholder("x")
        graph.output(graph.call_module("model", (x,)))
        root = nn.Module()
        root.model = model
        return fx.GraphModule(root, graph)


class Capture:
    """A traced model plus an OpSpec (or None = global) per node."""

    def __init__(self, model: nn.Module):
        if model.training:
            raise ValueError("model must be in eval mode (call model.eval()): batch norm and dropout "
                             "in training mode depend on the whole batch")
        self.model = model
        self.gm = trace(model)
        self.nodes: list[fx.Node] = list(self.gm.graph.nodes)
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(self.placeholders) != 1:
            raise ValueError(f"model.forward must take exactly one tensor input, got {len(self.placeholders)}")
        self.specs: dict[fx.Node, OpSpec | None] = {n: self._spec(n) for n in self.nodes}
        self.shape_cache: dict = {}  # (input shape, dtype) -> node shapes, filled by the planner

    # ---- classification -------------------------------------------------------------------------
    def _module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def _const(self, value) -> torch.Tensor | None:
        """A get_attr node's tensor (weights of functional convs), else None."""
        if isinstance(value, fx.Node) and value.op == "get_attr":
            obj = self.gm
            for part in value.target.split("."):
                obj = getattr(obj, part)
            return obj if isinstance(obj, torch.Tensor) else None
        return None

    def _spec(self, node: fx.Node) -> OpSpec | None:
        try:
            if node.op == "call_module":
                return self._module_spec(node, self._module(node))
            if node.op == "call_function":
                return self._function_spec(node)
            if node.op == "call_method":
                return self._method_spec(node)
        except (TypeError, ValueError):  # unexpected argument shapes: treat as global
            return None
        return None

    def _module_spec(self, node: fx.Node, m: nn.Module) -> OpSpec | None:
        x = node.args[0] if node.args else None
        if not isinstance(x, fx.Node) or len(node.args) != 1 or node.kwargs:
            return None
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros":
                return None
            return self._conv_spec([x], m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        if isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                return None
            return self._pool_spec("max", x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        if isinstance(m, nn.AvgPool2d):
            return self._avg_spec(x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                  m.divisor_override)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return OpSpec("window", [x], op="avg", extra={"adaptive": m.output_size})
        if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
            left, right, top, bottom = m.padding
            return self._pad_spec(x, (left, right, top, bottom))
        if isinstance(m, nn.BatchNorm2d):
            if m.training or not m.track_running_stats or m.running_mean is None:
                return None
            return OpSpec("unary", [x], apply=m, extra={"batchnorm": m})
        if isinstance(m, _DROPOUT_MODULES) and not m.training:
            return OpSpec("unary", [x], apply=_identity)
        if isinstance(m, _ELEMENTWISE_MODULES):
            extra = {"inplace": bool(getattr(m, "inplace", False))}
            if type(m) is nn.ReLU:
                extra["inplace_fn"] = torch.relu_
            elif type(m) is nn.ReLU6:
                extra["inplace_fn"] = _relu6_
            return OpSpec("unary", [x], apply=m, extra=extra)
        return None

    def _function_spec(self, node: fx.Node) -> OpSpec | None:
        t, args, kwargs = node.target, node.args, node.kwargs
        if t is F.conv2d:
            a = _bind(_sig_conv2d, args, kwargs)
            w, b = self._const(a["weight"]), self._const(a["bias"]) if a["bias"] is not None else None
            if w is None or (a["bias"] is not None and b is None) or not isinstance(a["input"], fx.Node):
                return None
            return self._conv_spec([a["input"]], w, b, a["stride"], a["padding"], a["dilation"], a["groups"])
        if t is F.max_pool2d:
            a = _bind(_sig_max_pool2d, args, kwargs)
            if a.get("return_indices"):
                return None
            return self._pool_spec("max", a["input"], a["kernel_size"], a.get("stride"), a.get("padding", 0),
                                   a.get("dilation", 1), a.get("ceil_mode", False))
        if t is F.avg_pool2d:
            a = _bind(_sig_avg_pool2d, args, kwargs)
            return self._avg_spec(a["input"], a["kernel_size"], a.get("stride"), a.get("padding", 0),
                                  a.get("ceil_mode", False), a.get("count_include_pad", True),
                                  a.get("divisor_override"))
        if t is F.adaptive_avg_pool2d:
            a = _bind(_sig_adaptive, args, kwargs)
            return OpSpec("window", [a["input"]], op="avg", extra={"adaptive": a["output_size"]})
        if t is F.pad:
            a = _bind(_sig_pad, args, kwargs)
            pad = tuple(a["pad"])
            if a.get("mode", "constant") != "constant" or len(pad) not in (2, 4):
                return None
            pad = pad + (0, 0) if len(pad) == 2 else pad
            return self._pad_spec(a["input"], pad, a.get("value") or 0.0)
        if t is torch.cat:
            a = _bind(_sig_cat, args, kwargs)
            tensors = a["tensors"]
            if not all(isinstance(v, fx.Node) for v in tensors):
                return None
            return OpSpec("cat", list(tensors), extra={"dim": a.get("dim", 0)})
        if t is F.dropout or t is F.dropout2d:
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            return None if training else OpSpec("unary", [args[0]], apply=_identity)
        if t in _ARITHMETIC:
            return self._arithmetic_spec(node, _OUT_OF_PLACE[t])
        if t in _ELEMENTWISE_FUNCTIONS:
            spec = self._call_spec(node, lambda p, *a, **k: t(p, *a, **k))
            if spec is not None and t in (F.relu, torch.relu) and len(args) == 1:
                spec.extra["inplace_fn"] = torch.relu_
            return spec
        return None

    def _method_spec(self, node: fx.Node) -> OpSpec | None:
        name = node.target
        if name in _ARITHMETIC_METHODS:
            return self._arithmetic_spec(node, _OUT_OF_PLACE[name])
        if name in _ELEMENTWISE_METHODS:
            return self._call_spec(node, lambda p, *a, **k: getattr(p, name)(*a, **k))
        return None

    # ---- spec builders --------------------------------------------------------------------------
    def _conv_spec(self, inputs, weight, bias, stride, padding, dilation, groups) -> OpSpec | None:
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
        return OpSpec("window", inputs, op="conv", kernel=kernel, stride=_pair(stride), pad_before=pad_before,
                      dilation=dilation, weight=weight, bias=bias, groups=int(groups),
                      extra={"padding": padding})

    def _pool_spec(self, op, x, kernel, stride, padding, dilation, ceil_mode) -> OpSpec | None:
        if not isinstance(x, fx.Node):
            return None
        kernel = _pair(kernel)
        stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
        return OpSpec("window", [x], op=op, kernel=kernel, stride=stride, pad_before=_pair(padding),
                      dilation=_pair(dilation), ceil_mode=bool(ceil_mode))

    def _avg_spec(self, x, kernel, stride, padding, ceil_mode, count_include_pad, divisor) -> OpSpec | None:
        spec = self._pool_spec("avg", x, kernel, stride, padding, 1, ceil_mode)
        if spec is None:
            return None
        # Without count_include_pad the divisor varies at the borders: a padding-0 window would not know.
        if not count_include_pad and any(spec.pad_before):
            return None
        spec.extra["divisor_override"] = divisor
        return spec

    def _pad_spec(self, x, pad, value=0.0) -> OpSpec | None:
        left, right, top, bottom = (int(v) for v in pad)
        if not isinstance(x, fx.Node) or min(left, right, top, bottom) < 0:
            return None
        return OpSpec("pad", [x], pads=(top, bottom, left, right), extra={"value": float(value)})

    def _arithmetic_spec(self, node: fx.Node, fn) -> OpSpec | None:
        args = list(node.args)
        if len(args) != 2 or node.kwargs:
            return None
        a, b = args
        tensors = [v for v in (a, b) if isinstance(v, fx.Node)]
        if len(tensors) == 2:
            return OpSpec("binary", tensors, binary=fn)
        if len(tensors) == 1 and isinstance(a if a is not tensors[0] else b, (int, float)):
            scalar = b if a is tensors[0] else a
            if a is tensors[0]:
                return OpSpec("unary", tensors, apply=lambda p: fn(p, scalar))
            return OpSpec("unary", tensors, apply=lambda p: fn(scalar, p))
        return None

    def _call_spec(self, node: fx.Node, call) -> OpSpec | None:
        """Element-wise function/method whose only tensor argument is the first one."""
        args, kwargs = list(node.args), dict(node.kwargs)
        if not args or not isinstance(args[0], fx.Node):
            return None
        rest = args[1:]
        if any(isinstance(v, fx.Node) for v in rest + list(kwargs.values())):
            return None
        inplace = bool(kwargs.get("inplace", False)) or str(node.target).endswith("_")
        return OpSpec("unary", [args[0]], apply=lambda p: call(p, *rest, **kwargs), extra={"inplace": inplace})


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _relu6_(x: torch.Tensor) -> torch.Tensor:
    return F.hardtanh_(x, 0.0, 6.0)
