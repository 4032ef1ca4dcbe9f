"""Per-pixel NHWC chains: permute to channels-last, per-pixel ops over the last dim, permute back.

ConvNeXt (torchvision layout) computes LayerNorm over channels as `x.permute(0, 2, 3, 1)` ->
`layer_norm` over the last dim -> `permute(0, 3, 1, 2)` (its LayerNorm2d), and its blocks run
LayerNorm, Linear, GELU, Linear on NHWC tensors between two Permute modules. Every op in such a chain
works on one pixel's channel vector (a Linear over the channel dim is a 1x1 conv), so the chain as a
whole maps a changed region to the same region. `PixelChainRule.rewrite` fuses each chain into one
call_module node (an fx GraphModule running the same ops, so values are bit-identical), and the rule
runs it on the patch (channels_last patches make the permutes free views). Its Linear layers are counted
as the 1x1 convs they are, in the multiply-adds of full and incremental inference alike.

Chains are found in eager graphs (torch.permute / Tensor.permute, nn.LayerNorm, nn.Linear, F.layer_norm,
F.linear, element-wise modules and functions) and in torch.export graphs (aten.permute, aten.layer_norm,
aten.linear, aten element-wise ops). A chain with anything else inside stays as it is (global).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import rules as r
from .execute import _get_attr as get_attr
from .nodes import OpSpec, Step
from .rules_aten import _ATEN_UNARY

aten = torch.ops.aten
_TO_NHWC, _TO_NCHW = [0, 2, 3, 1], [0, 3, 1, 2]
_PERMUTES = {torch.permute, aten.permute.default}
_ARITH = {operator.mul, operator.add, torch.mul, torch.add, aten.mul.Tensor, aten.add.Tensor}


def _permute_dims(node: fx.Node) -> list[int] | None:
    if node.op == "call_function" and node.target in _PERMUTES and len(node.args) == 2:
        return list(node.args[1])
    if node.op == "call_method" and node.target == "permute":
        rest = node.args[1:]
        return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    return None


class PixelChain(fx.GraphModule):
    """The fused chain: NCHW in, NCHW out (the permutes are inside)."""




class PixelChainRule(r.Rule):
    kind = "pixel"

    # ---- capture: find and fuse chains -------------------------------------------------------------
    def rewrite(self, gm):
        fused = 0
        for start in list(gm.graph.nodes):
            if _permute_dims(start) != _TO_NHWC:
                continue
            chain = self._chain(gm, start)
            if chain is not None:
                self._fuse(gm, chain, f"pixel_chain_{fused}")
                fused += 1
        if fused:
            gm.graph.lint()
            gm.recompile()
        return gm

    def _chain(self, gm, start: fx.Node) -> list[fx.Node] | None:
        chain, node = [start], start
        while True:
            if len(node.users) != 1:
                return None
            node = next(iter(node.users))
            if _permute_dims(node) == _TO_NCHW:
                return chain + [node] if len(chain) > 1 else None
            if not self._per_pixel(gm, node, chain[-1]):
                return None
            chain.append(node)

    def _per_pixel(self, gm, node: fx.Node, prev: fx.Node) -> bool:
        """`node` acts on each pixel's last-dim vector of `prev` alone, with constant parameters."""
        arithmetic = node.op == "call_function" and node.target in _ARITH
        if any(i.op != "get_attr" for i in node.all_input_nodes if i is not prev):
            return False  # another changing input: not a per-pixel function of prev
        if not node.args or (node.args[0] is not prev and not (arithmetic and prev in node.args)):
            return False
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.LayerNorm):
                return len(m.normalized_shape) == 1
            return isinstance(m, (nn.Linear, *r._ELEMENTWISE_MODULES)) or (
                isinstance(m, r._DROPOUT_MODULES) and not m.training)
        if node.op != "call_function":
            return False
        t = node.target
        if t in (F.layer_norm, aten.layer_norm.default):
            return len(node.args) > 1 and len(node.args[1]) == 1
        if t in (F.linear, aten.linear.default) or t in _ATEN_UNARY or t in r._ELEMENTWISE_FUNCTIONS:
            return True
        if t in _ARITH and len(node.args) == 2:  # times / plus a constant that varies only over channels
            other = node.args[1] if node.args[0] is prev else node.args[0]
            if isinstance(other, (int, float)):
                return True
            value = _get_attr(gm, other) if isinstance(other, fx.Node) and other.op == "get_attr" else None
            return value is not None and all(s == 1 for s in value.shape[:-1]) and value.dim() <= 4
        return False

    def _fuse(self, gm, chain: list[fx.Node], name: str) -> None:
        graph = fx.Graph()
        env = {chain[0].args[0]: graph.placeholder("x")}
        for node in chain:
            for i in node.all_input_nodes:
                if i not in env:
                    env[i] = graph.node_copy(i)  # a get_attr
            env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(env[chain[-1]])
        sub = PixelChain(gm, graph, name)
        gm.add_submodule(name, sub)
        with gm.graph.inserting_before(chain[-1]):
            fused = gm.graph.call_module(name, (chain[0].args[0],))
        chain[-1].replace_all_uses_with(fused)
        for node in reversed(chain):
            constants = [i for i in node.all_input_nodes if i.op == "get_attr"]
            gm.graph.erase_node(node)
            for c in constants:
                if not c.users:
                    gm.graph.erase_node(c)

    # ---- the rule ------------------------------------------------------------------------------------
    def match(self, capture, node):
        if node.op == "call_module" and isinstance(capture.module(node), PixelChain) and len(node.args) == 1:
            sub = capture.module(node)
            return OpSpec(self, [node.args[0]], apply=sub, extra={"macs_per_pixel": _linear_macs(sub)})
        return None

    def rect(self, walk, node, spec):
        x = spec.inputs[0]
        return walk.rects[x] if walk.spatial(x) == walk.spatial(node) else None

    def macs(self, walk, node, spec, out_hw):
        return spec.extra["macs_per_pixel"] * out_hw[0] * out_hw[1]

    def plan(self, builder, node, spec, rect):
        return Step(self, node, [spec.inputs[0]], spec, fresh=True)

    def run(self, runner, step, state):
        return step.spec.apply(state.patches[step.inputs[0]])


def _get_attr(gm, node: fx.Node) -> torch.Tensor | None:
    value = get_attr(gm, node.target)
    return value if isinstance(value, torch.Tensor) else None


def _linear_macs(sub: fx.GraphModule) -> int:
    """Multiply-adds per pixel of the chain's Linear layers (in_features x out_features each)."""
    total = 0
    for node in sub.graph.nodes:
        if node.op == "call_module" and isinstance(sub.get_submodule(node.target), nn.Linear):
            m = sub.get_submodule(node.target)
            total += m.in_features * m.out_features
        elif node.op == "call_function" and node.target in (F.linear, aten.linear.default):
            w = _get_attr(sub, node.args[1]) if isinstance(node.args[1], fx.Node) else None
            total += int(w.numel()) if w is not None else 0
    return total


PIXEL_RULES = (PixelChainRule(),)
