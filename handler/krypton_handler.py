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
      or format=png (jet_r overlay on the photo).
Client mistakes answer 400/413 with a JSON body naming the problem; nothing a client sends takes
the worker down. The engine (``krypton.Explainer``) keeps one LRU of materialized activations per
worker, keyed by the preprocessed image's hash, bounded by ``cache_bytes``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

import obe_guard
import obe_memory
import obe_render
import obe_request
from obe_request import RequestError

logger = logging.getLogger(__name__)

_JSON = "application/json"
_PHRASES = {400: "Bad Request", 413: "Payload Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}
UNTRAINED = "untrained-random-init"


def _jsonable(value):
    """Engine extras (approximation report, drill-down details) as plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "tolist"):  # numpy
        return value.tolist()
    return value


class KryptonHandler(BaseHandler):
    """BaseHandler subclass; one instance per TorchServe worker process."""

    def initialize(self, context):
        cfg = (getattr(context, "model_yaml_config", None) or {}).get("handler")
        self.settings = obe_request.settings_from_config(cfg)
        s = self.settings
        rt = obe_guard.check_response_timeout(getattr(context, "model_yaml_config", None),
                                              s.limits.max_request_seconds)
        self.budget = obe_guard.WorkBudget(s.limits.max_request_seconds, rt)
        obe_guard.watch_duplicate_parts()
        self.model_name = context.model_name
        serialized = (context.manifest or {}).get("model", {}).get("serializedFile")
        if not serialized:
            # No weights file: the model's constructor initializes randomly. Seed it so every worker
            # (and a restarted one) builds the same network and gives the same answers.
            torch.manual_seed(s.seed)
        if s.threads:
            torch.set_num_threads(s.threads)
        # PIL's own bomb check (warning above the limit, error above 2x) backs up ours.
        Image.MAX_IMAGE_PIXELS = s.limits.max_image_pixels

        super().initialize(context)  # loads model.py (+ state_dict), .eval(), index_to_name.json
        # What the answers are worth: the archive's label wins; otherwise a weights file in the
        # archive, or a model that says it loaded its own (krypton.models sets krypton_pretrained),
        # else the model is a random init and everything says so.
        if s.weights:
            self.weights = s.weights
        elif serialized:
            self.weights = f"state_dict {serialized}"
        elif getattr(self.model, "krypton_pretrained", False):
            self.weights = "pretrained (loaded by the model's constructor)"
        else:
            self.weights = UNTRAINED
        self.num_classes = self._probe_num_classes()

        import krypton  # the engine; imported here so a missing install fails the load loudly

        self.explainer = krypton.Explainer(self.model, cache_bytes=s.cache_bytes)
        self._grid_shape = krypton.grid_shape
        self._warm_up()
        self._seed_budget()
        msg = (f"model {self.model_name}: arch={s.arch or 'user model'} weights={self.weights} "
               f"classes={self.num_classes} device={self.device} threads={torch.get_num_threads()} "
               f"preprocess={s.preprocess} limits={s.limits} cache_bytes={s.cache_bytes}")
        if self.weights.startswith("untrained"):
            logger.warning("%s -- UNTRAINED: random weights (seed %d), predictions and heatmaps are "
                           "not meaningful; archive real weights with scripts/archive_models.py "
                           "--weights NAME=path.pth", msg, s.seed)
        else:
            logger.info("%s", msg)
        self.initialized = True

    def _warm_up(self) -> None:
        """Build the plan of the default options at load time: the first plan pays one-time costs
        (about a second even for a tiny model) that would otherwise land on the first request."""
        c, d = self.settings.preprocess.crop, self.settings.defaults
        if c is None:
            return
        t0 = time.perf_counter()
        try:
            self.explainer.prepare((1, 3, c, c), d.patch_size, d.stride)
        except Exception:  # a warm-up must not keep the model from loading
            logger.warning("model %s: warm-up plan failed", self.model_name, exc_info=True)
            return
        logger.info("model %s: warm-up plan (P=%d, S=%d) in %.0f ms", self.model_name, d.patch_size,
                    d.stride, (time.perf_counter() - t0) * 1e3)

    def _seed_budget(self) -> None:
        """Per-position time estimates for the time budget (obe_guard.WorkBudget)."""
        c, d = self.settings.preprocess.crop, self.settings.defaults
        if c is None:
            return
        import krypton

        try:
            t_img = obe_guard.time_forward(self.model, (1, 3, c, c), self.device)
            speedup = krypton.estimate_speedup(self.model, (1, 3, c, c), d.patch_size, d.stride).speedup
        except Exception:  # no estimate: the budget is then learned from the first explanations
            logger.warning("model %s: time estimate failed", self.model_name, exc_info=True)
            return
        self.budget.seed(t_img, speedup)
        self.budget.remeasure = lambda: obe_guard.time_forward(self.model, (1, 3, c, c), self.device)
        logger.info("model %s: %.1f ms per full forward, default-options speedup %.2fx; budget %d s per batch "
                    "(max_positions %d: naive ~%.0f s)", self.model_name, t_img * 1e3, speedup,
                    self.settings.limits.max_request_seconds, self.settings.limits.max_positions,
                    self.budget.estimate(self.settings.limits.max_positions, "naive"))

    def _probe_num_classes(self) -> Optional[int]:
        c = self.settings.preprocess.crop
        if c is None:
            return None
        with torch.inference_mode():
            out = self.model(torch.zeros(1, 3, c, c, device=self.device))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return int(out.shape[-1])

    # ---------------------------------------------------------------------------------- handle
    def handle(self, data, context):
        self.context = context
        results: List[Any] = [None] * len(data)
        predicts: List[Tuple[int, torch.Tensor]] = []
        for idx, payload in enumerate(data):
            t0 = time.perf_counter()
            explain = False
            try:
                explain = str(context.get_request_header(idx, "explain")).lower() == "true"
                headers = context.get_all_request_header(idx) or {}
                image_bytes, raw_opts, _kind = obe_request.extract(payload, headers, self.settings.limits)
                opts = obe_request.parse_options(raw_opts, self.settings, self.num_classes)
                if explain:
                    results[idx] = self._explain(idx, image_bytes, opts, t0)
                else:
                    x, _view, _ = self._load_image(image_bytes)
                    predicts.append((idx, x))
            except RequestError as e:
                results[idx] = self._error(idx, e.status, e.to_dict(), explain)
            except Exception as e:  # a bug or an engine failure: answer 500, keep serving
                logger.exception("model %s: request %d failed", self.model_name, idx)
                results[idx] = self._error(idx, 500, {
                    "code": 500, "type": "InternalServerError",
                    "message": f"{type(e).__name__}: {e}"}, explain)
        if predicts:
            self._predict(predicts, results)
        return results

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

    def _load_image(self, image_bytes):
        t0 = time.perf_counter()
        img = obe_request.decode_image(image_bytes, self.settings.limits, self.settings.allow_mode_conversion)
        x, view = obe_request.preprocess(img, self.settings.preprocess, self.settings.limits)
        return x, view, (time.perf_counter() - t0) * 1e3

    def _name(self, cls: Optional[int]) -> Optional[str]:
        if self.mapping is None or cls is None:
            return None
        return self.mapping.get(str(int(cls)))

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
        except Exception as e:
            logger.exception("model %s: predict batch failed", self.model_name)
            for idx in idxs:
                results[idx] = self._error(idx, 500, {"code": 500, "type": "InternalServerError",
                                                      "message": f"{type(e).__name__}: {e}"}, False)

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

    def _explain(self, idx, image_bytes, opts, t0):
        s = self.settings
        x, view, decode_ms = self._load_image(image_bytes)
        H, W = int(x.shape[-2]), int(x.shape[-1])
        try:
            hm, wm = self._grid_shape(H, W, opts.patch_size, opts.stride)
        except ValueError as e:
            msg = str(e)
            raise RequestError(f"{msg} (the model input is the preprocessed {H}x{W} view)",
                               parameter="stride" if msg.startswith("stride") else "patch_size") from None
        positions = int(hm) * int(wm)
        if positions > s.limits.max_positions:
            raise RequestError(
                f"{positions} occlusion positions ({hm}x{wm} for a {H}x{W} input, patch_size "
                f"{opts.patch_size}, stride {opts.stride}) exceed the limit max_positions="
                f"{s.limits.max_positions}; use a larger stride", parameter="stride")
        self.budget.check(self.context, positions, opts.method)
        mean, std = s.preprocess.mean, s.preprocess.std
        with obe_memory.PeakMemory(self.device) as pm:
            try:
                exp = self.explainer.explain(
                    x.to(self.device), patch_size=opts.patch_size, stride=opts.stride, fill=opts.fill,
                    target=opts.target, batch_size=opts.batch_size, method=opts.method,
                    normalize=(mean, std), memory_budget=s.memory_budget, tau=opts.tau,
                    target_ssim=opts.target_ssim, drilldown=opts.drilldown, mode=opts.mode,
                    progress=self._streamer(idx) if opts.stream and opts.format == "json" else None)
            except ValueError as e:  # the engine's word on a parameter it refuses
                raise RequestError(str(e)) from None
        self.budget.record(positions, str(getattr(exp, "method", opts.method)),
                           float(dict(exp.timings_ms).get("total", 0.0)) / 1e3)
        heatmap = exp.heatmap.detach().float().cpu()
        label = int(exp.label)
        prob = float(exp.probability)
        timings = {k: float(v) for k, v in dict(exp.timings_ms).items()}
        timings["decode_preprocess"] = decode_ms
        memory = {k: (int(v) if v is not None else None) for k, v in dict(exp.memory).items()}
        memory.update(pm.to_dict())
        cache = str(exp.cache)
        used = {
            "patch_size": int(getattr(exp, "patch_size", opts.patch_size)),
            "stride": int(getattr(exp, "stride", opts.stride)),
            "fill": opts.fill,
            "target": opts.target,
            "method": str(getattr(exp, "method", opts.method)),
            "batch_size": int(exp.batch_size),
            "tau": float(getattr(exp, "tau", opts.tau)),
            "format": opts.format,
        }
        fill_value = getattr(exp, "fill", None)  # what the engine wrote (a named fill resolved)
        if isinstance(fill_value, torch.Tensor):
            fill_value = fill_value.tolist()
        if fill_value is not None and fill_value != opts.fill:
            used["fill_value"] = fill_value

        # metrics and the log line before rendering, so a render failure still counts the work
        self._metric(idx, "KryptonExplainRequests", 1, counter=True)
        self._metric(idx, "KryptonCacheHits" if cache == "hit" else "KryptonCacheMisses", 1, counter=True)
        self._metric(idx, "KryptonExplainLatency", timings.get("total", 0.0), "Milliseconds")
        self._metric(idx, "KryptonExplainLatencyTotal", timings.get("total", 0.0), "Milliseconds", counter=True)
        self._metric(idx, "KryptonPositions", positions)
        self._metric(idx, "KryptonPositionsTotal", positions, counter=True)
        self._metric(idx, "KryptonMaterializedBytes", memory.get("materialized_bytes") or 0, "Bytes")
        self._metric(idx, "KryptonMeasuredPeakBytes", pm.peak_bytes or 0, "Bytes")
        logger.info("model %s weights=%s explain %dx%d P=%d S=%d method=%s batch=%d positions=%d "
                    "cache=%s total=%.1fms peak=%s B (%s)", self.model_name, self.weights, H, W,
                    used["patch_size"], used["stride"], used["method"], used["batch_size"], positions,
                    cache, timings.get("total", 0.0), pm.peak_bytes, pm.method)

        if opts.format == "png":
            png = obe_render.overlay_png(view, heatmap.numpy(), prob, used["patch_size"], used["stride"])
            c = self.context
            c.set_response_content_type(idx, "image/png")
            for k, v in (("Label", label), ("Probability", f"{prob:.6g}"), ("Cache", cache),
                         ("Positions", positions), ("Weights", self.weights),
                         ("Total-Ms", f"{timings.get('total', 0.0):.1f}")):
                c.set_response_header(idx, f"X-Krypton-{k}", str(v))
            name = self._name(label)
            if name is not None:
                c.set_response_header(idx, "X-Krypton-Label-Name", name.encode("ascii", "replace").decode())
            return png

        body = {
            "model": self.model_name,
            "arch": s.arch,
            "weights": self.weights,
            "label": label,
            "label_name": self._name(label),
            "probability": prob,
            "predicted": int(exp.predicted),
            "predicted_name": self._name(int(exp.predicted)),
            "input_shape": [int(v) for v in x.shape],
            "heatmap_shape": [int(heatmap.shape[0]), int(heatmap.shape[1])],
            "heatmap": heatmap.tolist(),
            "options": used,
            "positions": positions,
            "timings_ms": timings,
            "memory": memory,
            "theoretical_speedup": float(exp.theoretical_speedup),
            "executed_speedup": float(exp.executed_speedup),
            **_jsonable(exp.extra),
            "cache": cache,
        }
        if body["label_name"] is None:
            del body["label_name"], body["predicted_name"]
        timings["request"] = (time.perf_counter() - t0) * 1e3  # decode to JSON, this worker
        if self.context.get_response_content_type(idx) != "application/x-ndjson":  # not streamed
            self.context.set_response_content_type(idx, _JSON)
        return json.dumps(body)
