"""The data the engine passes between capture, rules, planning and execution (no behaviour here).

- `OpSpec`: what capture learned about one fx node, and the `Rule` that owns it (rules.py).
- `Rect`: a node's changed region for every position (per-position origins, one shared size).
- `Step`: one unit of batched execution; its `action` (a rule, or a global-part action of execute.py)
  runs it. Dispatch is by that object, never by a string: a step without an action cannot be built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.fx as fx

from . import geometry as geo

if TYPE_CHECKING:  # pragma: no cover
    from .rules import Rule

CONST, INC, FULL = "const", "inc", "full"  # a node's state in a plan


@dataclass
class OpSpec:
    """How one fx node runs incrementally: its rule, its changing tensor inputs and the op's parameters.

    Window ops (conv, pooling) fill kernel/stride/pad_before/dilation (and weight/bias/groups for conv);
    element-wise ops fill `apply` (patch -> new patch) or `binary`; pads fill `pads`. `extra` holds what
    only one rule reads.
    """

    rule: "Rule"
    inputs: list[fx.Node]  # the tensor inputs that may change with the occlusion
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    pad_before: tuple[int, int] = (0, 0)  # (top, left)
    dilation: tuple[int, int] = (1, 1)
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    groups: int = 1
    ceil_mode: bool = False
    apply: Callable[[torch.Tensor], torch.Tensor] | None = None
    binary: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # (top, bottom, left, right)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.rule.kind


@dataclass
class Rect:
    """A node's changed region for every position: origins [N, 2] (y, x) and a shared (h, w)."""

    y: geo.Rect1D
    x: geo.Rect1D

    @property
    def size(self) -> tuple[int, int]:
        return self.y.size, self.x.size

    def covers_map(self) -> bool:
        return self.y.covers_map() and self.x.covers_map()

    def origin_tensor(self) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.y.origin, self.x.origin], axis=1).copy())

    def same_as(self, other: "Rect") -> bool:
        return (self.size == other.size and np.array_equal(self.y.origin, other.y.origin)
                and np.array_equal(self.x.origin, other.x.origin))


@dataclass
class Step:
    """One unit of batched execution of a plan.

    `action.run(runner, step, state)` returns the node's value: a batch of patches (incremental steps)
    or a batch of full tensors (`full=True`: global part and projections). `kind` is the action's
    label, for reading plans and tests only.
    """

    action: Any  # a Rule or an execute.py action: anything with kind and run(runner, step, state)
    node: fx.Node
    inputs: list[fx.Node] = field(default_factory=list)
    spec: OpSpec | None = None
    full: bool = False
    read_origin: torch.Tensor | None = None  # window steps: per-position read-in origins [N, 2]
    read_size: tuple[int, int] = (0, 0)
    pad_value: float = 0.0
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    clone_input: bool = False  # an in-place op whose input other nodes also read: copy first
    inplace: bool = False  # the input is owned by this step alone: update it in place
    stitch_inputs: list[bool] = field(default_factory=list)  # boxed steps: which inputs need stitching
    fresh: bool = False  # the output is a newly allocated tensor that no other node sees yet
    may_alias: bool = False  # the output may be the input tensor itself
    allocates: bool = True  # False: the output is always an input's tensor (no new bytes)
    out_bytes: int = 0  # per position
    tmp_bytes: int = 0  # per position, freed when the step ends

    @property
    def kind(self) -> str:
        return self.action.kind
