"""krypton::stitch: compiled op vs the pure-torch reference vs a slow, obviously correct loop."""
import math
import random

import pytest
import torch

from krypton import ops

COMPILED = ops.compiled_available()
needs_compiled = pytest.mark.skipif(not COMPILED, reason=f"compiled op missing: {ops.load_error()}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HAS_CUDA_KERNEL = COMPILED and ops.backend() == "compiled-cpu+cuda"
# every dtype the engine runs: the model's (float32, float64 in the exactness tests) and the low precisions
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def slow_stitch(mat, patch, patch_origin, window_origin, wh, ww, pad):
    """The definition, one element at a time, in float64 (inputs are exactly representable)."""
    if mat.dim() == 4:
        mat = mat[0]
    mat = mat.detach().cpu().double()
    patch = patch.detach().cpu().double()
    po = patch_origin.cpu().tolist()
    wo = window_origin.cpu().tolist()
    C, H, W = mat.shape
    B, _, ph, pw = patch.shape
    out = torch.empty(B, C, wh, ww, dtype=torch.float64)
    m = mat.tolist()
    p = patch.tolist()
    for b in range(B):
        for c in range(C):
            for i in range(wh):
                for j in range(ww):
                    y, x = wo[b][0] + i, wo[b][1] + j
                    if not (0 <= y < H and 0 <= x < W):
                        v = pad
                    elif po[b][0] <= y < po[b][0] + ph and po[b][1] <= x < po[b][1] + pw:
                        v = p[b][c][y - po[b][0]][x - po[b][1]]
                    else:
                        v = m[c][y][x]
                    out[b, c, i, j] = v
    return out


def compiled(mat, patch, po, wo, wh, ww, pad):
    return torch.ops.krypton.stitch(mat, patch, po, wo, wh, ww, pad)


def make_case(C, H, W, B, ph, pw, wh, ww, dtype, device="cpu", seed=0, spread=None):
    """Random origins spread so that windows and patches fall in, across and outside every border."""
    g = torch.Generator().manual_seed(seed)
    # integer-valued data, rounded to the dtype once (bf16 keeps 8 significant bits) and only copied after
    # that; materialized values are >= 0 and patch values < 0, so distinct sources are distinguishable
    mat = torch.randint(0, 1000, (C, H, W), generator=g).to(dtype)
    patch = -torch.randint(1, 1000, (B, C, ph, pw), generator=g).to(dtype)
    s = spread if spread is not None else max(H, W, wh, ww) + 3
    wo = torch.stack(
        [torch.randint(-wh - 2, H + 2, (B,), generator=g), torch.randint(-ww - 2, W + 2, (B,), generator=g)], 1
    )
    # patches mostly near their window so that they overlap it, sometimes far away
    po = wo + torch.randint(-max(ph, 1) - 1, max(wh, ww) + 1, (B, 2), generator=g)
    far = torch.rand(B, generator=g) < 0.1
    po[far] = torch.randint(-s, s, (int(far.sum()), 2), generator=g)
    return mat.to(device), patch.to(device), po.to(device), wo.to(device)


def assert_same(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype or b.dtype == torch.float64
    # equal as float64 with inf==inf; no tolerance: the op only copies values
    torch.testing.assert_close(a.detach().cpu().double(), b.detach().cpu().double(), rtol=0, atol=0)


SHAPES = [
    # C, H, W, B, ph, pw, wh, ww
    (1, 1, 1, 1, 1, 1, 1, 1),
    (3, 7, 5, 1, 2, 3, 4, 6),
    (2, 5, 9, 17, 3, 1, 5, 5),
    (5, 11, 13, 33, 4, 5, 7, 3),
    (4, 6, 6, 9, 6, 6, 6, 6),  # patch as large as the tensor
    (3, 4, 5, 7, 2, 2, 9, 11),  # windows larger than the tensor
    (2, 8, 3, 5, 0, 3, 4, 4),  # empty patch (ph = 0)
    (2, 8, 3, 5, 3, 0, 4, 4),  # empty patch (pw = 0)
    (6, 9, 10, 64, 3, 4, 1, 1),  # 1x1 windows
    (17, 10, 12, 12, 5, 7, 6, 9),  # odd channel count
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("pad", [0.0, -math.inf])
def test_compiled_and_reference_match_slow(device, dtype, shape, pad):
    """Both implementations against the definition; the reference is checked even without the compiled op."""
    if device == "cuda" and not HAS_CUDA_KERNEL:
        pytest.skip("CUDA kernel not built")
    C, H, W, B, ph, pw, wh, ww = shape
    mat, patch, po, wo = make_case(C, H, W, B, ph, pw, wh, ww, dtype, device, seed=hash(shape) % 1000)
    want = slow_stitch(mat, patch, po, wo, wh, ww, pad)
    assert_same(ops.stitch_reference(mat, patch, po, wo, wh, ww, pad), want)
    if not COMPILED:
        pytest.skip(f"compiled op missing ({ops.load_error()}): only the reference was checked")
    got = compiled(mat, patch, po, wo, wh, ww, pad)
    assert got.dtype == dtype and got.device.type == device
    assert_same(got, want)


def _fixed_case(window_origins, patch_origins, C=2, H=6, W=7, ph=3, pw=2, wh=4, ww=5):
    mat = torch.arange(C * H * W, dtype=torch.float64).reshape(C, H, W)
    B = len(window_origins)
    patch = -1.0 - torch.arange(B * C * ph * pw, dtype=torch.float64).reshape(B, C, ph, pw)
    return mat, patch, torch.tensor(patch_origins), torch.tensor(window_origins), wh, ww


@needs_compiled
@pytest.mark.parametrize(
    "wo",
    [
        (-4, 0), (6, 0), (0, -5), (0, 7), (-10, -10), (20, 20),  # fully outside, every side
        (-2, 2), (4, 2), (2, -3), (2, 5), (-1, -1), (5, 6),  # partially outside, every side/corner
        (0, 0), (2, 2),  # inside
    ],
)
@pytest.mark.parametrize("po_delta", [(0, 0), (-2, -1), (3, 4), (1, -1), (-5, -5), (100, 100)])
def test_borders_every_side(wo, po_delta):
    po = (wo[0] + po_delta[0], wo[1] + po_delta[1])
    mat, patch, po_t, wo_t, wh, ww = _fixed_case([wo], [po])
    for pad in (0.0, -math.inf, 3.5):
        want = slow_stitch(mat, patch, po_t, wo_t, wh, ww, pad)
        assert_same(compiled(mat, patch, po_t, wo_t, wh, ww, pad), want)
        assert_same(ops.stitch_reference(mat, patch, po_t, wo_t, wh, ww, pad), want)


@needs_compiled
def test_window_larger_than_tensor_on_all_sides():
    mat, patch, po, wo, _, _ = _fixed_case([(-3, -4), (-1, -2)], [(-1, -1), (4, 5)])
    want = slow_stitch(mat, patch, po, wo, 12, 15, -math.inf)
    assert_same(compiled(mat, patch, po, wo, 12, 15, -math.inf), want)
    assert torch.isinf(want).any() and (want >= 0).any() and ((want < 0) & torch.isfinite(want)).any()


def _noncontig(t, kind):
    if kind == "contiguous":
        return t.contiguous()
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    if kind == "strided":  # every dimension strided (a slice of a bigger tensor)
        big = torch.zeros([2 * s + 1 for s in t.shape], dtype=t.dtype, device=t.device)
        view = big[tuple(slice(1, None, 2) for _ in t.shape)]
        view.copy_(t)
        return view
    if kind == "transposed":  # H and W swapped in memory
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise AssertionError(kind)


LAYOUTS = ["contiguous", "channels_last", "strided", "transposed"]


@needs_compiled
@pytest.mark.parametrize("mat_layout", LAYOUTS)
@pytest.mark.parametrize("patch_layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_any_strides(mat_layout, patch_layout, dtype):
    C, H, W, B, ph, pw, wh, ww = 5, 9, 8, 11, 3, 4, 5, 6
    mat, patch, po, wo = make_case(C, H, W, B, ph, pw, wh, ww, dtype, seed=3)
    want = slow_stitch(mat, patch, po, wo, wh, ww, -math.inf)
    m2, p2 = _noncontig(mat, mat_layout), _noncontig(patch, patch_layout)
    got = compiled(m2, p2, po, wo, wh, ww, -math.inf)
    assert got.dtype == dtype
    assert_same(got, want)
    assert_same(ops.stitch_reference(m2, p2, po, wo, wh, ww, -math.inf), want)


@needs_compiled
def test_materialized_with_batch_dim_and_non_contiguous_origins():
    C, H, W, B, ph, pw, wh, ww = 3, 7, 7, 6, 2, 2, 4, 4
    mat, patch, po, wo = make_case(C, H, W, B, ph, pw, wh, ww, torch.float64, seed=5)
    want = slow_stitch(mat, patch, po, wo, wh, ww, 0.0)
    po_nc = po.t().contiguous().t()  # [B,2] with strides (1, B)
    assert not po_nc.is_contiguous()
    assert_same(compiled(mat[None], patch, po_nc, wo, wh, ww, 0.0), want)
    assert_same(ops.stitch_reference(mat[None], patch, po_nc, wo, wh, ww, 0.0), want)


@needs_compiled
def test_output_memory_format_follows_patch():
    C, H, W, B, ph, pw, wh, ww = 4, 9, 10, 5, 3, 3, 5, 6
    mat, patch, po, wo = make_case(C, H, W, B, ph, pw, wh, ww, torch.float32, seed=2)
    out = compiled(mat, patch, po, wo, wh, ww, 0.0)
    assert out.is_contiguous()
    cl = patch.contiguous(memory_format=torch.channels_last)
    out = compiled(mat, cl, po, wo, wh, ww, 0.0)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    # the wrapper and the reference follow the same rule
    assert ops.stitch(mat, cl, po, wo, wh, ww).stride() == out.stride()
    assert ops.stitch_reference(mat, cl, po, wo, wh, ww).stride() == out.stride()
    # B = 0 -> empty, contiguous
    e = compiled(mat, patch[:0].contiguous(memory_format=torch.channels_last), po[:0], wo[:0], wh, ww, 0.0)
    assert e.shape == (0, C, wh, ww)


@needs_compiled
def test_zero_sizes():
    mat = torch.rand(3, 5, 5)
    po = torch.zeros(2, 2, dtype=torch.long)
    wo = torch.zeros(2, 2, dtype=torch.long)
    for wh, ww in ((0, 4), (4, 0), (0, 0)):
        assert compiled(mat, torch.rand(2, 3, 2, 2), po, wo, wh, ww, 0.0).shape == (2, 3, wh, ww)
        assert ops.stitch_reference(mat, torch.rand(2, 3, 2, 2), po, wo, wh, ww).shape == (2, 3, wh, ww)
    out = compiled(mat, torch.rand(0, 3, 2, 2), po[:0], wo[:0], 3, 3, 0.0)
    assert out.shape == (0, 3, 3, 3)
    # C = 0
    assert compiled(torch.rand(0, 5, 5), torch.rand(2, 0, 2, 2), po, wo, 3, 3, 0.0).shape == (2, 0, 3, 3)
    # H = W = 0: everything is padding
    got = compiled(torch.rand(3, 0, 0), torch.rand(2, 3, 2, 2), po, wo, 3, 3, -1.0)
    assert (got == -1).all()
    assert (ops.stitch_reference(torch.rand(3, 0, 0), torch.rand(2, 3, 2, 2), po, wo, 3, 3, -1.0) == -1).all()


def test_force_reference_env(monkeypatch):
    C, H, W, B, ph, pw, wh, ww = 3, 8, 8, 4, 2, 2, 4, 4
    mat, patch, po, wo = make_case(C, H, W, B, ph, pw, wh, ww, torch.float64, seed=4)
    monkeypatch.setenv("KRYPTON_FORCE_REFERENCE", "1")
    assert ops.backend() == "reference"
    assert_same(ops.stitch(mat, patch, po, wo, wh, ww, -math.inf), slow_stitch(mat, patch, po, wo, wh, ww, -math.inf))
    assert_same(ops.stitch(mat, patch, po, wo, wh, ww, 0.0), slow_stitch(mat, patch, po, wo, wh, ww, 0.0))
    monkeypatch.delenv("KRYPTON_FORCE_REFERENCE")
    assert ops.backend() == ("reference" if not COMPILED else ops.backend())


@needs_compiled
def test_not_differentiable_no_grad_fn():
    mat = torch.rand(3, 5, 5, requires_grad=True)
    z = torch.zeros(2, 2, dtype=torch.long)
    out = torch.ops.krypton.stitch(mat, torch.rand(2, 3, 2, 2, requires_grad=True), z, z, 3, 3, 0.0)
    assert not out.requires_grad and out.grad_fn is None


@needs_compiled
def test_backend_reports_compiled():
    assert ops.backend() in ("compiled-cpu", "compiled-cpu+cuda")
    assert ops.load_error() is None


@needs_compiled
@pytest.mark.parametrize(
    "args, match",
    [
        (dict(mat=torch.rand(5, 5)), "materialized must be"),
        (dict(mat=torch.rand(2, 3, 5, 5)), "materialized must be"),
        (dict(patch=torch.rand(2, 3, 2)), "patch must be"),
        (dict(patch=torch.rand(2, 4, 2, 2)), "channels"),
        (dict(patch=torch.rand(2, 3, 2, 2, dtype=torch.float64)), "dtype"),
        (dict(mat=torch.randint(0, 3, (3, 5, 5)), patch=torch.randint(0, 3, (2, 3, 2, 2))), "floating"),
        (dict(po=torch.zeros(2, 2, dtype=torch.int32)), "patch_origin must be int64"),
        (dict(wo=torch.zeros(2, 2)), "window_origin must be int64"),
        (dict(po=torch.zeros(3, 2, dtype=torch.long)), r"patch_origin must have shape \[B,2\]"),
        (dict(wo=torch.zeros(2, 3, dtype=torch.long)), r"window_origin must have shape \[B,2\]"),
        (dict(wo=torch.zeros(2, dtype=torch.long)), r"window_origin must have shape \[B,2\]"),
        (dict(wh=-1), "window_h and window_w must be >= 0"),
    ],
)
def test_error_messages(args, match):
    a = dict(
        mat=torch.rand(3, 5, 5), patch=torch.rand(2, 3, 2, 2), po=torch.zeros(2, 2, dtype=torch.long),
        wo=torch.zeros(2, 2, dtype=torch.long), wh=3, ww=3,
    )
    a.update(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.krypton.stitch(a["mat"], a["patch"], a["po"], a["wo"], a["wh"], a["ww"], 0.0)
    with pytest.raises(ValueError, match=match):
        ops.stitch_reference(a["mat"], a["patch"], a["po"], a["wo"], a["wh"], a["ww"], 0.0)


@needs_compiled
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_mismatch_is_rejected():
    mat = torch.rand(3, 5, 5, device="cuda")
    z = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(RuntimeError, match="origin"):
        torch.ops.krypton.stitch(mat, torch.rand(2, 3, 2, 2, device="cuda"), z, z.cuda(), 3, 3, 0.0)
    with pytest.raises(RuntimeError, match="patch is on"):
        torch.ops.krypton.stitch(mat, torch.rand(2, 3, 2, 2), z.cuda(), z.cuda(), 3, 3, 0.0)


@needs_compiled
def test_opcheck_schema_and_fake():
    C, H, W, B, ph, pw, wh, ww = 3, 8, 8, 4, 2, 3, 4, 5
    mat, patch, po, wo = make_case(C, H, W, B, ph, pw, wh, ww, torch.float32, seed=1)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.krypton.stitch.default, (mat, patch, po, wo, wh, ww, 0.0), test_utils=tests)
    torch.library.opcheck(
        torch.ops.krypton.stitch.default,
        (mat, patch.contiguous(memory_format=torch.channels_last), po, wo, wh, ww, -math.inf),
        test_utils=tests,
    )


@needs_compiled
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (4, 1, 5, 6), (4, 3, 1, 1), (1, 3, 5, 6), (4, 3, 0, 5)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_fake_strides_match_real(shape, layout):
    from torch._subclasses.fake_tensor import FakeTensorMode

    B, C, ph, pw = shape
    mat = torch.rand(C, 9, 9)
    patch = _noncontig(torch.rand(shape), layout)
    po = torch.zeros(B, 2, dtype=torch.long)
    real = torch.ops.krypton.stitch(mat, patch, po, po, 4, 4, 0.0)
    with FakeTensorMode() as mode:
        fm, fp, fpo = mode.from_tensor(mat), mode.from_tensor(patch), mode.from_tensor(po)
        fake = torch.ops.krypton.stitch(fm, fp, fpo, fpo, 4, 4, 0.0)
    assert fake.shape == real.shape and fake.stride() == real.stride()


@needs_compiled
def test_torch_compile_sees_the_op():
    C, H, W, B, ph, pw, wh, ww = 3, 8, 8, 4, 2, 3, 4, 5
    mat, patch, po, wo = make_case(C, H, W, B, ph, pw, wh, ww, torch.float32, seed=6)

    def f(m, p, a, b):
        return torch.ops.krypton.stitch(m, p, a, b, wh, ww, 0.0) * 2

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(mat, patch, po, wo)
    assert_same(got, slow_stitch(mat, patch, po, wo, wh, ww, 0.0) * 2)


@needs_compiled
@pytest.mark.parametrize("threads", [1, 2])
def test_large_random_batches_match_reference(threads):
    """VGG-ish shapes through both kernels paths, compared with the (independent) reference."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng = random.Random(threads)
        for trial in range(6):
            C, H, W = rng.choice([16, 64]), rng.randint(20, 60), rng.randint(20, 60)
            B, ph, pw = rng.choice([1, 64, 130]), rng.randint(0, 12), rng.randint(1, 12)
            wh, ww = rng.randint(1, 30), rng.randint(1, 30)
            mat, patch, po, wo = make_case(C, H, W, B, ph, pw, wh, ww, torch.float32, seed=trial)
            for layout in ("contiguous", "channels_last"):
                p = _noncontig(patch, layout)
                m = _noncontig(mat, layout)
                assert_same(compiled(m, p, po, wo, wh, ww, -math.inf), ops.stitch_reference(mat, patch, po, wo, wh, ww, -math.inf))
    finally:
        torch.set_num_threads(prev)


@pytest.mark.skipif(not HAS_CUDA_KERNEL or not torch.cuda.is_available(), reason="CUDA kernel not built / no GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_cuda_matches_cpu(dtype, layout):
    C, H, W, B, ph, pw, wh, ww = 16, 31, 29, 70, 7, 5, 12, 13
    mat, patch, po, wo = make_case(C, H, W, B, ph, pw, wh, ww, dtype, seed=12)
    want = compiled(mat, patch, po, wo, wh, ww, -math.inf)
    m, p = _noncontig(mat.cuda(), layout), _noncontig(patch.cuda(), layout)
    got = compiled(m, p, po.cuda(), wo.cuda(), wh, ww, -math.inf)
    assert got.is_cuda
    assert_same(got, want)
