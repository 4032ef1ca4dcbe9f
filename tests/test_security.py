"""Unit tests of the input bounds and guards of issue 10 (no server): krypton.preprocess bounds,
handler limits (pixels after decode and resize, aspect ratio, min side, JSON depth, option length,
bounded echo, KServe v2 datatype/shape, duplicate multipart fields), the responseTimeout check and
the time budget. The same cases through a real TorchServe are in tests/test_server.py."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from krypton.torchserve import guard as obe_guard  # noqa: E402
from krypton.torchserve import request as rq  # noqa: E402
from krypton import preprocess as kp  # noqa: E402
from server_utils import image_bytes  # noqa: E402

SETTINGS = rq.settings_from_config({"preprocess": {"resize": 256, "crop": 224}})


def err(fn, *a, **kw) -> rq.RequestError:
    with pytest.raises(rq.RequestError) as ei:
        fn(*a, **kw)
    return ei.value


# ------------------------------------------------------------------------- one preprocessing
def test_one_preprocessing_matches_torchvision_arithmetic():
    """Resize(int) truncates the long side; CenterCrop rounds the offset (Inception: 342 -> 299)."""
    assert kp.resized_size(400, 300, 256) == (341, 256) == rq.resized_size(400, 300, 256)
    assert kp.center_crop_box(456, 342, 299) == (int(round(157 / 2.0)), 22, int(round(157 / 2.0)) + 299, 321)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(300, 451, 3), dtype=np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    x, view = kp.preprocess_array(arr, 342, 299, mean, std)
    # the handler, the tuning scripts and the benchmark all give this tensor
    xh, vh = rq.preprocess(Image.fromarray(arr), rq.Preprocess(342, 299, mean, std))
    from bench.images import preprocess as bench_pre
    from krypton.tuning import preprocess as tuning_pre

    assert torch.equal(x, xh) and np.array_equal(view, vh)
    assert torch.equal(bench_pre(arr, 342, 299, mean, std)[0], x)
    assert torch.equal(tuning_pre(arr, 342, 299, mean, std), x)
    # by hand: PIL bilinear resize, torchvision's rounded crop offsets
    im = Image.fromarray(arr).resize(kp.resized_size(451, 300, 342), Image.BILINEAR)
    left, top = int(round((im.width - 299) / 2.0)), int(round((im.height - 299) / 2.0))
    ref = np.asarray(im)[top:top + 299, left:left + 299]
    assert np.array_equal(view, ref)


# ------------------------------------------------------------------------- image bounds
@pytest.mark.parametrize("size,limit,status", [
    ((60000, 10), "max_aspect_ratio", 413),
    ((4_000_000, 10), "max_aspect_ratio", 413),
    ((1, 1), "min_image_side", 400),
    ((31, 200), "min_image_side", 400),
])
def test_thin_and_tiny_images_refused_before_resizing(size, limit, status):
    w, h = size
    t0 = time.perf_counter()
    e = err(rq.preprocess, _LazySize(w, h), rq.Preprocess(256, 224), rq.Limits())
    assert e.status == status and limit in e.message and f"{w}x{h}" in e.message and e.parameter == "data"
    assert time.perf_counter() - t0 < 0.1


class _LazySize:
    """Only the size of an image: proves that the bound is checked before any pixel is touched."""

    mode = "RGB"

    def __init__(self, w, h):
        self.width, self.height, self.size = w, h, (w, h)

    def resize(self, *a, **k):
        raise AssertionError("resized before the bounds were checked")


def test_resized_pixels_bound():
    lim = rq.Limits(max_aspect_ratio=100.0, max_resized_pixels=1_000_000)
    e = err(rq.preprocess, _LazySize(4000, 200), rq.Preprocess(256, 224), lim)
    assert e.status == 413 and "max_resized_pixels=1000000" in e.message and "5120x256" in e.message
    # no resize step: the whole image is the model input, still bounded
    e = err(rq.preprocess, _LazySize(3000, 2000), rq.Preprocess(None, None), rq.Limits())
    assert "max_resized_pixels" in e.message
    x, _ = rq.preprocess(Image.new("RGB", (60, 50)), rq.Preprocess(40, 32), rq.Limits())
    assert x.shape == (3, 32, 32)


def test_pixels_checked_after_decode_too():
    data = image_bytes(64, 48, "PNG")
    e = err(rq.decode_image, data, rq.Limits(max_image_pixels=64 * 48 - 1))
    assert e.status == 413 and "max_image_pixels" in e.message
    gif = image_bytes(50, 40, "GIF")
    assert rq.decode_image(gif, rq.Limits(max_image_pixels=2000)).size == (50, 40)


# ------------------------------------------------------------------------- JSON, options, echo
def test_json_depth_bounded_both_paths():
    deep = "[" * 50_000 + "]" * 50_000
    t0 = time.perf_counter()
    e = err(rq.extract, {"body": bytearray(deep.encode())}, {"Content-Type": "application/json"})
    assert "max_json_depth=16" in e.message and e.parameter == "body"
    nested = {"data": "x", "fill": 0}
    for _ in range(40):
        nested = {"data": "x", "drilldown": nested}
    e = err(rq.extract, {"body": nested}, {})
    assert "max_json_depth" in e.message
    assert time.perf_counter() - t0 < 1.0
    assert not rq.json_depth_exceeds({"inputs": [{"data": ["x"], "parameters": {"a": 1}}]}, 4)
    assert rq.json_depth_exceeds([[[[[1]]]]], 4)


def test_huge_option_values_and_names_are_not_echoed():
    big = b"7" * (11 * 2**20)
    t0 = time.perf_counter()
    e = err(rq.parse_options, {"stride": big}, SETTINGS, 10)
    assert e.parameter == "stride" and "max_option_bytes=1024" in e.message and len(e.message) < 400
    e = err(rq.parse_options, {"x" * 100_000: "1"}, SETTINGS, 10)
    assert "unknown option" in e.message and len(e.message) < 400 and len(e.parameter) <= 35
    e = err(rq.parse_options, {"stride": "z" * 1000}, SETTINGS, 10)
    assert "'zzzz" in e.message and "... (1000 chars)" in e.message and len(e.message) < 300
    e = err(rq.extract, {f"field{i}": b"1" for i in range(1000)}, {})
    assert "(1000 in all)" in e.message and len(e.message) < 800
    assert time.perf_counter() - t0 < 1.0
    assert rq.clip(b"a" * 100) == repr(b"a" * 64) + "... (100 bytes)"
    assert len(rq.clip(list(range(10**6)))) < 200


def test_kserve_v2_datatype_and_shape():
    def v2(**tensor):
        t = {"name": "data", "shape": [1], "datatype": "BYTES", "data": ["aGVsbG8="]}
        t.update(tensor)
        return {"body": {"inputs": [{k: v for k, v in t.items() if v is not None}]}}

    image, _, kind = rq.extract(v2(), {})
    assert image == b"hello" and kind == "kserve-v2"
    for bad, param, needle in [(dict(datatype="FP32"), "inputs[0].datatype", "allowed: BYTES"),
                               (dict(shape=[1, 3, 224, 224]), "inputs[0].shape", "allowed: [1]"),
                               (dict(shape=None), "inputs[0].shape", "no 'shape'"),
                               (dict(datatype=None), "inputs[0].datatype", "no 'datatype'"),
                               (dict(data=["aGk=", "aGk="]), "inputs[0].data", "shape [1]"),
                               (dict(colour="red"), "inputs", "unknown key")]:
        e = err(rq.extract, v2(**bad), {})
        assert e.parameter == param and needle in e.message, (bad, e.message)


def test_duplicate_multipart_fields_recorded_and_refused():
    """obe_guard wraps TorchServe's folding of the parts; extract refuses what it recorded."""
    from ts.service import Service

    assert obe_guard.watch_duplicate_parts()
    batch = [{"requestId": b"r1", "headers": [{"name": b"Content-Type", "value": b"multipart/form-data"}],
              "parameters": [{"name": "data", "contentType": "image/jpeg", "value": b"FIRST"},
                             {"name": "data", "contentType": "image/jpeg", "value": b"SECOND"},
                             {"name": "stride", "contentType": "", "value": b"4"}]},
             {"requestId": b"r2", "headers": [],
              "parameters": [{"name": "data", "contentType": "image/jpeg", "value": b"ONE"}]}]
    procs, inputs, _ = Service.retrieve_data_for_inference(batch)
    headers = [p.get_request_properties() for p in procs]
    assert headers[0][rq.DUPLICATES_KEY] == ["data"] and rq.DUPLICATES_KEY not in headers[1]
    e = err(rq.extract, inputs[0], headers[0])
    assert e.parameter == "data" and "sent more than once" in e.message
    assert rq.extract(inputs[1], headers[1])[0] == b"ONE"


def test_new_limits_validated_at_load():
    s = rq.settings_from_config({"limits": {"max_aspect_ratio": 4, "min_image_side": 64, "max_json_depth": 8,
                                            "max_option_bytes": 256, "max_resized_pixels": 10**6,
                                            "max_request_seconds": 60}})
    assert (s.limits.max_aspect_ratio, s.limits.min_image_side, s.limits.max_json_depth) == (4.0, 64, 8)
    for key, bad in [("max_aspect_ratio", 0.5), ("max_aspect_ratio", "wide"), ("min_image_side", 0),
                     ("max_json_depth", 2), ("max_option_bytes", -1), ("max_request_seconds", 0)]:
        with pytest.raises(ValueError, match=f"limits.{key}"):
            rq.settings_from_config({"limits": {key: bad}})


# ------------------------------------------------------------------------- time
def test_response_timeout_too_short_is_a_load_error():
    with pytest.raises(ValueError, match=r"responseTimeout=60 s is too short.*max_request_seconds=600"):
        obe_guard.check_response_timeout({"responseTimeout": 60}, 600)
    assert obe_guard.check_response_timeout({"responseTimeout": 900}, 600) == 900
    assert obe_guard.check_response_timeout({}, 600) is None


class _Ctx:
    def __init__(self, ids):
        self.request_ids = ids


def test_work_budget_refuses_before_starting():
    b = obe_guard.WorkBudget(10, 900)
    b.seed(0.01, 2.0)  # 10 ms per naive position, 5 ms incremental
    b.check(_Ctx({0: "a"}), 1500, "incremental")            # 7.5 s
    with pytest.raises(rq.RequestError) as ei:
        b.check(_Ctx({0: "b"}), 1500, "naive")              # 15 s
    e = ei.value
    assert e.status == 503 and "max_request_seconds=10" in e.message and "estimated at 15 s" in e.message
    # one TorchServe batch shares the budget
    ctx = _Ctx({0: "c", 1: "d"})
    b.check(ctx, 1500, "incremental")
    with pytest.raises(rq.RequestError, match="left in this TorchServe batch"):
        b.check(ctx, 1500, "incremental")
    b.record(1000, "naive", 2.0)  # measured 2 ms: the estimate follows
    b.check(_Ctx({0: "e"}), 1500, "naive")


def test_work_budget_remeasures_a_pessimistic_seed():
    """Seeds measured while four workers start at once are pessimistic: one fresh measure first."""
    b = obe_guard.WorkBudget(10, 900)
    b.seed(1.0, 2.0)                      # 0.5 s per incremental position: 1500 -> 750 s
    b.remeasure = lambda: 0.01            # quiet machine now
    b.check(_Ctx({0: "a"}), 1500, "incremental")
    assert b.rate["incremental"] == pytest.approx(0.005)
    b.record(1500, "incremental", 30.0)   # measured wins over any seed
    assert b.rate["incremental"] == pytest.approx(0.02) and b.measured["incremental"]
    with pytest.raises(rq.RequestError):
        b.check(_Ctx({0: "b"}), 1500, "incremental")
