"""Execution: materialize the clean image's activations once, then run batches of positions.

Every incremental node costs one stitch (gather the read-in windows of the batch from the shared
materialized tensor and paste each position's updated patch) plus the stock op with padding 0.
Before the first global node, the changed regions are projected into full copies and the rest of
the network runs as usual on the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from . import ops
from .inplace import is_inplace
from .errors import ModelError
from .nodes import CONST, INC


_COMPUTED = ("call_function", "call_module", "call_method")  # node ops whose values the clean pass makes


class Materialized:
    """The activations of the clean image, keyed by fx node (one copy serves every position).

    `kept`: the names of the nodes whose values were kept (what plans read, Plan.clean_reads), or None
    when every node's was."""

    def __init__(self, values: dict[fx.Node, object], output: torch.Tensor, kept: frozenset[str] | None = None):
        self.values = values
        self.output = output
        self.kept = kept
        # what the clean pass allocated: not the input image, nor parameters (get_attr) that the model holds
        self.nbytes = sum(_nbytes(v) for n, v in values.items() if n.op in _COMPUTED)
        self._planar: dict[tuple[fx.Node, bool], torch.Tensor] = {}

    def covers(self, needed: frozenset[str] | None) -> bool:
        """True when every node in `needed` (None: all of them) was kept."""
        return self.kept is None or (needed is not None and needed <= self.kept)

    def converted(self, capture, dtype: torch.dtype) -> "Materialized":
        """These activations cast to another floating dtype and keyed by the nodes of `capture` (a converted
        copy of theirs, capture.Capture.converted): a low-precision run's copy of the clean image."""
        def cast(value):
            return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value

        values = {capture.node_named(n.name): fx.node.map_aggregate(v, cast) for n, v in self.values.items()}
        return Materialized(values, self.output.to(dtype), self.kept)

    def planar(self, node: fx.Node, channels_last: bool) -> torch.Tensor:
        """The node's activation as (C, H, W), laid out for the stitch op (HWC when channels_last).

        Converted once per layout and kept: every group and batch of positions reads the same copy.
        """
        key = (node, channels_last)
        if key not in self._planar:
            value = self.values[node]
            fmt = memory_format(channels_last)
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


def _run_node(capture, node: fx.Node, env, keep_inputs: bool = False) -> object:
    """_call_node; an in-place op gets copies of its inputs when other nodes read them too, or always with
    `keep_inputs` (materialization: every stored activation must keep its clean value)."""
    if is_inplace(capture.gm, node) and (keep_inputs or any(len(i.users) > 1 for i in node.all_input_nodes)):
        env = {i: env[i].clone() if isinstance(env[i], torch.Tensor) else env[i] for i in node.all_input_nodes}
    return _call_node(capture.gm, node, env)


@torch.no_grad()
def run_graph(capture, image: torch.Tensor, keep: frozenset[str] | None = None,
              shapes: dict | None = None) -> dict[fx.Node, object]:
    """Run `image` (1, C, H, W) through the graph, keeping every node's value (the output node's too), or
    with `keep` only those of the nodes named there (and the output's, the inputs', the parameters'): the
    others are dropped after their last use, so the clean pass never holds more than it keeps plus what
    is live. `shapes`, when given, receives every node's output shape (None for a non-tensor)."""
    env: dict[fx.Node, object] = {}
    nodes = capture.nodes
    last_use = {}
    if keep is not None:
        for idx, node in enumerate(nodes):
            for i in node.all_input_nodes:
                last_use[i] = idx
    for idx, node in enumerate(nodes):
        if node.op == "placeholder":
            env[node] = image
        elif node.op == "get_attr":
            env[node] = _get_attr(capture.gm, node.target)
        elif node.op == "output":
            env[node] = fx.node.map_arg(node.args[0], lambda n: env[n])
        else:
            env[node] = _run_node(capture, node, env, keep_inputs=True)
        if shapes is not None:
            shapes[node] = env[node].shape if isinstance(env[node], torch.Tensor) else None
        if keep is not None:
            for i in [node, *node.all_input_nodes]:
                if i.op in _COMPUTED and i.name not in keep and last_use.get(i, -1) <= idx:
                    env.pop(i, None)
    return env


def materialize(capture, image: torch.Tensor, keep: frozenset[str] | None = None) -> Materialized:
    """The activations of the clean image (all, or those of the nodes named in `keep`); its output must be
    one row of logits."""
    env = run_graph(capture, image, keep)
    output = env.pop(next(n for n in capture.nodes if n.op == "output"))
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[0] != 1:
        raise ModelError("model output must be one logits tensor of shape (1, classes); got "
                         f"{type(output).__name__}{tuple(output.shape) if isinstance(output, torch.Tensor) else ''}")
    return Materialized(env, output, keep)


def _get_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class BatchState:
    """The values of one batch of positions [start, stop) while its steps run."""

    start: int
    stop: int
    env: "_BatchEnv"
    patches: dict = field(default_factory=dict)  # node -> batch of changed patches
    fulls: dict = field(default_factory=dict)  # node -> batch of full tensors

    @property
    def size(self) -> int:
        return self.stop - self.start


def constant_content(fill: torch.Tensor, channels: int, size: tuple[int, int]):
    """OBE's content: one value per channel (`fill`, (C, 1, 1)) over the whole rect, for every position.
    An expanded view per batch: nothing is materialized per position."""
    h, w = size

    def content(start: int, stop: int) -> torch.Tensor:
        return fill.expand(stop - start, channels, h, w)

    return content


def tensor_content(values: torch.Tensor):
    """Per-position content given as one [N, C, h, w] tensor (sliced per batch)."""
    return lambda start, stop: values[start:stop]


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def laid_out_weights(capture, plan, channels_last: bool) -> dict:
    """{node: weight} of the plan's steps in the runners' memory format (converted once: Capture.laid_out).

    Explainer builds them with the plan, outside krypton's batch arena: made by a plan's first run instead,
    these long-lived copies sat in the arena between the run's freed blocks, and every later run laid its
    blocks out around them (resnet18: 41 MB of float32 copies, then bf16's 20 MB; a naive batch-1 request
    after the first bf16 one peaked at 17 MB instead of 10)."""
    fmt = memory_format(channels_last)
    return {s.node: capture.laid_out(s.weight, fmt) for s in plan.steps if s.weight is not None}


class BatchRunner:
    """Runs a plan over slices of its positions against one set of materialized activations.

    `content(start, stop)` gives what the input rect holds for positions [start, stop) of the plan,
    [stop - start, C, h, w] with (h, w) the plan's rect size (see constant_content, tensor_content).
    """

    def __init__(self, capture, plan, mats: Materialized, content, channels_last: bool = False):
        self.capture, self.plan, self.mats = capture, plan, mats
        self.channels_last = channels_last
        self.content = content
        device = mats.output.device
        self.origins = {n: t.to(device) for n, t in plan.origin_tensors.items()}
        self.read_origins = {s.node: s.read_origin.to(device) for s in plan.steps if s.read_origin is not None}
        self.zeros = torch.zeros(plan.positions, 2, dtype=torch.int64, device=device)
        self.mat3 = {n: mats.planar(n, channels_last) for n, v in mats.values.items()
                     if plan.states.get(n) == INC and isinstance(v, torch.Tensor) and v.dim() == 4}
        self.weights = laid_out_weights(capture, plan, channels_last)
        self.format = memory_format(channels_last)

    def origins_of(self, node: fx.Node, state: BatchState) -> torch.Tensor:
        return self.origins[node][state.start:state.stop]

    @torch.no_grad()
    def run(self, start: int, stop: int) -> torch.Tensor:
        """Logits (stop - start, classes) for positions [start, stop) of the plan."""
        plan = self.plan
        state = BatchState(start, stop, None)
        state.env = _BatchEnv(self.mats.values, plan.states, state.fulls)
        for idx, step in enumerate(plan.steps):
            value = step.action.run(self, step, state)
            (state.fulls if step.full else state.patches)[step.node] = value
            for n in step.inputs:
                if plan.last_use.get(n) == idx:
                    state.patches.pop(n, None)
                    state.fulls.pop(n, None)
        return fx.node.map_arg(plan.output.args[0],
                               lambda n: state.fulls[n] if n in state.fulls else self.mats.values[n])


# ---- the steps that are not a rule's: the occluding patch, projections, the global part ---------------
class _Input:
    """The input's changed rect itself: the runner's content for this batch of positions (the OBE fill,
    a segment's baseline-under-mask, an edited image's pixels)."""

    kind = "input"

    def run(self, runner, step, state):
        values = runner.content(state.start, state.stop)
        expected = (state.size, runner.plan.input_shape[1], *runner.plan.rect_size)
        if tuple(values.shape) != expected:
            raise ValueError(f"content of shape {tuple(values.shape)} for a plan whose input rects are {expected}")
        return values.contiguous(memory_format=runner.format)


class _Project:
    """Paste each position's changed patch into a full copy of the materialized activation."""

    kind = "project"

    def run(self, runner, step, state):
        node = step.node
        _, _, h, w = runner.mats.values[node].shape
        return ops.stitch(runner.mat3[node], state.patches[node], runner.origins_of(node, state),
                          runner.zeros[state.start:state.stop], h, w, 0.0)


class _Full:
    """A global node: the node's own op on full batch tensors (constants come from the clean run)."""

    kind = "full"

    def run(self, runner, step, state):
        return _run_node(runner.capture, step.node, state.env)


INPUT_ACTION, PROJECT_ACTION, FULL_ACTION = _Input(), _Project(), _Full()


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
