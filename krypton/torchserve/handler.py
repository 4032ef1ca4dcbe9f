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
import time
from typing import Any, List, Optional, Tuple

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

import krypton
from krypton.errors import ModelError, OptionError
from krypton.memory import PeakMemory

from . import guard as obe_guard
from . import render as obe_render
from . import request as obe_request
from .request import RequestError

logger = logging.getLogger(__name__)

_JSON = "application/json"
_PHRASES = {400: "Bad Request", 413: "Payload Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}
UNTRAINED = "untrained-random-init"


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

        self.explainer = krypton.Explainer(self.model, cache_bytes=s.cache_bytes)
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
            except Exception as e:  # noqa: BLE001 - nothing a client sends may take the worker down
                results[idx] = self._failure(idx, e, explain)
        if predicts:
            self._predict(predicts, results)
        return results

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
        except Exception as e:  # noqa: BLE001
            for idx in idxs:
                results[idx] = self._failure(idx, e, False)

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
        """request -> run -> metrics -> render: one explanation, as JSON or PNG."""
        x, view, decode_ms = self._load_image(image_bytes)
        positions = self._check_positions(x, opts)
        self.budget.check(self.context, positions, opts.method)  # refuse what cannot finish in time
        with PeakMemory(self.device) as pm:
            exp = self._run(idx, x, opts)
        self.budget.record(positions, exp.method, exp.timings_ms["total"] / 1e3)
        result = exp.to_dict()
        result["timings_ms"]["decode_preprocess"] = decode_ms
        result["memory"].update(pm.to_dict())
        self._record(idx, x, exp, result, positions, pm)
        if opts.format == "png":
            return self._png(idx, view, exp, positions, result["timings_ms"]["total"])
        return self._json(idx, x, exp, result, opts, t0)

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

    def _run(self, idx, x, opts):
        s = self.settings
        return self.explainer.explain(
            x.to(self.device), patch_size=opts.patch_size, stride=opts.stride, fill=opts.fill,
            target=opts.target, batch_size=opts.batch_size, method=opts.method,
            normalize=(s.preprocess.mean, s.preprocess.std), memory_budget=s.memory_budget, tau=opts.tau,
            target_ssim=opts.target_ssim, drilldown=opts.drilldown, mode=opts.mode,
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

    def _png(self, idx, view, exp, positions, total_ms) -> bytes:
        prob = float(exp.probability)
        heatmap = exp.heatmap.detach().float().cpu().numpy()
        png = obe_render.overlay_png(view, heatmap, prob, exp.patch_size, exp.stride)
        c = self.context
        c.set_response_content_type(idx, "image/png")
        for k, v in (("Label", exp.label), ("Probability", f"{prob:.6g}"), ("Cache", exp.cache),
                     ("Positions", positions), ("Weights", self.weights), ("Total-Ms", f"{total_ms:.1f}")):
            c.set_response_header(idx, f"X-Krypton-{k}", str(v))
        name = self._name(exp.label)
        if name is not None:
            c.set_response_header(idx, "X-Krypton-Label-Name", name.encode("ascii", "replace").decode())
        return png

    def _json(self, idx, x, exp, result, opts, t0) -> str:
        """The explanation's own to_dict() plus what only the server knows."""
        used = {"patch_size": exp.patch_size, "stride": exp.stride, "fill": opts.fill, "target": opts.target,
                "method": exp.method, "batch_size": exp.batch_size, "tau": exp.tau, "format": opts.format}
        if exp.fill != opts.fill:  # what the engine wrote (a named fill resolved)
            used["fill_value"] = exp.fill
        body = {"model": self.model_name, "arch": self.settings.arch, "weights": self.weights, **result,
                "input_shape": [int(v) for v in x.shape], "options": used}
        for key, cls in (("label_name", exp.label), ("predicted_name", exp.predicted)):
            name = self._name(cls)
            if name is not None:
                body[key] = name
        body["timings_ms"]["request"] = (time.perf_counter() - t0) * 1e3  # decode to JSON, this worker
        if self.context.get_response_content_type(idx) != "application/x-ndjson":  # not streamed
            self.context.set_response_content_type(idx, _JSON)
        return json.dumps(body)
