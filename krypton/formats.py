"""Model formats: eager nn.Module, torch.export programs, TorchScript, and what each one gives capture.

- eager `nn.Module`: traced by torch.fx (capture.py); incremental.
- `torch.export` (an `ExportedProgram`, e.g. from `torch.export.load("m.pt2")`, or its `.module()`): the
  program already is an aten-level fx graph. `exported_graph` turns it into a plain GraphModule the
  engine can run on batches of positions (guards dropped, the 1-tuple output unwrapped, tuple-returning
  ops whose only use is element 0 replaced by their single-output form, batch-1 view shapes made
  batch-generic); rules_aten.py matches its aten ops. Incremental, with the same exactness.
- TorchScript (`torch.jit.ScriptModule`): fx cannot trace it, so it runs naive (full re-inference) and
  the explanation says `fallback_reason = "TorchScript model: not traceable by torch.fx"`.

For models that run opaquely (TorchScript, or an eager model fx cannot trace), the plan only knows the
input and output shapes, so the working-set estimate comes from `opaque_bytes_per_position`: one run of
a batch of 1 and one of 2 under a dispatch mode that keeps the live bytes of every tensor the model's
ops create (storages counted once, freed when their last reference goes). The per-position working set
is the difference of the two peaks: what one more position adds, without the batch-independent part.
"""
from __future__ import annotations

import operator
import weakref

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import ModelError

TORCHSCRIPT_REASON = "TorchScript model: not traceable by torch.fx"

aten = torch.ops.aten
# tuple-returning ops whose first output is the op's value -> the single-output op computing it
_SINGLE_OUTPUT = {
    aten._native_batch_norm_legit_no_training.default: (
        lambda x, w, b, mean, var, momentum, eps: (aten.batch_norm.default, (x, w, b, mean, var, False, momentum,
                                                                             eps, False))),
    aten.max_pool2d_with_indices.default: lambda x, *rest: (aten.max_pool2d.default, (x, *rest)),
    aten.native_layer_norm.default: lambda x, shape, w, b, eps: (aten.layer_norm.default, (x, shape, w, b, eps, False)),
}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_TRAINING_OPS = {aten._native_batch_norm_legit.default, aten._native_batch_norm_legit_functional.default}


def is_exported_program(model) -> bool:
    return isinstance(model, torch.export.ExportedProgram)


def is_aten_graph(model) -> bool:
    """A GraphModule whose calls are aten operators (what torch.export programs hold)."""
    return isinstance(model, fx.GraphModule) and any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in model.graph.nodes)


def is_torchscript(model) -> bool:
    return isinstance(model, torch.jit.ScriptModule)


def as_module(model) -> nn.Module:
    """The nn.Module the engine runs: an ExportedProgram (or its .module()) becomes a plain aten GraphModule."""
    if is_exported_program(model):
        return exported_graph(model.module())
    if is_aten_graph(model) and not getattr(model, "krypton_exported", False):
        return exported_graph(model)
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected an nn.Module, a torch.export ExportedProgram or a TorchScript module, "
                         f"got {type(model).__name__}")
    return model


def exported_graph(src: fx.GraphModule) -> fx.GraphModule:
    """A plain (no pytree codegen, no guards) copy of an exported program's module, ready for the engine."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in src.graph.nodes:
        if node.op == "call_module" and node.target.startswith("_guards"):
            continue  # input-shape guards of the traced example: the engine runs other batch sizes
        if node.op == "output":
            out = node.args[0]
            if isinstance(out, (tuple, list)) and len(out) == 1:
                out = out[0]
            graph.output(fx.node.map_arg(out, lambda n: env[n]))
            continue
        if node.op == "call_function" and node.target in _TRAINING_OPS:
            raise ModelError("the exported program runs batch norm in training mode: export the model after "
                             "model.eval()")
        if node.op == "call_function" and node.target is aten.batch_norm.default and node.args[5] is True:
            raise ModelError("the exported program runs batch norm in training mode: export the model after "
                             "model.eval()")
        env[node] = graph.node_copy(node, lambda n: env[n])
    _out_of_place(graph)
    _single_outputs(graph)
    _batch_generic_views(graph)
    graph.eliminate_dead_code()
    gm = fx.GraphModule(src, graph, type(src).__name__)
    gm.training = False  # the program is eval-mode by construction (its batch norms say training=False)
    gm.krypton_exported = True
    return gm


def _out_of_place(graph: fx.Graph) -> None:
    """In-place aten ops (`result += x` exports as aten.add_, nn.ReLU(inplace=True) as aten.relu_) whose
    mutated input nobody else reads -> the out-of-place op: same values, and the materialized activation
    of that input is not overwritten (the engine keeps every node's value of the clean image)."""
    for node in graph.nodes:
        t = node.target
        if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload) or not t._schema.is_mutable:
            continue
        name = t.overloadpacket.__name__
        functional = getattr(getattr(aten, name[:-1], None), t._overloadname, None) if name.endswith("_") else None
        if functional is not None and node.args and isinstance(node.args[0], fx.Node) and len(node.args[0].users) == 1:
            node.target = functional


def _single_outputs(graph: fx.Graph) -> None:
    """getitem(op(...), 0) where element 0 is the only one used -> the single-output op (one fx node, one
    tensor: what the rules match)."""
    for node in list(graph.nodes):
        make = _SINGLE_OUTPUT.get(node.target) if node.op == "call_function" else None
        if make is None or node.kwargs:
            continue
        users = list(node.users)
        if not users or not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0
                                for u in users):
            continue
        target, args = make(*node.args)
        with graph.inserting_before(node):
            single = graph.call_function(target, args)
        single.meta = dict(node.meta)
        for u in users:
            u.replace_all_uses_with(single)
            graph.erase_node(u)
        graph.erase_node(node)


def _batch_generic_views(graph: fx.Graph) -> None:
    """A program exported with a batch of 1 spells views of batch-carrying tensors with a literal first
    size (e.g. [1, 512] or [25, 8] for 1 x 5 x 5 pixels); -1 keeps them right for a batch of positions.
    Views become reshapes (same values): the engine's full tensors may be channels_last."""
    carries = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            carries.add(node)
        elif any(i in carries for i in node.all_input_nodes):
            carries.add(node)
            if node.op == "call_function" and node.target in _VIEWS and len(node.args) == 2:
                shape = node.args[1]
                if isinstance(shape, (list, tuple)) and shape and all(isinstance(s, int) for s in shape) \
                        and -1 not in shape:
                    node.args = (node.args[0], [-1, *shape[1:]])
        if node.op == "call_function" and node.target in _VIEWS:
            node.target = aten.reshape.default  # the engine's full tensors may be channels_last: no view


# ---- working set of an opaque model -------------------------------------------------------------------
class _LiveBytes(TorchDispatchMode):
    """Peak of the bytes held by the tensors the model's ops create (each storage once, until it is freed)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


@torch.no_grad()
def opaque_bytes_per_position(model: nn.Module, input_shape, dtype: torch.dtype, device) -> int:
    """Bytes one more image adds to the peak of a forward pass: peak(batch 2) - peak(batch 1)."""
    peaks = []
    for batch in (1, 2):
        x = torch.zeros((batch, *tuple(input_shape)[1:]), dtype=dtype, device=device)
        mode = _LiveBytes()
        with mode:
            model(x)
        peaks.append(mode.peak)
        del x
    return max(peaks[1] - peaks[0], peaks[1] // 2, 1)
