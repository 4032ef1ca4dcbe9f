"""In-place ops in captured graphs: which nodes write into their input, and a pass that makes nothing
depend on such a write (the engine keeps, and stitches from, every node's clean value)."""
from __future__ import annotations

import operator

import torch.fx as fx

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def is_inplace(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Does `node` write into its first tensor argument (x.add_(y), x += y, relu_(x), ReLU(inplace=True))?"""
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        return (node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True
                or getattr(node.target, "__name__", "").endswith("_"))
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


def point_readers_at_inplace_results(gm: fx.GraphModule) -> None:
    """fx records `y.add_(z); head(y)` as head reading `y`, relying on the mutation. The engine keeps every
    node's clean value (it stitches from them), so readers after an in-place op are pointed at the op's
    result instead: then nothing depends on a mutation and every stored value stays what it was."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    changed = False
    for node in gm.graph.nodes:
        target = node.args[0] if node.args else None
        if not isinstance(target, fx.Node) or not is_inplace(gm, node):
            continue
        for user in list(target.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(target, node)
                changed = True
    if changed:
        gm.recompile()
