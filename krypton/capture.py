"""Model capture: a torch.fx trace of the user's nn.Module, each node claimed by a rule or left global.

Every fx node is offered to the rules (rules.py) in order; the first that returns an `OpSpec` owns it.
A node no rule claims is *global*: it runs on full tensors after the changed regions are projected
into copies of the materialized activations, so an unknown op only ends the incremental part earlier.
Shapes are not known here (they depend on the input size); the rules check them when planning.
"""
from __future__ import annotations

import copy
import warnings
import weakref
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

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


_CLASSIFIER = "krypton_classifier"
_LINEAR_FUNCTIONS = (F.linear, torch.ops.aten.linear.default)


class SourcePrecisionLinear(nn.Module):
    """A converted capture's classifier in the source's precision: its input is cast up and the logits stay
    there. Logits rounded to bf16 (8 significant bits) cost more heatmap quality than every other rounding
    together (EfficientNet-Lite0, chelsea, P16 S8: SSIM against float32 0.954 -> 0.996), and the
    classifier is a negligible share of the work."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.to(self.linear.weight.dtype))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A parameter or buffer cast to `dtype` (floating ones only), for a converted copy of a module."""
    value = t.detach().to(dtype) if t.is_floating_point() else t.detach().clone()
    return nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value


def _classifier(capture: "Capture") -> tuple[fx.Node, nn.Linear] | None:
    """(node, a copy of its layer) when the model's output is computed by a linear layer with constant
    weights: an nn.Linear, or F.linear / aten.linear (torch.export) of get_attr tensors."""
    output = next(n for n in capture.nodes if n.op == "output")
    node = output.args[0]
    if not isinstance(node, fx.Node) or node.op not in ("call_module", "call_function"):
        return None
    if node.op == "call_module":
        module = capture.module(node)
        return (node, copy.deepcopy(module)) if isinstance(module, nn.Linear) and len(node.args) == 1 else None
    if node.target not in _LINEAR_FUNCTIONS or node.kwargs or len(node.args) not in (2, 3):
        return None
    weight = capture.constant(node.args[1])
    bias = capture.constant(node.args[2]) if len(node.args) == 3 and node.args[2] is not None else None
    if weight is None or weight.dim() != 2 or (bias is None and len(node.args) == 3 and node.args[2] is not None):
        return None
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return node, linear.eval()


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
        self.source: Capture | None = None  # the capture this one was converted from (converted())
        self._claim_nodes()

    def converted(self, dtype: torch.dtype) -> "Capture":
        """The same graph in another floating dtype: a copy of the traced module with its floating parameters
        and buffers cast (this capture and the user's model stay as they are), its nodes claimed again,
        except a linear classifier that computes the output: it keeps this capture's precision
        (SourcePrecisionLinear). Its nodes have the names of this capture's (`node_named`), so activations
        can be carried over."""
        other = copy.copy(self)
        classifier = _classifier(self)
        # the copy gets cast tensors directly: a float32 copy first would hold the weights twice more
        memo = {id(t): _cast(t, dtype) for t in (*self.gm.parameters(), *self.gm.buffers())}
        with warnings.catch_warnings():  # a copied TorchScript module's parameters are not autograd leaves
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            other.gm = copy.deepcopy(self.gm, memo).to(dtype)
        if classifier is not None:
            node, linear = classifier
            node = next(n for n in other.gm.graph.nodes if n.name == node.name)
            other.gm.add_submodule(_CLASSIFIER, SourcePrecisionLinear(linear))
            node.op, node.target, node.args, node.kwargs = "call_module", _CLASSIFIER, (node.args[0],), {}
            other.gm.recompile()
            other.gm.delete_all_unused_submodules()  # the converted copy of the classifier
        other.source = self
        other._claim_nodes()
        return other

    def node_named(self, name: str) -> fx.Node:
        return self._by_name[name]

    def _claim_nodes(self) -> None:
        self.nodes: list[fx.Node] = list(self.gm.graph.nodes)
        self._by_name = {n.name: n for n in self.nodes}
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(self.placeholders) != 1:
            raise ModelError(f"model.forward must take exactly one tensor input, got {len(self.placeholders)}")
        self.specs: dict[fx.Node, OpSpec | None] = {n: self._claim(n) for n in self.nodes}
        self.shape_cache: dict = {}  # (input shape, dtype) -> node shapes, filled by the planner
        self.folded_weights: dict = {}  # (conv node, bn node) -> conv weights with batch norm folded in
        self._laid_out: dict = {}  # (id(weight), memory format) -> (weakref to weight, weight in that format)

    def laid_out(self, weight: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
        """`weight` in `memory_format`, converted once: every plan, group and run of this capture shares the
        copy (converting per run cost VGG16 ~40 ms of copies each time)."""
        key = (id(weight), memory_format)
        held = self._laid_out.get(key)
        if held is None or held[0]() is not weight:
            held = (weakref.ref(weight), weight.contiguous(memory_format=memory_format))
            self._laid_out[key] = held
        return held[1]

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
