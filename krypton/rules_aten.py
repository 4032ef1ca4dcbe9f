"""Rules for aten-level graphs (torch.export programs): the same geometry, plans and execution as rules.py.

A torch.export program (formats.exported_graph) calls aten operators instead of modules and torch
functions: `aten.conv2d` / `aten.convolution`, `aten.batch_norm` (`_native_batch_norm_legit_no_training`
and `max_pool2d_with_indices` are rewritten to their single-output forms by formats.py, since rules own
one node with one tensor), `aten.max_pool2d`, `aten.avg_pool2d`, `aten.adaptive_avg_pool2d`, activations,
`aten.add/sub/mul/div`, `aten.cat`, `aten.pad` / `aten.constant_pad_nd`. Each rule here subclasses the
eager rule and only changes `match`. Weights are get_attr nodes (`.module()` un-lifts them), read with
`capture.constant`. Ops without a rule (aten.mean over H and W, linear, flatten...) are global, as in
eager graphs.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import rules as r
from .nodes import OpSpec

aten = torch.ops.aten


def _sig_convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups): ...
def _sig_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled): ...
def _sig_constant_pad_nd(input, pad, value=0): ...


class AtenConvRule(r.ConvRule):
    """aten.conv2d (numeric or string padding) and aten.convolution (not transposed)."""

    def match(self, capture, node):
        if node.op != "call_function":
            return None
        if node.target in (aten.conv2d.default, aten.conv2d.padding):
            return self.functional_spec(capture, r._bind(r._sig_conv2d, node.args, node.kwargs))
        if node.target is aten.convolution.default:
            a = r._bind(_sig_convolution, node.args, node.kwargs)
            if a["transposed"] or any(a["output_padding"]):
                return None
            return self.functional_spec(capture, a)
        return None


class AtenMaxPoolRule(r.MaxPoolRule):
    functional = staticmethod(aten.max_pool2d.default)


class AtenAvgPoolRule(r.AvgPoolRule):
    functional = staticmethod(aten.avg_pool2d.default)


class AtenAdaptiveAvgPoolRule(r.AdaptiveAvgPoolRule):
    adaptive = staticmethod(aten.adaptive_avg_pool2d.default)


class AtenBatchNormRule(r.BatchNormRule):
    """aten.batch_norm with training=False and constant statistics (folded into the conv before it)."""

    def match(self, capture, node):
        if node.op != "call_function" or node.target is not aten.batch_norm.default:
            return None
        a = r._bind(_sig_batch_norm, node.args, node.kwargs)
        if a["training"] or not isinstance(a["input"], fx.Node):
            return None
        mean, var = capture.constant(a["running_mean"]), capture.constant(a["running_var"])
        weight = capture.constant(a["weight"]) if a["weight"] is not None else None
        bias = capture.constant(a["bias"]) if a["bias"] is not None else None
        if mean is None or var is None or (a["weight"] is not None and weight is None) or \
                (a["bias"] is not None and bias is None):
            return None
        eps = float(a["eps"])
        bn = SimpleNamespace(running_mean=mean, running_var=var, weight=weight, bias=bias, eps=eps)  # fold_batchnorm reads these
        return OpSpec(self, [a["input"]], apply=lambda p: F.batch_norm(p, mean, var, weight, bias, False, 0.0, eps),
                      extra={"batchnorm": bn})


# element-wise aten ops whose only tensor argument is the first one
_ATEN_UNARY = {
    aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.leaky_relu.default, aten.elu.default,
    aten.gelu.default, aten.silu.default, aten.mish.default, aten.hardswish.default, aten.hardsigmoid.default,
    aten.sigmoid.default, aten.tanh.default, aten.softplus.default, aten.clamp.default, aten.clamp_min.default,
    aten.clamp_max.default, aten.neg.default, aten.abs.default, aten.exp.default, aten.clone.default,
    aten.alias.default, aten.contiguous.default,
    # in-place forms (the pre-dispatch IR keeps nn.ReLU(inplace=True) as relu_)
    aten.relu_.default, aten.relu6_.default, aten.hardtanh_.default,
    aten.leaky_relu_.default, aten.silu_.default, aten.hardswish_.default, aten.hardsigmoid_.default,
    aten.sigmoid_.default, aten.tanh_.default, aten.clamp_.default, aten.clamp_min_.default,
}
_ATEN_ARITHMETIC = {
    aten.add.Tensor: torch.add, aten.sub.Tensor: torch.sub, aten.mul.Tensor: torch.mul, aten.div.Tensor: torch.div,
    aten.add.Scalar: torch.add, aten.sub.Scalar: torch.sub, aten.mul.Scalar: torch.mul, aten.div.Scalar: torch.div,
}


def _aten_arithmetic(node: fx.Node):
    if node.op == "call_function" and not node.kwargs and len(node.args) == 2:
        return _ATEN_ARITHMETIC.get(node.target)
    return None


class AtenElementwiseRule(r.ElementwiseRule):
    """Activations, eval dropout, arithmetic with a scalar or a per-channel constant."""

    def match(self, capture, node):
        if node.op != "call_function":
            return None
        t = node.target
        if t is aten.dropout.default:
            train = node.kwargs.get("train", node.args[2] if len(node.args) > 2 else True)
            return None if train else OpSpec(self, [node.args[0]], apply=r._identity)
        fn = _aten_arithmetic(node)
        if fn is not None:
            return self.operand_spec(capture, node, fn)
        if t in _ATEN_UNARY:
            spec = self._call_spec(node, lambda p, *a, **k: t(p, *a, **k))
            if spec is not None:
                spec.extra["inplace"] = t.overloadpacket.__name__.endswith("_")
                if t in (aten.relu.default, aten.relu_.default):
                    spec.extra["inplace_fn"] = torch.relu_
            return spec
        return None


class AtenBinaryRule(r.BinaryRule):
    def match(self, capture, node):
        fn = _aten_arithmetic(node)
        if fn is None or not all(isinstance(v, fx.Node) for v in node.args):
            return None
        return OpSpec(self, list(node.args), binary=fn)


class AtenCatRule(r.CatRule):
    function = staticmethod(aten.cat.default)


class AtenPadRule(r.PadRule):
    def functional_args(self, node):
        if node.op != "call_function":
            return None
        if node.target is aten.pad.default:
            return r._bind(r._sig_pad, node.args, node.kwargs)
        if node.target is aten.constant_pad_nd.default:
            a = r._bind(_sig_constant_pad_nd, node.args, node.kwargs)
            return {"input": a["input"], "pad": a["pad"], "mode": "constant"}
        return None


ATEN_RULES: tuple[r.Rule, ...] = (
    AtenConvRule(), AtenMaxPoolRule(), AtenAvgPoolRule(), AtenAdaptiveAvgPoolRule(), AtenBatchNormRule(),
    AtenElementwiseRule(), AtenBinaryRule(), AtenCatRule(), AtenPadRule(),
)
