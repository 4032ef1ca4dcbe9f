"""Model capture: a torch.fx trace of the user's nn.Module, each node claimed by a rule or left global.

Every fx node is offered to the rules (rules.py) in order; the first that returns an `OpSpec` owns it.
A node no rule claims is *global*: it runs on full tensors after the changed regions are projected
into copies of the materialized activations, so an unknown op only ends the incremental part earlier.
Shapes are not known here (they depend on the input size); the rules check them when planning.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from . import formats
from .errors import ModelError
from .inplace import point_readers_at_inplace_results
from .nodes import OpSpec
from .rules import DEFAULT_RULES, Rule
from .rules_aten import ATEN_RULES
from .rules_pixel import PIXEL_RULES


def trace(model: nn.Module, leaf_modules: tuple[type, ...] = ()) -> tuple[fx.GraphModule, str | None]:
    """Symbolically trace `model` (modules of `leaf_modules` stay single nodes, for the rules that own
    them): (graph module, None), or a one-node graph and the reason fx failed. A program from
    torch.export (formats.as_module) already is a graph: it is used as it is, not re-traced."""
    if getattr(model, "krypton_exported", False):
        return model, None
    if formats.is_torchscript(model):
        return _opaque(model, formats.TORCHSCRIPT_REASON)

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaf_modules) or super().is_leaf_module(m, qualname)

    try:
        tracer = Tracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__), None
    except Exception as exc:  # noqa: BLE001 - any tracing failure only means "no incremental part"
        return _opaque(model, f"{type(model).__name__} is not traceable by torch.fx "
                              f"({type(exc).__name__}: {str(exc)[:200]})")


def _opaque(model: nn.Module, reason: str) -> tuple[fx.GraphModule, str]:
    """A one-node graph that calls the whole model: it runs naive (full re-inference) and says why."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_module("model", (x,)))
    root = nn.Module()
    root.model = model
    return fx.GraphModule(root, graph), reason


class Capture:
    """A traced model plus an OpSpec (or None = global) per node, and caches that depend only on it."""

    def __init__(self, model: nn.Module, rules: Iterable[Rule] = ()):
        if model.training:
            raise ModelError("model must be in eval mode (call model.eval()): batch norm and dropout "
                             "in training mode depend on the whole batch")
        self.rules: tuple[Rule, ...] = tuple(rules) + DEFAULT_RULES + ATEN_RULES + PIXEL_RULES
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"rules must be krypton.rules.Rule instances, got {type(rule).__name__}")
        leaves = tuple(t for rule in self.rules for t in rule.leaf_modules)
        self.gm, self.trace_failure = trace(model, leaves)
        point_readers_at_inplace_results(self.gm)
        for rule in self.rules:  # graph passes of the rules (e.g. fusing a per-pixel NHWC chain into one node)
            self.gm = rule.rewrite(self.gm)
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.nodes: list[fx.Node] = list(self.gm.graph.nodes)
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(self.placeholders) != 1:
            raise ModelError(f"model.forward must take exactly one tensor input, got {len(self.placeholders)}")
        self.specs: dict[fx.Node, OpSpec | None] = {n: self._claim(n) for n in self.nodes}
        self.shape_cache: dict = {}  # (input shape, dtype) -> node shapes, filled by the planner
        self.folded_weights: dict = {}  # (conv node, dtype) -> conv weights with batch norm folded in

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def constant(self, value) -> torch.Tensor | None:
        """A get_attr node's tensor (weights of functional convs), else None."""
        if isinstance(value, fx.Node) and value.op == "get_attr":
            obj = self.gm
            for part in value.target.split("."):
                obj = getattr(obj, part)
            return obj if isinstance(obj, torch.Tensor) else None
        return None

    def _claim(self, node: fx.Node) -> OpSpec | None:
        if node.op not in ("call_module", "call_function", "call_method"):
            return None
        for rule in self.rules:
            try:
                spec = rule.match(self, node)
            except (TypeError, ValueError):  # unexpected argument shapes: not this rule's node
                spec = None
            if spec is not None:
                return spec
        return None
