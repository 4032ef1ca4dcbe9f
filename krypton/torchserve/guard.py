"""Guards of the Krypton handler that need TorchServe's worker: duplicate multipart fields and the
time budget of a TorchServe batch.

- Duplicate fields: TorchServe 0.12's worker (``ts.service.Service.retrieve_data_for_inference``)
  folds a request's multipart parts into a dict, so of two ``data`` parts the last one silently
  wins. ``watch_duplicate_parts()`` wraps that function in this worker process and records the
  repeated names under ``obe_request.DUPLICATES_KEY`` in the request's headers (a key no HTTP header
  can have), where ``obe_request.extract`` refuses them with a 400. Headers sent twice cannot be
  seen here at all: TorchServe's Java frontend keeps the last value before the worker gets it.
- Time: when a batch runs past ``responseTimeout`` TorchServe kills the worker and answers
  500 "Worker died." (a crash answers the same text, 507 when the OOM killer struck). So
  ``check_response_timeout`` refuses at load an archive whose responseTimeout does not leave room
  for ``limits.max_request_seconds``, and ``WorkBudget`` refuses (503, before any work) an explanation
  whose estimated time exceeds that budget, from per-position times measured on this worker.

Part of the installed package (``krypton.torchserve``); archives hold only ``krypton_handler.py``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any, Mapping, Optional

from .request import DUPLICATES_KEY, RequestError

logger = logging.getLogger(__name__)

RESPONSE_TIMEOUT_MARGIN = 1.2   # responseTimeout >= max_request_seconds * this
_installed = False


def watch_duplicate_parts() -> bool:
    """Install the duplicate-field recorder once per worker process; False if TorchServe's layout
    is not the one it was written for (then duplicates are not detected, and a warning says so)."""
    global _installed
    if _installed:
        return True
    try:
        from ts.service import Service

        original = Service.__dict__["retrieve_data_for_inference"].__func__
    except (ImportError, KeyError, AttributeError):
        logger.warning("duplicate multipart fields cannot be detected: ts.service.Service."
                       "retrieve_data_for_inference not found in this TorchServe")
        return False

    def retrieve_data_for_inference(batch):
        headers, input_batch, req_id_map = original(batch)
        for i, request in enumerate(batch or []):
            names = Counter(p.get("name") for p in request.get("parameters") or [])
            dups = sorted(str(n) for n, c in names.items() if c > 1)
            if dups and i < len(headers):
                props = headers[i].get_request_properties()  # the dict behind get_all_request_header
                if isinstance(props, dict):
                    props[DUPLICATES_KEY] = dups
        return headers, input_batch, req_id_map

    Service.retrieve_data_for_inference = staticmethod(retrieve_data_for_inference)
    _installed = True
    return True


def check_response_timeout(model_yaml: Optional[Mapping[str, Any]], max_request_seconds: int) -> Optional[int]:
    """responseTimeout of the archive (seconds) after checking that it exceeds the handler's budget;
    None when the archive does not set it (TorchServe's default_response_timeout applies, which
    the worker cannot see)."""
    rt = (model_yaml or {}).get("responseTimeout")
    if rt is None:
        logger.warning("model-config.yaml sets no responseTimeout: the handler cannot check that "
                       "limits.max_request_seconds=%d fits TorchServe's default_response_timeout",
                       max_request_seconds)
        return None
    if isinstance(rt, bool) or not isinstance(rt, int) or rt <= 0:
        raise ValueError(f"model-config.yaml responseTimeout: {rt!r} is invalid, expected seconds > 0")
    need = int(max_request_seconds * RESPONSE_TIMEOUT_MARGIN + 0.999)
    if rt < need:
        raise ValueError(
            f"model-config.yaml responseTimeout={rt} s is too short for handler.limits.max_request_seconds="
            f"{max_request_seconds} s (allowed: responseTimeout >= {need} s, the budget plus "
            f"{RESPONSE_TIMEOUT_MARGIN - 1:.0%}): an accepted explanation could outlive it, and TorchServe "
            "then kills the worker and answers 500 'Worker died.'; raise responseTimeout or lower "
            "max_request_seconds (and max_positions)")
    return rt


class WorkBudget:
    """Estimated seconds of an explanation = positions x seconds per position for its method.

    Seeded at load from a timed full forward pass (naive: one image per position; incremental:
    that divided by the default options' theoretical speedup); the first finished explanation of a
    method replaces its seed, later ones keep a running mean. A load-time measure is pessimistic
    when several workers start at once, so before refusing, ``remeasure`` (a fresh timed forward
    pass) may lower the seeds. The budget is shared by the explanations of one TorchServe batch:
    responseTimeout counts per batch.
    """

    def __init__(self, max_seconds: float, response_timeout: Optional[int]):
        self.max_seconds = float(max_seconds)
        self.response_timeout = response_timeout
        self.rate = {"naive": None, "incremental": None}  # seconds per position
        self.measured = {"naive": False, "incremental": False}
        self.speedup = 1.0
        self.remeasure = None  # () -> seconds per image, or None
        self._batch = None
        self._spent = 0.0

    def seed(self, seconds_per_image: float, speedup: float) -> None:
        self.speedup = max(1.0, float(speedup))
        for method, rate in (("naive", seconds_per_image), ("incremental", seconds_per_image / self.speedup)):
            if not self.measured[method]:
                old = self.rate[method]
                self.rate[method] = rate if old is None else min(old, rate)

    def estimate(self, positions: int, method: str) -> Optional[float]:
        r = self.rate.get(method)
        return None if r is None else positions * r

    def check(self, context, positions: int, method: str) -> None:
        """Raise a 503 RequestError before the work when it would not fit the remaining budget."""
        batch = tuple(sorted((getattr(context, "request_ids", None) or {}).values()))
        if batch != self._batch:
            self._batch, self._spent = batch, 0.0
        est = self.estimate(positions, method)
        if est is None:
            return
        left = self.max_seconds - self._spent
        if est > left and self.remeasure is not None and not self.measured[method]:
            try:
                self.seed(self.remeasure(), self.speedup)
            except Exception:
                logger.debug("re-measuring the forward time failed", exc_info=True)
            est = self.estimate(positions, method)
        if est > left:
            rt = f", TorchServe responseTimeout={self.response_timeout} s" if self.response_timeout else ""
            shared = f" ({left:.0f} s left in this TorchServe batch)" if left < self.max_seconds else ""
            raise RequestError(
                f"explanation refused before starting: {positions} positions with method={method} are "
                f"estimated at {est:.0f} s ({self.rate[method] * 1e3:.1f} ms per position measured on this "
                f"worker), over the time budget limits.max_request_seconds={self.max_seconds:.0f} s{shared}"
                f"{rt}; use a larger stride (fewer positions) or method=incremental",
                status=503, parameter="stride")
        self._spent += est

    def record(self, positions: int, method: str, seconds: float) -> None:
        if positions <= 0 or seconds <= 0 or method not in self.rate:
            return
        observed = seconds / positions
        old = self.rate[method]
        self.rate[method] = observed if old is None or not self.measured[method] else 0.5 * (old + observed)
        self.measured[method] = True


def time_forward(model, shape, device, repeats: int = 2) -> float:
    """Seconds per image of a plain forward pass at ``shape`` (batch first), best of ``repeats``."""
    import torch

    x = torch.zeros(*shape, device=device)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    return best / shape[0]
