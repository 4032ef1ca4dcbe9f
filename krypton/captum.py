"""Captum drop-ins computed by incremental inference: `Occlusion` and `FeatureAblation`.

Same constructor (`forward_func`: an nn.Module, or a function of one, e.g. softmax of a module), same
`attribute(...)` arguments, output shape and values as captum.attr (0.9): Captum's windows
(ceil((D - w) / s) + 1 per dimension, cut at the far border), targets, perturbations_per_eval chunks
and accumulation ((eval(original) - eval(perturbed)) over the windows covering each element, divided
by their count for Occlusion). Only the perturbed evaluations differ: each is one changed rect of the
materialized input (a window, or a segment's bounding box holding where(mask, baseline, image)), run
by the engine's `Explainer.run_changes` (one mechanism with OBE and IncrementalModel).

Where the engine cannot accelerate a call (a forward_func it cannot capture, a tuple of several
inputs, tensor additional_forward_args, an output that is not one row per example, segments that are
not spatially local) the call is delegated to Captum itself (an optional dependency) with a
`KryptonFallbackWarning` that says why.
"""
from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
import torch.nn as nn

from . import changes
from .obe import MIN_SPEEDUP, Explainer

__all__ = ["Occlusion", "FeatureAblation", "KryptonFallbackWarning"]


class KryptonFallbackWarning(UserWarning):
    """The call was answered by Captum itself (or partly by stock inference); the message says why."""


class _Unsupported(Exception):
    pass


def find_module(fn) -> nn.Module | None:
    """The one nn.Module a forward function calls: itself, a bound method's owner, a partial's
    argument, or the only module in its closure or among the globals it names."""
    if isinstance(fn, nn.Module):
        return fn
    if isinstance(fn, functools.partial):
        found = {id(v): v for v in (fn.func, *fn.args, *fn.keywords.values()) if isinstance(v, nn.Module)}
        inner = find_module(fn.func) if not found else None
        return next(iter(found.values())) if len(found) == 1 else inner
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, nn.Module):
        return owner
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    values = [c.cell_contents for c in (fn.__closure__ or ()) if _filled(c)]
    values += [fn.__globals__[n] for n in code.co_names if n in getattr(fn, "__globals__", {})]
    found = {id(v): v for v in values if isinstance(v, nn.Module)}
    return next(iter(found.values())) if len(found) == 1 else None


def _filled(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


class _Forward(nn.Module):
    """forward_func(x, *args) as one module that owns the user's module, so torch.fx traces through both."""

    def __init__(self, fn, module: nn.Module, args: tuple):
        super().__init__()
        self.module = module
        self._fn, self._args = fn, args
        self.training = module.training  # mirrors the user's module; its own mode is never changed

    def forward(self, x):
        return self._fn(x, *self._args)


def _select_targets(output: torch.Tensor, target) -> torch.Tensor:
    """captum._utils.common._select_targets for the target kinds accepted here."""
    if target is None:
        return output
    if isinstance(target, int) or (isinstance(target, torch.Tensor) and target.numel() == 1):
        return output[:, int(target)]
    if isinstance(target, tuple):
        return output[(slice(None), *target)]
    if isinstance(target, torch.Tensor):
        target = target.reshape(-1).tolist()
    if isinstance(target, list) and all(isinstance(t, int) for t in target):
        assert output.dim() == 2 and len(target) == output.shape[0], "target list must match the output rows"
        return output[torch.arange(output.shape[0], device=output.device), torch.tensor(target, device=output.device)]
    raise _Unsupported(f"target {type(target).__name__} of this kind")


def _expand_target(target, n: int):
    """captum's _expand_target (repeat): per-example target lists and tensors repeat per perturbation."""
    if isinstance(target, list):
        return target * n
    if isinstance(target, torch.Tensor) and target.numel() > 1:
        return torch.cat([target] * n, dim=0)
    return target


def _captum(name: str):
    try:
        import captum.attr as attr
    except ImportError as exc:  # pragma: no cover - captum is in requirements.txt
        raise ImportError(f"krypton.captum.{name} cannot accelerate this call and needs Captum to answer it "
                          "(pip install captum)") from exc
    return getattr(attr, name)


class _Base:
    """What Occlusion and FeatureAblation share: capture, fallback, evaluation and target handling."""

    _captum_name = ""

    def __init__(self, forward_func, min_speedup: float = MIN_SPEEDUP, batch_size: int | None = None):
        self.forward_func = forward_func
        self.min_speedup, self.batch_size = min_speedup, batch_size
        self._engines: dict = {}
        self.last_runs: list = []  # ChangeRun per example of the last accelerated call
        self.last_fallback: str | None = None  # why the last call was delegated to Captum (None: it was not)

    def _delegate(self, reason: str, **kwargs):
        self.last_fallback = reason
        warnings.warn(f"krypton.captum.{self._captum_name}: {reason}; answered by captum.attr."
                      f"{self._captum_name} (full re-inference)", KryptonFallbackWarning, stacklevel=3)
        return _captum(self._captum_name)(self.forward_func).attribute(**kwargs)

    def _engine(self, args: tuple) -> Explainer:
        key = tuple(map(repr, args))
        if key not in self._engines:
            module = find_module(self.forward_func)
            if module is None:
                raise _Unsupported("forward_func is neither an nn.Module nor a function of exactly one nn.Module")
            if module.training:
                raise _Unsupported("the model is in training mode")
            model = module if (module is self.forward_func and not args) else _Forward(self.forward_func, module, args)
            explainer = Explainer(model, cache_bytes=0)
            if explainer.capture.trace_failure is not None:
                raise _Unsupported(f"forward_func cannot be captured: {explainer.capture.trace_failure}")
            self._engines[key] = explainer
        return self._engines[key]

    def _prepare(self, inputs, additional_forward_args):
        """(is_tuple, image batch X, explainer, extra args) or _Unsupported."""
        is_tuple = isinstance(inputs, tuple)
        if is_tuple and len(inputs) != 1:
            raise _Unsupported(f"{len(inputs)} input tensors (only one image tensor is run incrementally)")
        x = inputs[0] if is_tuple else inputs
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise _Unsupported("inputs is not one (N, C, H, W) tensor")
        args = () if additional_forward_args is None else \
            tuple(additional_forward_args) if isinstance(additional_forward_args, tuple) else (additional_forward_args,)
        if any(isinstance(a, torch.Tensor) for a in args):
            raise _Unsupported("additional_forward_args holds tensors (they would be expanded per perturbation)")
        explainer = self._engine(args)
        if x.dtype != explainer.dtype or x.device != explainer.device:
            raise _Unsupported(f"inputs ({x.dtype}, {x.device}) differ from the model ({explainer.dtype}, {explainer.device})")
        return is_tuple, x, explainer, args

    @torch.no_grad()
    def _initial(self, explainer: Explainer, x: torch.Tensor, args: tuple, target):
        """Captum's initial evaluation (forward_func on the batch, targets selected), and the engine's
        materialized activations of every example, checked against it row by row."""
        raw = self.forward_func(x, *args)
        if not isinstance(raw, torch.Tensor) or raw.dim() != 2 or raw.shape[0] != x.shape[0]:
            raise _Unsupported("forward_func's output is not one row per example (N, outputs)")
        mats = [explainer.materialized(x[n:n + 1])[0] for n in range(x.shape[0])]
        for n, m in enumerate(mats):
            scale = float(raw[n].abs().max()) + 1.0
            if not torch.allclose(m.output[0].double(), raw[n].double(), rtol=0, atol=1e-4 * scale):
                raise _Unsupported("the captured forward_func does not reproduce forward_func row by row")
        return _select_targets(raw, target), mats

    @torch.no_grad()
    def _evaluate(self, explainer, x, mats, origins, sizes, content):
        """outputs [F, N, classes]: the forward output of every (perturbation f, example n)."""
        outs, self.last_runs = [], []
        for n in range(x.shape[0]):
            run = explainer.run_changes(x[n:n + 1], origins[n], sizes[n], functools.partial(content, n),
                                        batch_size=self.batch_size, min_speedup=self.min_speedup, mats=mats[n])
            self.last_runs.append(run)
            outs.append(run.outputs)
        return torch.stack(outs, dim=1)

    @staticmethod
    def _diffs(outputs, flat_initial, target, perturbations_per_eval: int) -> torch.Tensor:
        """eval(original) - eval(perturbed) [F, n_outputs], selected chunk by chunk as Captum does."""
        f_total, n, k = outputs.shape
        n_outputs = flat_initial.shape[1]
        diffs = []
        for i in range(0, f_total, perturbations_per_eval):
            cur = min(perturbations_per_eval, f_total - i)
            chunk = outputs[i:i + cur].reshape(cur * n, k)
            modified = _select_targets(chunk, _expand_target(target, cur)).reshape(-1, n_outputs)
            diffs.append(flat_initial - modified)
        return torch.cat(diffs, dim=0)


def _check_ppe(perturbations_per_eval) -> None:
    assert isinstance(perturbations_per_eval, int) and perturbations_per_eval >= 1, \
        "Perturbations per evaluation must be an integer and at least 1."


def _baseline_image(baselines, x: torch.Tensor) -> torch.Tensor:
    """The value each element takes when ablated: baselines broadcast to x's shape (None: 0)."""
    if isinstance(baselines, tuple):
        if len(baselines) != 1:
            raise _Unsupported("baselines is a tuple of several entries")
        baselines = baselines[0]
    if baselines is None:
        baselines = 0.0
    if isinstance(baselines, (int, float)):
        return torch.full_like(x, float(baselines))
    if isinstance(baselines, torch.Tensor):
        try:
            return torch.broadcast_to(baselines.to(x.dtype).to(x.device), x.shape)
        except RuntimeError:
            raise _Unsupported(f"baselines of shape {tuple(baselines.shape)} do not broadcast to the inputs") from None
    raise _Unsupported(f"baselines of type {type(baselines).__name__}")


def _per_dim(value, name: str) -> tuple[int, int, int]:
    if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], tuple):
        value = value[0]
    if isinstance(value, int):
        return (value,) * 3
    if isinstance(value, tuple) and len(value) == 3 and all(isinstance(v, int) for v in value):
        return value
    raise _Unsupported(f"{name} {value!r} (one int or (C, H, W) ints for the one image tensor)")


class Occlusion(_Base):
    """captum.attr.Occlusion, computed incrementally (windows cut at the far border included)."""

    _captum_name = "Occlusion"

    def attribute(self, inputs, sliding_window_shapes, strides=None, baselines=None, target=None,
                  additional_forward_args=None, perturbations_per_eval: int = 1, show_progress: bool = False):
        kwargs = dict(inputs=inputs, sliding_window_shapes=sliding_window_shapes, strides=strides, baselines=baselines,
                      target=target, additional_forward_args=additional_forward_args,
                      perturbations_per_eval=perturbations_per_eval, show_progress=show_progress)
        _check_ppe(perturbations_per_eval)
        self.last_fallback = None
        try:
            is_tuple, x, explainer, args = self._prepare(inputs, additional_forward_args)
            window = _per_dim(sliding_window_shapes, "sliding_window_shapes")
            stride = _per_dim(1 if strides is None else strides, "strides")
            dims = tuple(x.shape[1:])
            for d, w, s in zip(dims, window, stride):
                assert w <= d, f"Sliding window dimensions {window} cannot exceed input dimensions{dims}."
                assert d == w or s <= w, f"Stride dimension {s} cannot be larger than sliding window shape dimension {w}."
            base = _baseline_image(baselines, x)
            initial, mats = self._initial(explainer, x, args, target)
            result = self._attribute(explainer, x, base, initial, mats, window, stride, target, perturbations_per_eval)
        except _Unsupported as exc:
            return self._delegate(str(exc), **kwargs)
        return (result,) if is_tuple else result

    def _attribute(self, explainer, x, base, initial, mats, window, stride, target, ppe):
        n, c, h, w = x.shape
        counts = [math.ceil((d - k) / s) + 1 if d > k else 1 for d, k, s in zip((c, h, w), window, stride)]
        f = np.arange(int(np.prod(counts)))  # Captum's order: the channel index varies fastest, then H, then W
        idx = [f % counts[0], (f // counts[0]) % counts[1], f // (counts[0] * counts[1])]
        lo = [i * s for i, s in zip(idx, stride)]
        hi = [np.minimum(l + k, d) for l, k, d in zip(lo, window, (c, h, w))]
        origins = np.stack([lo[1], lo[2]], axis=1)
        sizes = np.stack([hi[1] - lo[1], hi[2] - lo[2]], axis=1)
        chan = torch.arange(c, device=x.device)
        c_lo, c_hi = torch.as_tensor(lo[0], device=x.device), torch.as_tensor(hi[0], device=x.device)

        def content(example, indices):
            size = tuple(sizes[indices[0]])
            clean = changes.gather_rects(x[example], None, origins[indices], size)
            ablated = changes.gather_rects(base[example], None, origins[indices], size)
            t = torch.as_tensor(indices, device=x.device)
            inside = (chan[None, :] >= c_lo[t][:, None]) & (chan[None, :] < c_hi[t][:, None])
            return torch.where(inside[:, :, None, None], ablated, clean)

        outputs = self._evaluate(explainer, x, mats, [origins] * n, [sizes] * n, content)
        flat = initial.reshape(1, -1)
        diffs = self._diffs(outputs, flat, target, ppe)
        total = torch.zeros((flat.shape[1], c, h, w), dtype=flat.dtype, device=x.device)
        weight = torch.zeros((flat.shape[1], c, h, w), device=x.device)
        for i in range(len(f)):
            region = (slice(None), slice(lo[0][i], hi[0][i]), slice(lo[1][i], hi[1][i]), slice(lo[2][i], hi[2][i]))
            total[region] += diffs[i].view(-1, 1, 1, 1)
            weight[region] += 1.0
        return total.float() / weight


class FeatureAblation(_Base):
    """captum.attr.FeatureAblation, computed incrementally: each feature (e.g. a superpixel of a
    spatial `feature_mask`) is one changed rect, its bounding box, holding where(mask, baseline, image).
    Segments whose box is too large to gain anything run stock inference (exact, no speedup); when
    none gains, the call is delegated to Captum."""

    _captum_name = "FeatureAblation"

    def attribute(self, inputs, baselines=None, target=None, additional_forward_args=None, feature_mask=None,
                  perturbations_per_eval: int = 1, show_progress: bool = False, **kwargs):
        call = dict(inputs=inputs, baselines=baselines, target=target, additional_forward_args=additional_forward_args,
                    feature_mask=feature_mask, perturbations_per_eval=perturbations_per_eval,
                    show_progress=show_progress, **kwargs)
        _check_ppe(perturbations_per_eval)
        self.last_fallback = None
        try:
            if kwargs:
                raise _Unsupported(f"extra arguments {sorted(kwargs)}")
            is_tuple, x, explainer, args = self._prepare(inputs, additional_forward_args)
            base = _baseline_image(baselines, x)
            mask = feature_mask[0] if isinstance(feature_mask, tuple) and len(feature_mask) == 1 else feature_mask
            if isinstance(mask, tuple):
                raise _Unsupported("feature_mask is a tuple of several masks")
            if mask is None:
                mask = torch.arange(x[0].numel(), device=x.device).view(1, *x.shape[1:])
            try:
                labels = torch.broadcast_to(mask.to(x.device), x.shape)
            except RuntimeError:
                raise _Unsupported(f"feature_mask of shape {tuple(mask.shape)} does not broadcast to the inputs") from None
            result = self._attribute(explainer, x, base, mask, labels, args, target, perturbations_per_eval)
        except _Unsupported as exc:
            return self._delegate(str(exc), **call)
        return (result,) if is_tuple else result

    def _attribute(self, explainer, x, base, mask, labels, args, target, ppe):
        n, c, h, w = x.shape
        features = torch.unique(mask).tolist()  # Captum's order: sorted feature ids
        feats = torch.as_tensor(features, device=x.device, dtype=labels.dtype)
        origins, sizes = [], []
        for e in range(n):
            present = torch.stack([(labels[e] == v).any(dim=0) for v in features]).cpu().numpy()  # [F, H, W]
            lo, hi = changes.boxes(present)
            o, s = changes.bucketed_rects(lo, hi, h, w)
            origins.append(o)
            sizes.append(s)
        shape = (1, c, h, w)
        groups = [g for e in range(n) for g in explainer.plan_changes(shape, origins[e], sizes[e], self.min_speedup)]
        if groups and not any(g[3] for g in groups):
            raise _Unsupported("no segment is spatially local enough to gain from incremental inference "
                               f"(the best saves {max(g[4] for g in groups):.2f}x < min_speedup {self.min_speedup})")
        initial, mats = self._initial(explainer, x, args, target)

        def content(example, indices):
            size = tuple(sizes[example][indices[0]])
            at = origins[example][indices]
            which = changes.gather_rects(labels[example], None, at, size) == feats[torch.as_tensor(indices)].view(-1, 1, 1, 1)
            return torch.where(which, changes.gather_rects(base[example], None, at, size),
                               changes.gather_rects(x[example], None, at, size))

        outputs = self._evaluate(explainer, x, mats, origins, sizes, content)
        stock = sum(r.stock_positions for r in self.last_runs)
        if stock:
            warnings.warn(f"krypton.captum.FeatureAblation: {stock} of {len(features) * n} segment ablations are not "
                          "spatially local (bounding box too large to gain): ran stock inference for them",
                          KryptonFallbackWarning, stacklevel=3)
        flat = initial.reshape(1, -1)
        diffs = self._diffs(outputs, flat, target, ppe)
        total = torch.zeros((flat.shape[1], c, h, w), dtype=flat.dtype, device=x.device)
        for i in range(0, len(features), ppe):  # Captum's accumulation, chunk by chunk
            chunk = diffs[i:i + ppe]
            masks = torch.stack([(mask == v).to(x.device).long() for v in features[i:i + ppe]], dim=0)
            total += (chunk.reshape(chunk.shape + (x.dim() - 1) * (1,)) * masks.to(total.dtype)).sum(dim=0)
        return total
