"""Execution: materialize the clean image's activations once, then run batches of positions.

Every incremental node costs one stitch (gather the read-in windows of the batch from the shared
materialized tensor and paste each position's updated patch) plus the stock op with padding 0.
Before the first global node, the changed regions are projected into full copies and the rest of
the network runs as usual on the batch.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import ops
from .plan import CONST, INC, Plan, Step


class Materialized:
    """All activations of the clean image, keyed by fx node (one copy serves every position)."""

    def __init__(self, values: dict[fx.Node, object], output: torch.Tensor):
        self.values = values
        self.output = output
        self.nbytes = sum(_nbytes(v) for v in values.values())
        self._planar: dict[tuple[fx.Node, bool], torch.Tensor] = {}

    def planar(self, node: fx.Node, channels_last: bool) -> torch.Tensor:
        """The node's activation as (C, H, W), laid out for the stitch op (HWC when channels_last).

        Converted once per layout and kept: every group and batch of positions reads the same copy.
        """
        key = (node, channels_last)
        if key not in self._planar:
            value = self.values[node]
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            self._planar[key] = value.contiguous(memory_format=fmt)[0]
        return self._planar[key]


def _nbytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def _call_node(gm: fx.GraphModule, node: fx.Node, env: dict) -> object:
    """Run one fx node with its arguments looked up in `env` (what fx.Interpreter does, minus overhead)."""
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    raise RuntimeError(f"unexpected node {node.op}")


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _mutates_shared_input(capture, node: fx.Node) -> bool:
    """An in-place op on a value that other nodes also read must not clobber the stored copy."""
    spec = capture.specs.get(node)
    inplace = (
        bool(spec is not None and spec.extra.get("inplace"))
        or (node.op == "call_function" and node.target in _INPLACE_OPERATORS)
        or (node.op == "call_method" and node.target.endswith("_"))
        or (node.op == "call_module" and getattr(capture.gm.get_submodule(node.target), "inplace", False) is True)
    )
    return inplace and any(len(i.users) > 1 for i in node.all_input_nodes)


def _run_node(capture, node: fx.Node, env) -> object:
    """_call_node, with the inputs of an in-place op copied first when other nodes read them too."""
    if _mutates_shared_input(capture, node):
        env = {i: env[i].clone() if isinstance(env[i], torch.Tensor) else env[i] for i in node.all_input_nodes}
    return _call_node(capture.gm, node, env)


@torch.no_grad()
def materialize(capture, image: torch.Tensor) -> Materialized:
    """Run the clean image (1, C, H, W) through the graph, keeping every node's output."""
    env: dict[fx.Node, object] = {}
    output = None
    for node in capture.nodes:
        if node.op == "placeholder":
            env[node] = image
        elif node.op == "get_attr":
            env[node] = _get_attr(capture.gm, node.target)
        elif node.op == "output":
            output = fx.node.map_arg(node.args[0], lambda n: env[n])
        else:
            env[node] = _run_node(capture, node, env)
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != 1:
        raise ValueError("model output must be one logits tensor of shape (1, classes); got "
                         f"{type(output).__name__}{tuple(output.shape) if isinstance(output, torch.Tensor) else ''}")
    return Materialized(env, output)


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class BatchRunner:
    """Runs a plan over slices of its positions against one set of materialized activations."""

    def __init__(self, capture, plan: Plan, mats: Materialized, fill: torch.Tensor, channels_last: bool = False):
        self.capture, self.plan, self.mats = capture, plan, mats
        self.channels_last = channels_last
        self.fill = fill  # (C, 1, 1) values written over the patch
        self.gm = capture.gm
        device = fill.device
        self.origins = {n: t.to(device) for n, t in plan.origin_tensors.items()}
        self.read_origins = {s.node: s.read_origin.to(device) for s in plan.steps if s.kind == "window"}
        self.zeros = torch.zeros(plan.positions, 2, dtype=torch.int64, device=device)
        self.mat3 = {n: mats.planar(n, channels_last) for n, v in mats.values.items()
                     if plan.states.get(n) == INC and isinstance(v, torch.Tensor) and v.dim() == 4}
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.weights = {s.node: s.weight.contiguous(memory_format=fmt) for s in plan.steps if s.weight is not None}
        self.format = fmt

    @torch.no_grad()
    def run(self, start: int, stop: int) -> torch.Tensor:
        """Logits (stop - start, classes) for positions [start, stop) of the plan."""
        plan, b = self.plan, stop - start
        patches: dict[fx.Node, torch.Tensor] = {}
        fulls: dict[fx.Node, object] = {}
        env = _BatchEnv(self.mats.values, plan.states, fulls)  # global nodes' argument lookup
        for idx, step in enumerate(plan.steps):
            kind = step.kind
            if kind == "input":
                c = plan.input_shape[1]
                patches[step.node] = self.fill.expand(b, c, plan.patch_size, plan.patch_size).contiguous(
                    memory_format=self.format)
            elif kind == "window":
                patches[step.node] = self._window(step, patches, start, stop)
            elif kind == "unary":
                p = patches[step.inputs[0]]
                if step.inplace:
                    patches[step.node] = step.spec.extra["inplace_fn"](p)
                else:
                    patches[step.node] = step.spec.apply(p.clone() if step.clone_input else p)
            elif kind in ("alias", "pad"):
                patches[step.node] = patches[step.inputs[0]]
            elif kind in ("binary", "cat"):
                patches[step.node] = self._boxed(step, patches, start, stop)
            elif kind == "project":
                fulls[step.node] = self._project(step.node, patches, start, stop)
            elif kind == "full_conv":
                spec = step.spec
                fulls[step.node] = F.conv2d(fulls[step.inputs[0]], step.weight, step.bias, spec.stride,
                                            spec.extra["padding"], spec.dilation, spec.groups)
            elif kind == "full_alias":
                fulls[step.node] = fulls[step.inputs[0]]
            elif kind == "full_inplace":
                fulls[step.node] = step.spec.extra["inplace_fn"](fulls[step.inputs[0]])
            else:  # full
                fulls[step.node] = _run_node(self.capture, step.node, env)
            for n in step.inputs:
                if plan.last_use.get(n) == idx:
                    patches.pop(n, None)
                    fulls.pop(n, None)
        out = fx.node.map_arg(plan.output.args[0], lambda n: fulls[n] if n in fulls else self.mats.values[n])
        return out

    def _origins(self, node, start, stop) -> torch.Tensor:
        return self.origins[node][start:stop]

    def _window(self, step: Step, patches, start, stop) -> torch.Tensor:
        x = step.inputs[0]
        window = ops.stitch(self.mat3[x], patches[x], self._origins(x, start, stop),
                            self.read_origins[step.node][start:stop], step.read_size[0], step.read_size[1], step.pad_value)
        spec = step.spec
        if spec.op == "conv":
            return F.conv2d(window, self.weights[step.node], step.bias, spec.stride, 0, spec.dilation, spec.groups)
        if spec.op == "max":
            return F.max_pool2d(window, spec.kernel, spec.stride, 0, spec.dilation)
        return F.avg_pool2d(window, spec.kernel, spec.stride, 0, False, True, spec.extra.get("divisor_override"))

    def _boxed(self, step: Step, patches, start, stop) -> torch.Tensor:
        rect = self.plan.rects[step.node]
        box_origin = self._origins(step.node, start, stop)
        parts = []
        for i, needs in zip(step.inputs, step.stitch_inputs):
            if needs:
                parts.append(ops.stitch(self.mat3[i], patches[i], self._origins(i, start, stop), box_origin,
                                        rect.size[0], rect.size[1], 0.0))
            else:
                parts.append(patches[i])
        if step.kind == "cat":
            return torch.cat(parts, dim=1)
        return step.spec.binary(parts[0], parts[1])

    def _project(self, node, patches, start, stop) -> torch.Tensor:
        _, _, h, w = self.mats.values[node].shape
        return ops.stitch(self.mat3[node], patches[node], self._origins(node, start, stop),
                          self.zeros[start:stop], h, w, 0.0)


class _BatchEnv(dict):
    """Argument lookup for a global node: full batch tensors, else the constants of the clean run."""

    def __init__(self, values, states, fulls):
        super().__init__()
        self.values, self.states, self.fulls = values, states, fulls

    def __missing__(self, node):
        if node in self.fulls:
            return self.fulls[node]
        if self.states.get(node) == CONST:
            return self.values[node]
        raise KeyError(f"value of {node.name} is not available to the global part of the plan")
