"""TorchServe handler: top-5 predictions and Krypton occlusion explanations for image CNNs.

Generic: it loads any archive the standard way (``BaseHandler``: model.py with one nn.Module class
constructible without arguments, plus an optional state_dict file). Everything model-specific
(preprocessing, limits, defaults, the label of the weights) comes from the ``handler:`` section of
the archive's model-config.yaml; see ``obe_request.Settings``. ``index_to_name.json`` in the archive
adds class names.

Per request of a TorchServe batch (a batch can mix both kinds):
  /predictions/NAME                                   -> top-k classes (JSON)
  /explanations/NAME, /v1/models/NAME:explain, /v2/models/NAME/explain -> occlusion explanation,
      JSON (heatmap, label, probability, options used, positions, timings, memory, speedup, cache)
      or format=png (jet_r overlay on the whole original photo, with a colour bar and the label).
Client mistakes answer 400/413 with a JSON body naming the problem; nothing a client sends takes
the worker down. The engine (``krypton.Explainer``) keeps one LRU of materialized activations per
worker, keyed by the preprocessed image's hash, bounded by ``cache_bytes``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

import krypton
from krypton.errors import ModelError, OptionError
from krypton.memory import PeakMemory, arena_keep_bytes, release_free_memory

from . import guard as obe_guard
from . import render as obe_render
from . import request as obe_request
from . import segments as obe_segments
from .request import RequestError

logger = logging.getLogger(__name__)

_JSON = "application/json"
_PHRASES = {400: "Bad Request", 404: "Not Found", 413: "Payload Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}
UNTRAINED = "untrained-random-init"
# Set by scripts/serve.sh for the split deployment (README "Deployment"): the archive is registered as NAME
# (predictions only) and NAME + this suffix (explanations), each with its own workers and queue.
EXPLAIN_SUFFIX_ENV = "KRYPTON_EXPLAIN_SUFFIX"


def _explain_flag(context, idx) -> bool:
    return str(context.get_request_header(idx, "explain")).lower() == "true"


def _find_normalize(obj, depth: int = 0):
    """(mean, std) of a torchvision-style Normalize inside a transform (Compose.transforms, nested)."""
    if obj is None or depth > 4:
        return None
    if type(obj).__name__ == "Normalize" and hasattr(obj, "mean") and hasattr(obj, "std"):
        try:
            return (tuple(float(v) for v in obj.mean), tuple(float(v) for v in obj.std))
        except TypeError:
            return None
    for child in getattr(obj, "transforms", None) or ():
        found = _find_normalize(child, depth + 1)
        if found is not None:
            return found
    return None


class KryptonExplainMixin:
    """Krypton occlusion explanations for any TorchServe ``BaseHandler`` subclass.

        class MyHandler(KryptonExplainMixin, ImageClassifier):   # the mixin first
            ...                                                  # your own preprocess(), postprocess()

    ``/predictions`` stay exactly the handler's own (a batch without explanation requests goes to
    ``BaseHandler.handle`` untouched). ``/explanations`` go through TorchServe's own explain path,
    ``BaseHandler.handle`` -> ``preprocess(data)`` -> ``_is_explain()`` -> ``explain_handle(data_preprocess,
    raw_data)``: Krypton occludes the tensor YOUR ``preprocess()`` made for each request, with ``self.model``
    and ``self.mapping``, and answers with the options, limits, JSON/PNG formats, errors and metrics of
    ``KryptonHandler`` (settings: the ``handler:`` section of model-config.yaml). Before your
    ``preprocess()`` runs, explanation requests are checked (options, image bytes, pixel counts from the
    header); a batch mixing predictions and explanations runs your ``inference()``/``postprocess()`` on
    the prediction rows. The named fills (gray/black/mean) need the input normalization: the class
    attribute ``krypton_normalize = (mean, std)``, else ``handler.preprocess.mean/std`` in
    model-config.yaml, else a ``Normalize`` found in ``self.image_processing`` (torchvision's stock image
    handlers) or ``self.transform``; without one they answer 400 saying so.
    """

    krypton_normalize = None        # (mean, std) of this handler's preprocess
    krypton_own_preprocess = False  # True: the archive's handler.preprocess is the preprocessing (KryptonHandler)
    _krypton_batch = None
    role = "both"  # initialize(): "predict" / "explain" in the split deployment (KRYPTON_EXPLAIN_SUFFIX)

    # ------------------------------------------------------------------------------ load
    def initialize(self, context):
        yaml_cfg = getattr(context, "model_yaml_config", None) or {}
        cfg = yaml_cfg.get("handler")
        self.settings = obe_request.settings_from_config(cfg)
        self._configured_pre = set((cfg or {}).get("preprocess") or {})
        s = self.settings
        arena_keep_bytes()  # a bad KRYPTON_ARENA_KEEP_MB fails the load, not every request
        rt = obe_guard.check_response_timeout(yaml_cfg, s.limits.max_request_seconds)
        self.budget = obe_guard.WorkBudget(s.limits.max_request_seconds, rt)
        obe_guard.watch_duplicate_parts()
        self.model_name = context.model_name
        suffix = os.environ.get(EXPLAIN_SUFFIX_ENV, "")
        self.role = ("explain" if self.model_name.endswith(suffix) else "predict") if suffix else "both"
        serialized = (context.manifest or {}).get("model", {}).get("serializedFile")
        if not serialized and self.krypton_own_preprocess:
            # No weights file: the model's constructor initializes randomly. Seed it so every worker
            # (and a restarted one) builds the same network and gives the same answers.
            torch.manual_seed(s.seed)
        threads = s.explain_threads if self.role == "explain" and s.explain_threads else s.threads
        if threads:
            torch.set_num_threads(threads)
        # PIL's own bomb check (warning above the limit, error above 2x) backs up ours.
        Image.MAX_IMAGE_PIXELS = s.limits.max_image_pixels

        model_file = (context.manifest or {}).get("model", {}).get("modelFile")
        if serialized and str(serialized).endswith(".pt2") and not model_file:
            self._initialize_pt2(context)
        else:
            super().initialize(context)  # model.py (+ state_dict) or a TorchScript .pt, .eval(), index_to_name.json
        self.model_format = self._load_other_formats(serialized)
        # What the answers are worth: the archive's label wins; otherwise a weights file in the
        # archive, or a model that says it loaded its own (krypton.models sets krypton_pretrained),
        # else the model is a random init and everything says so.
        if s.weights:
            self.weights = s.weights
        elif serialized:
            self.weights = f"{self.model_format} {serialized}" if self.model_format != "eager" else \
                f"state_dict {serialized}"
        elif getattr(self.model, "krypton_pretrained", False):
            self.weights = "pretrained (loaded by the model's constructor)"
        else:
            self.weights = UNTRAINED

        self.explainer = krypton.Explainer(self.model, cache_bytes=s.cache_bytes)
        # Why explanations of this model cannot be incremental (TorchScript, or fx cannot trace it):
        # they then run naive, and every response and log line says so.
        self.fallback_reason = self.explainer.capture.trace_failure
        self.num_classes = None
        self._shape_ready = None
        crop = self._input_side()
        if crop is not None:
            self._prepare_shape((1, 3, crop, crop), at_load=True)
        msg = (f"model {self.model_name} ({self.role}): handler={type(self).__name__} arch={s.arch or 'user model'} "
               f"format={self.model_format} weights={self.weights} classes={self.num_classes} device={self.device} "
               f"threads={torch.get_num_threads()} preprocess={self._describe_preprocess()} limits={s.limits} "
               f"cache_bytes={s.cache_bytes}")
        if self.fallback_reason:
            logger.warning("model %s: explanations are NOT incremental (%s): every position runs full "
                           "re-inference (method naive)", self.model_name, self.fallback_reason)
        if self.weights.startswith("untrained"):
            logger.warning("%s -- UNTRAINED: random weights (seed %d), predictions and heatmaps are "
                           "not meaningful; archive real weights with scripts/archive_models.py "
                           "--weights NAME=path.pth", msg, s.seed)
        else:
            logger.info("%s", msg)
        self.initialized = True

    def _initialize_pt2(self, context) -> None:
        """BaseHandler.initialize sets the device and paths, then refuses a .pt2 ("No model weights could be
        loaded"): the program is loaded by _load_other_formats, the class names here."""
        from ts.utils.util import load_label_mapping

        try:
            super().initialize(context)
        except RuntimeError as e:
            if "No model weights could be loaded" not in str(e):
                raise
        self.model = None
        self.mapping = load_label_mapping(os.path.join(context.system_properties.get("model_dir"),
                                                       "index_to_name.json"))

    def _load_other_formats(self, serialized) -> str:
        """BaseHandler loads model.py (+ state_dict) and TorchScript ``.pt``; a torch.export ``.pt2``
        (no model file) it leaves unloaded: load it here, as the plain aten module the engine runs."""
        from krypton.formats import as_module, is_torchscript

        path = getattr(self, "model_pt_path", None)
        if getattr(self, "model", None) is None and path and str(path).endswith(".pt2"):
            self.model = as_module(torch.export.load(path)).to(self.device)
            self.model.eval()
            return "torch.export"
        if getattr(self, "model", None) is None:
            raise ModelError(f"no model loaded from the archive (serialized file {serialized!r}): give a model file "
                             "+ state_dict, a TorchScript .pt, or a torch.export .pt2")
        return "torchscript" if is_torchscript(self.model) else "eager"

    def _input_side(self) -> Optional[int]:
        """The model input side known at load: the archive's preprocess crop (KryptonHandler's own
        preprocessing, or a mixin handler whose config states it)."""
        if self.krypton_own_preprocess or "crop" in self._configured_pre:
            return self.settings.preprocess.crop
        return None

    def _describe_preprocess(self):
        if self.krypton_own_preprocess:
            return self.settings.preprocess
        return f"{type(self).__name__}.preprocess (normalize={self._normalization()})"

    def _normalization(self):
        """(mean, std) of the model input, for the named fills and the PNG view; None: unknown."""
        if self.krypton_normalize is not None:
            mean, std = self.krypton_normalize
            return tuple(map(float, mean)), tuple(map(float, std))
        p = self.settings.preprocess
        if self.krypton_own_preprocess or {"mean", "std"} <= self._configured_pre:
            return p.mean, p.std
        for name in ("image_processing", "transform", "transforms", "preprocess_transform"):
            found = _find_normalize(getattr(self, name, None))
            if found is not None:
                return found
        return None

    def _prepare_shape(self, shape, at_load: bool = False) -> None:
        """Once per input shape known: the number of classes, the default plan, the time budget seeds.
        The memory calibration (probe runs, seconds) only at load: a shape first seen in a request (a
        user's preprocess without handler.preprocess.crop) keeps the conservative default memory model."""
        if self._shape_ready is not None:
            return
        self._shape_ready = tuple(shape)
        try:
            self.num_classes = self._probe_num_classes(shape)
        except Exception:  # a user model that refuses this shape: the engine checks targets itself
            if self.krypton_own_preprocess:
                raise
            logger.warning("model %s: probe of %s failed", self.model_name, shape, exc_info=True)
            return
        if self.role != "predict":  # a predictions-only registration never explains
            self._warm_up(shape, calibrate=at_load)
            self._seed_budget(shape)

    def _warm_up(self, shape, calibrate: bool) -> None:
        """Build the plan of the default options at load time: the first plan pays one-time costs
        (about a second even for a tiny model) that would otherwise land on the first request."""
        d = self.settings.defaults
        t0 = time.perf_counter()
        try:
            self.explainer.prepare(shape, d.patch_size, d.stride)
        except Exception:  # a warm-up must not keep the model from loading
            logger.warning("model %s: warm-up plan failed", self.model_name, exc_info=True)
            return
        t1 = time.perf_counter()
        if calibrate and self.settings.calibrate_memory:
            budget = self.settings.memory_budget or krypton.options.DEFAULT_MEMORY_BUDGET
            models = self.explainer.calibrate_memory(shape, d.patch_size, d.stride, budget)
            logger.info("model %s: memory calibrated in %.0f ms: %s", self.model_name,
                        (time.perf_counter() - t1) * 1e3, models)
        # the warm-up's temporaries: the worker holds its weights, plans and up to KRYPTON_ARENA_KEEP_MB of
        # arena pages that the first request then reuses instead of page-faulting them in
        release_free_memory()
        logger.info("model %s: warm-up plan (P=%d, S=%d) in %.0f ms", self.model_name, d.patch_size,
                    d.stride, (t1 - t0) * 1e3)

    def _seed_budget(self, shape) -> None:
        """Per-position time estimates for the time budget (obe_guard.WorkBudget)."""
        d = self.settings.defaults
        try:
            t_img = obe_guard.time_forward(self.model, shape, self.device)
            speedup = 1.0 if self.fallback_reason else \
                self.explainer.estimate(shape, d.patch_size, d.stride).theoretical_speedup()
        except Exception:  # no estimate: the budget is then learned from the first explanations
            logger.warning("model %s: time estimate failed", self.model_name, exc_info=True)
            return
        self.budget.seed(t_img, speedup)
        self.budget.remeasure = lambda: obe_guard.time_forward(self.model, shape, self.device)
        logger.info("model %s: %.1f ms per full forward, default-options speedup %.2fx; budget %d s per batch "
                    "(max_positions %d: naive ~%.0f s)", self.model_name, t_img * 1e3, speedup,
                    self.settings.limits.max_request_seconds, self.settings.limits.max_positions,
                    self.budget.estimate(self.settings.limits.max_positions, "naive"))

    def _probe_num_classes(self, shape) -> Optional[int]:
        with torch.inference_mode():
            out = self.model(torch.zeros(*shape, device=self.device))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return int(out.shape[-1])

    # ------------------------------------------------------------------------------ requests
    def _parse(self, idx, payload):
        """Image bytes and options of one explanation request; raises RequestError."""
        if self.role == "predict" and _explain_flag(self.context, idx):
            raise RequestError(self._explained_elsewhere(), status=404)
        headers = self.context.get_all_request_header(idx) or {}
        image_bytes, raw_opts, _kind = obe_request.extract(payload, headers, self.settings.limits)
        return image_bytes, obe_request.parse_options(raw_opts, self.settings, self.num_classes)

    def handle(self, data, context):
        """Predictions only: the handler's own ``handle`` (BaseHandler's flow), untouched. Otherwise the
        explanation requests are checked first (a refused one never reaches ``preprocess``), then the rest
        runs through BaseHandler's flow, which calls ``explain_handle``."""
        self.context = context
        flags = [_explain_flag(context, i) for i in range(len(data))]
        if not any(flags):
            return super().handle(data, context)
        t0 = time.perf_counter()
        results: List[Any] = [None] * len(data)
        opts = {}
        for i, payload in enumerate(data):
            if flags[i]:
                try:
                    image_bytes, opts[i] = self._parse(i, payload)
                    obe_request.open_image(image_bytes, self.settings.limits)  # header checks, nothing decoded
                except Exception as e:  # noqa: BLE001 - nothing a client sends may take the worker down
                    results[i] = self._failure(i, e, True)
        keep = [i for i in range(len(data)) if results[i] is None]
        if not keep:
            return results
        self._krypton_batch = (keep, flags, opts, t0)
        try:
            if len(keep) == len(data):
                return super().handle(data, context)
            try:
                out = self.explain_handle(self.preprocess([data[i] for i in keep]), [data[i] for i in keep])
            except Exception as e:  # noqa: BLE001 - the user's preprocess failed on this batch
                out = [self._failure(i, e, flags[i]) for i in keep]
            for i, r in zip(keep, out):
                results[i] = r
            return results
        finally:
            self._krypton_batch = None

    def _is_explain(self):
        if self._krypton_batch is not None:  # a batch with explanation requests (request 0 may be a prediction)
            return True
        return super()._is_explain()

    def explain_handle(self, data_preprocess, raw_data):
        """TorchServe's explain hook: one Krypton explanation per explanation request, from the tensor the
        handler's own ``preprocess()`` produced (row i of ``data_preprocess``); prediction rows of a mixed
        batch get the handler's own ``inference()`` + ``postprocess()``."""
        if self._krypton_batch is None:  # called by a handle() other than ours
            n = len(raw_data)
            self._krypton_batch = (list(range(n)), [_explain_flag(self.context, i) for i in range(n)], {},
                                   time.perf_counter())
        keep, flags, opts, t0 = self._krypton_batch
        results: List[Any] = [None] * len(keep)
        rows = [j for j, i in enumerate(keep) if not flags[i]]
        if rows:
            try:
                out = self.postprocess(self.inference(self._rows(data_preprocess, rows)))
                for j, r in zip(rows, out):
                    results[j] = r
            except Exception as e:  # noqa: BLE001
                for j in rows:
                    results[j] = self._failure(keep[j], e, False)
        for j, i in enumerate(keep):
            if not flags[i]:
                continue
            try:
                if i not in opts:
                    opts[i] = self._parse(i, raw_data[j])[1]
                x = self._row(data_preprocess, j)
                results[j] = self._explain_tensor(i, x, None, opts[i], t0, 0.0)
            except Exception as e:  # noqa: BLE001
                results[j] = self._failure(i, e, True)
        return results

    @staticmethod
    def _rows(data, rows):
        if isinstance(data, torch.Tensor):
            return data[rows]
        return torch.stack([KryptonExplainMixin._row(data, j) for j in rows])

    @staticmethod
    def _row(data, j) -> torch.Tensor:
        x = data[j]
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] == 1:
            x = x[0]
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or not x.is_floating_point():
            got = f"a {tuple(x.shape)} {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ModelError(f"preprocess() gave {got} for this request; Krypton explains a float (C, H, W) "
                             "tensor per request (a batch tensor (N, C, H, W) or a list of them)")
        return x

    def _explained_elsewhere(self) -> str:
        other = self.model_name + os.environ.get(EXPLAIN_SUFFIX_ENV, "")
        return (f"registration {self.model_name} serves predictions only; explanations of this model are "
                f"served by the registration {other}: POST /explanations/{other} (or /v1/models/{other}:explain, "
                f"/v2/models/{other}/explain). Separate workers and queue, so explanations never delay "
                f"predictions (README \"Deployment\").")

    def _failure(self, idx, e: Exception, explain: bool):
        """Client mistakes (RequestError, the engine's OptionError) answer 4xx naming the parameter; any
        other exception is a 500 whose traceback goes to the log, never to the client."""
        if isinstance(e, RequestError):
            return self._error(idx, e.status, e.to_dict(), explain)
        if isinstance(e, OptionError):
            return self._error(idx, 400, RequestError(str(e), parameter=e.parameter).to_dict(), explain)
        logger.exception("model %s: request %d failed", self.model_name, idx)
        message = (f"the model cannot be explained: {e}" if isinstance(e, ModelError) else
                   f"internal error ({type(e).__name__}); the worker log has the details")
        return self._error(idx, 500, {"code": 500, "type": "InternalServerError", "message": message}, explain)

    # ---------------------------------------------------------------------------------- helpers
    def _metric(self, idx, name, value, unit="Count", counter=False):
        from ts.metrics.metric_type_enum import MetricTypes

        try:
            self.context.metrics.add_metric(
                name, value, unit, idx, [],  # fresh dimensions: ModelName and Level are added
                MetricTypes.COUNTER if counter else MetricTypes.GAUGE)
        except Exception:  # metrics must never fail a request
            logger.debug("metric %s not recorded", name, exc_info=True)

    def _error(self, idx, status, body, explain):
        body = dict(body, message=obe_request.clip_text(str(body.get("message")), 400))  # bounded echo
        self.context.set_response_status(status, _PHRASES.get(status, "Error"), idx)
        self.context.set_response_content_type(idx, _JSON)
        self._metric(idx, "KryptonClientErrors" if status < 500 else "KryptonServerErrors", 1, counter=True)
        logger.info("model %s: %s -> %d %s", self.model_name, "explain" if explain else "predict",
                    status, body.get("message"))
        return json.dumps(body)

    def _name(self, cls: Optional[int]) -> Optional[str]:
        if self.mapping is None or cls is None:
            return None
        return self.mapping.get(str(int(cls)))

    def _streamer(self, idx):
        """Progress callback sending the coarse drill-down map as an intermediate response.

        TorchServe streams intermediate responses as HTTP chunks; it can only address one request,
        so a batch of several requests gets the final response alone.
        """
        context = self.context
        if len(getattr(context, "request_ids", None) or {}) != 1:
            return None

        def send(stage, coarse):
            from ts.handler_utils.utils import send_intermediate_predict_response

            body = {"stage": stage, "heatmap": coarse.heatmap.detach().float().cpu().tolist(),
                    "label": int(coarse.label), "probability": float(coarse.probability)}
            # headers leave with the first chunk: a streamed body is newline-delimited JSON documents
            context.set_response_content_type(idx, "application/x-ndjson")
            send_intermediate_predict_response([json.dumps(body) + "\n"], context.request_ids,
                                               "Intermediate response", 200, context)

        return send

    def _explain_tensor(self, idx, x, view, opts, t0, decode_ms):
        """run -> metrics -> render: one explanation of the preprocessed (C, H, W) tensor ``x``, as JSON or
        PNG. ``view``: the decoded original photo (PIL; KryptonHandler: the heatmap is drawn on all of it,
        its ``region`` mapped back through handler.preprocess), or None (a user's preprocess: the photo is
        made from ``x`` and the normalization, and the region is the whole input)."""
        x = x.to(self.device)
        if isinstance(opts.fill, str) and self._normalization() is None:
            raise RequestError(
                f"option fill: {opts.fill!r} needs the input normalization (mean, std) of {type(self).__name__}."
                "preprocess(), which this handler does not know; set handler.preprocess.mean and .std in "
                "model-config.yaml or krypton_normalize = (mean, std) on the handler class, or send a numeric "
                "fill (a value of the normalized input)", parameter="fill")
        self._prepare_shape((1, *x.shape))
        if opts.occlusion == "segments":  # SLIC superpixels of the model's input view (segments.py)
            return obe_segments.explain(self, idx, x, opts, t0, decode_ms)
        positions = self._check_positions(x, opts)
        method = "naive" if self.fallback_reason else opts.method  # what really runs
        self.budget.check(self.context, positions, method)  # refuse what cannot finish in time
        with PeakMemory(self.device) as pm:
            exp = self._run(idx, x, opts, method)
        if exp.extra.get("approximation", {}).get("mode", "exact") == "exact":
            # only exact runs teach the rate: an approximate one is faster, and its rate would let the
            # next exact request past the time budget
            self.budget.record(positions, exp.method, exp.timings_ms["total"] / 1e3)
        result = exp.to_dict()
        result["timings_ms"]["decode_preprocess"] = decode_ms
        result["memory"].update(pm.to_dict())
        pre = self.settings.preprocess
        result["region"] = (obe_render.crop_region(view.size, pre.resize, pre.crop) if view is not None else
                            obe_render.crop_region((int(x.shape[-1]), int(x.shape[-2])), None, None))
        self._record(idx, x, exp, result, positions, pm)
        if opts.format == "png":
            if view is None:
                view = Image.fromarray(self._view(x), "RGB")
            return self._png(idx, view, result["region"], exp, positions, result["timings_ms"]["total"],
                             opts.png_size)
        return self._json(idx, x, exp, result, opts, t0)

    def _view(self, x) -> np.ndarray:
        """The photo behind a normalized (3, H, W) tensor: undo the normalization (min-max when unknown)."""
        v = x.detach().float().cpu()
        norm = self._normalization()
        if norm is not None and len(norm[0]) == v.shape[0]:
            mean, std = (torch.tensor(t).view(-1, 1, 1) for t in norm)
            v = v * std + mean
        else:
            v = (v - v.min()) / (v.max() - v.min() + 1e-12)
        if v.shape[0] == 1:
            v = v.expand(3, -1, -1)
        return (v[:3].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).numpy()

    def _check_positions(self, x, opts) -> int:
        """The number of patch positions, refused above the limit before any inference."""
        H, W = int(x.shape[-2]), int(x.shape[-1])
        hm, wm = krypton.grid_shape(H, W, opts.patch_size, opts.stride)  # OptionError: patch or stride too big
        positions = int(hm) * int(wm)
        if positions > self.settings.limits.max_positions:
            raise RequestError(
                f"{positions} occlusion positions ({hm}x{wm} for a {H}x{W} input, patch_size "
                f"{opts.patch_size}, stride {opts.stride}) exceed the limit max_positions="
                f"{self.settings.limits.max_positions}; use a larger stride", parameter="stride")
        return positions

    def _run(self, idx, x, opts, method):
        s = self.settings
        return self.explainer.explain(
            x.to(self.device), patch_size=opts.patch_size, stride=opts.stride, fill=opts.fill,
            target=opts.target, batch_size=opts.batch_size, method=method,
            normalize=self._normalization(), memory_budget=s.memory_budget, tau=opts.tau,
            target_ssim=opts.target_ssim, drilldown=opts.drilldown, mode=opts.mode, precision=opts.precision,
            progress=self._streamer(idx) if opts.stream and opts.format == "json" else None)

    def _record(self, idx, x, exp, result, positions, pm) -> None:
        """Metrics and the log line, before rendering: a render failure still counts the work."""
        total = result["timings_ms"].get("total", 0.0)
        self._metric(idx, "KryptonExplainRequests", 1, counter=True)
        self._metric(idx, "KryptonCacheHits" if exp.cache == "hit" else "KryptonCacheMisses", 1, counter=True)
        self._metric(idx, "KryptonExplainLatency", total, "Milliseconds")
        self._metric(idx, "KryptonExplainLatencyTotal", total, "Milliseconds", counter=True)
        self._metric(idx, "KryptonPositions", positions)
        self._metric(idx, "KryptonPositionsTotal", positions, counter=True)
        self._metric(idx, "KryptonMaterializedBytes", result["memory"].get("materialized_bytes") or 0, "Bytes")
        self._metric(idx, "KryptonMeasuredPeakBytes", pm.peak_bytes or 0, "Bytes")
        logger.info("model %s weights=%s explain %dx%d P=%d S=%d method=%s incremental=%s batch=%d positions=%d "
                    "cache=%s total=%.1fms peak=%s B (%s)", self.model_name, self.weights, x.shape[-2],
                    x.shape[-1], exp.patch_size, exp.stride, exp.method, exp.incremental, exp.batch_size,
                    positions, exp.cache, total, pm.peak_bytes, pm.method)
        if not exp.incremental and self.fallback_reason:
            logger.info("model %s: not incremental: %s", self.model_name, exp.fallback_reason)

    def _png(self, idx, img, region, exp, positions, total_ms, png_size) -> bytes:
        prob = float(exp.probability)
        heatmap = exp.heatmap.detach().float().cpu().numpy()
        name = self._name(exp.label)
        text = f"{name} (class {exp.label})" if name is not None else f"class {exp.label}"
        text += f", p = {prob:.3g}" + (" [untrained-random-init]" if self.weights == UNTRAINED else "")
        png = obe_render.render_original_png(img, region, heatmap, prob, exp.patch_size, exp.stride, text, png_size)
        c = self.context
        c.set_response_content_type(idx, "image/png")
        for k, v in (("Label", exp.label), ("Probability", f"{prob:.6g}"), ("Cache", exp.cache),
                     ("Positions", positions), ("Weights", self.weights), ("Total-Ms", f"{total_ms:.1f}"),
                     ("Region", ",".join(f"{v:g}" for v in region["box"]))):
            c.set_response_header(idx, f"X-Krypton-{k}", str(v))
        if name is not None:
            c.set_response_header(idx, "X-Krypton-Label-Name", name.encode("ascii", "replace").decode())
        return png

    def _json(self, idx, x, exp, result, opts, t0) -> str:
        """The explanation's own to_dict() plus what only the server knows."""
        used = {"patch_size": exp.patch_size, "stride": exp.stride, "fill": opts.fill, "target": opts.target,
                "method": exp.method, "batch_size": exp.batch_size, "tau": exp.tau, "precision": exp.precision,
                "format": opts.format}
        if exp.method != opts.method:  # an untraceable model (TorchScript) runs naive
            used["method_requested"] = opts.method
        if exp.fill != opts.fill:  # what the engine wrote (a named fill resolved)
            used["fill_value"] = exp.fill
        body = {"model": self.model_name, "arch": self.settings.arch, "weights": self.weights,
                "model_format": self.model_format, **result,
                "input_shape": [int(v) for v in x.shape], "options": used}
        for key, cls in (("label_name", exp.label), ("predicted_name", exp.predicted)):
            name = self._name(cls)
            if name is not None:
                body[key] = name
        body["timings_ms"]["request"] = (time.perf_counter() - t0) * 1e3  # decode to JSON, this worker
        if self.context.get_response_content_type(idx) != "application/x-ndjson":  # not streamed
            self.context.set_response_content_type(idx, _JSON)
        return json.dumps(body)


class KryptonHandler(KryptonExplainMixin, BaseHandler):
    """The complete handler: BaseHandler's model loading, Krypton's own preprocessing (``handler.preprocess``
    of model-config.yaml: resize, crop, mean, std), top-k predictions and explanations. One instance per
    TorchServe worker process."""

    krypton_own_preprocess = True

    def handle(self, data, context):
        self.context = context
        results: List[Any] = [None] * len(data)
        predicts: List[Tuple[int, torch.Tensor]] = []
        for idx, payload in enumerate(data):
            t0 = time.perf_counter()
            explain = False
            try:
                explain = _explain_flag(context, idx)
                image_bytes, opts = self._parse(idx, payload)
                if explain:
                    results[idx] = self._explain(idx, image_bytes, opts, t0)
                else:
                    x, _img, _ = self._load_image(image_bytes)
                    predicts.append((idx, x))
            except Exception as e:  # noqa: BLE001 - nothing a client sends may take the worker down
                results[idx] = self._failure(idx, e, explain)
        if predicts:
            self._predict(predicts, results)
        return results

    def _explain(self, idx, image_bytes, opts, t0):
        x, img, decode_ms = self._load_image(image_bytes)
        return self._explain_tensor(idx, x, img, opts, t0, decode_ms)

    def _load_image(self, image_bytes):
        t0 = time.perf_counter()
        img = obe_request.decode_image(image_bytes, self.settings.limits, self.settings.allow_mode_conversion)
        x, _view = obe_request.preprocess(img, self.settings.preprocess, self.settings.limits)
        return x, img, (time.perf_counter() - t0) * 1e3  # img: the decoded original (PNG overlay)

    def _predict(self, predicts, results):
        idxs = [i for i, _ in predicts]
        try:
            shapes = {tuple(x.shape) for _, x in predicts}
            with torch.inference_mode():
                if len(shapes) == 1:
                    outs = [self.model(torch.stack([x for _, x in predicts]).to(self.device))]
                else:  # preprocess without a crop: sizes can differ
                    outs = [self.model(x.unsqueeze(0).to(self.device)) for _, x in predicts]
                logits = torch.cat([o[0] if isinstance(o, (tuple, list)) else o for o in outs])
                probs = torch.softmax(logits.float(), dim=1).cpu()
            k = min(self.settings.topk, probs.shape[1])
            top_p, top_i = probs.topk(k, dim=1)
            for row, idx in enumerate(idxs):
                preds = []
                for p, c in zip(top_p[row].tolist(), top_i[row].tolist()):
                    item = {"label": int(c), "probability": float(p)}
                    name = self._name(c)
                    if name is not None:
                        item["label_name"] = name
                    preds.append(item)
                self.context.set_response_content_type(idx, _JSON)
                results[idx] = json.dumps({"model": self.model_name, "weights": self.weights,
                                           "predictions": preds})
                self._metric(idx, "KryptonPredictRequests", 1, counter=True)
        except Exception as e:  # noqa: BLE001
            for idx in idxs:
                results[idx] = self._failure(idx, e, False)
