"""Pure geometry: eq. 13-16 windows, borders (eq. 31), bounding boxes (eq. 20) and the tau cap (eq. 22-27).

No tensors and no model: every expectation is worked out by hand from the formulas in
shared/design/method.md §2 and §4, or checked by brute force over the cells a window can reach.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from krypton import geometry as geo


def rect(origins, size, extent):
    return geo.Rect1D(np.asarray(origins, dtype=np.int64), size, extent)


def ceil_div(a, b):
    return -((-a) // b)


# ---- exact windows (tau = 1) ------------------------------------------------------------------------------
def test_conv3x3_same_padding_by_hand():
    # x^I = 10, W^I = 4, K = 3, s = 1, p = 1 on a 32-wide map: x^O = ceil((1 + 10 - 3 + 1) / 1) = 9,
    # W^O = W^I + K - 1 = 6, x^R = x^O * s - p = 8, W^R = K + (W^O - 1) * s = 8.
    w = geo.sliding_window(rect([10], 4, 32), 32, kernel=3, stride=1, pad_before=1)
    assert (w.out.origin.tolist(), w.out.size, w.read_origin.tolist(), w.read_size) == ([9], 6, [8], 8)


def test_strided_conv_by_hand():
    # K = 3, s = 2, p = 1, input 32 -> output 16; x^I = 10, W^I = 4 -> outputs 5..7 (3 cells).
    w = geo.sliding_window(rect([10], 4, 32), 16, kernel=3, stride=2, pad_before=1)
    assert (w.out.origin.tolist(), w.out.size, w.read_origin.tolist(), w.read_size) == ([5], 3, [9], 7)


def test_border_positions_shift_inside_the_map():
    # x^I = 0: outputs 0..4 (eq. 13 gives -1, clipped); x^I = 28: outputs 27..31. With an interior
    # position (x^I = 10: 9..14, 6 cells) the shared size is 6 and both border rects shift inside (eq. 31).
    w = geo.sliding_window(rect([0, 28], 4, 32), 32, kernel=3, stride=1, pad_before=1)
    assert (w.out.origin.tolist(), w.out.size) == ([0, 27], 5)
    w = geo.sliding_window(rect([0, 10, 28], 4, 32), 32, kernel=3, stride=1, pad_before=1)
    assert (w.out.origin.tolist(), w.out.size) == ([0, 9, 26], 6)
    assert w.read_origin.tolist() == [-1, 8, 25]


def brute_force_changed(x, width, extent_out, kernel, stride, pad, dilation=1):
    """Output cells whose receptive field intersects the input cells [x, x + width)."""
    cells = []
    for o in range(extent_out):
        taps = [o * stride - pad + k * dilation for k in range(kernel)]
        if any(x <= t < x + width for t in taps):
            cells.append(o)
    return cells


@pytest.mark.parametrize("kernel, stride, pad, dilation", [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 1, 1), (5, 3, 2, 1),
                                                           (7, 2, 3, 1), (3, 1, 2, 2), (2, 2, 0, 1)])
def test_exact_window_covers_every_changed_output_cell(kernel, stride, pad, dilation):
    extent_in = 23
    ke = geo.effective_kernel(kernel, dilation)
    extent_out = (extent_in + 2 * pad - ke) // stride + 1
    for width in (1, 3, 6):
        xs = np.arange(0, extent_in - width + 1)
        w = geo.sliding_window(rect(xs, width, extent_in), extent_out, kernel, stride, pad, dilation)
        assert w.read_size == (w.out.size - 1) * stride + ke
        assert np.array_equal(w.read_origin, w.out.origin * stride - pad)
        for x, o in zip(xs, w.out.origin):
            changed = brute_force_changed(int(x), width, extent_out, kernel, stride, pad, dilation)
            assert all(o <= c < o + w.out.size for c in changed), (x, changed, o, w.out.size)
            assert 0 <= o and o + w.out.size <= extent_out


# ---- the tau cap (eq. 22-27) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tau, extent, expected", [(0.5, 10, 5), (0.5, 5, 3), (0.4, 7, 3), (0.3, 2, 1),
                                                   (0.01, 50, 1), (0.9, 7, 6), (0.7, 14, 10)])
def test_cap_is_round_tau_times_the_map(tau, extent, expected):
    assert geo.cap_size(extent, extent, tau) == expected  # round half up, at least one cell
    assert geo.cap_size(2, extent, tau) == min(2, expected)  # never larger than the exact window


def test_tau_one_is_the_exact_window():
    r = rect(np.arange(0, 20, 3), 5, 24)
    for args in [(24, 3, 1, 1), (12, 3, 2, 1), (8, 5, 3, 2)]:
        a = geo.sliding_window(r, *args)
        b = geo.sliding_window(r, *args, tau=1.0)
        assert np.array_equal(a.out.origin, b.out.origin) and a.out.size == b.out.size
        assert np.array_equal(a.read_origin, b.read_origin) and a.read_size == b.read_size


def test_shrink_and_centre_by_hand_stride1():
    # W_O = 20, K = 3, s = 1, p = 1; x^I = 8, W^I = 10 -> exact W^O = 12 > cap round(0.5 * 20) = 10.
    # W^I' = W^O * s - K + 1 = 8; x^I' = 8 + (10 - 8) / 2 = 9; x^O = ceil((1 + 9 - 3 + 1) / 1) = 8.
    w = geo.sliding_window(rect([8], 10, 20), 20, kernel=3, stride=1, pad_before=1, tau=0.5)
    assert (w.out.origin.tolist(), w.out.size) == ([8], 10)
    assert (w.read_origin.tolist(), w.read_size) == ([7], 12)


def test_shrink_and_centre_by_hand_stride2():
    # Input 40 -> output 20 (K = 3, s = 2, p = 1); x^I = 10, W^I = 16: exact outputs 5..13 (9 cells).
    # tau = 0.3: cap round(6.0) = 6; W^I' = 6 * 2 - 3 + 1 = 10; x^I' = 10 + (16 - 10) / 2 = 13;
    # x^O = ceil((1 + 13 - 3 + 1) / 2) = 6.
    exact = geo.sliding_window(rect([10], 16, 40), 20, kernel=3, stride=2, pad_before=1)
    assert (exact.out.origin.tolist(), exact.out.size) == ([5], 9)
    w = geo.sliding_window(rect([10], 16, 40), 20, kernel=3, stride=2, pad_before=1, tau=0.3)
    assert (w.out.origin.tolist(), w.out.size) == ([6], 6)
    assert (w.read_origin.tolist(), w.read_size) == ([11], 13)


def test_no_shrink_when_the_cap_is_not_reached():
    r = rect([8], 4, 32)
    exact = geo.sliding_window(r, 32, 3, 1, 1)
    capped = geo.sliding_window(r, 32, 3, 1, 1, tau=0.5)  # exact 6 <= cap 16
    assert (capped.out.size, capped.out.origin.tolist()) == (exact.out.size, exact.out.origin.tolist())


@pytest.mark.parametrize("kernel, stride, pad", [(3, 1, 1), (3, 2, 1), (5, 2, 2), (7, 2, 3), (1, 1, 0), (3, 3, 0)])
def test_capped_window_properties(kernel, stride, pad):
    extent_in = 41
    extent_out = (extent_in + 2 * pad - kernel) // stride + 1
    for width, tau in itertools.product((2, 7, 15, 30), (1.0, 0.9, 0.7, 0.5, 0.4, 0.2)):
        xs = np.arange(0, extent_in - width + 1, 2)
        exact = geo.sliding_window(rect(xs, width, extent_in), extent_out, kernel, stride, pad)
        w = geo.sliding_window(rect(xs, width, extent_in), extent_out, kernel, stride, pad, tau=tau)
        cap = max(1, math.floor(tau * extent_out + 0.5))
        assert w.out.size == min(exact.out.size, cap) if tau < 1 else exact.out.size
        assert w.read_size == (w.out.size - 1) * stride + kernel
        assert np.array_equal(w.read_origin, w.out.origin * stride - pad)
        assert w.out.origin.min() >= 0 and (w.out.origin + w.out.size).max() <= extent_out
        if w.out.size < exact.out.size:
            # The shrunk input keeps the centre (within one cell) and is W^O * s - K + 1 wide (a narrower
            # change stays as it is).
            w_cap = max(1, w.out.size * stride - kernel + 1)
            x_in = np.where(width > w_cap, xs + (width - w_cap) // 2, xs)
            w_in = min(width, w_cap)
            assert np.all(np.abs((x_in + w_in / 2) - (xs + width / 2)) <= 0.5)
            # Its exact output window (eq. 13) is what the capped rect starts at, shifted inside the map.
            lo = np.maximum(ceil_div(x_in + pad - kernel + 1, stride), 0)
            assert np.array_equal(w.out.origin, geo.shift_inside(lo, w.out.size, extent_out))
            # Every output cell the shrunk input reaches lies in the capped rect (when not cut by the border).
            for x, o in zip(x_in, w.out.origin):
                changed = brute_force_changed(int(x), w_in, extent_out, kernel, stride, pad)
                assert all(o <= c < o + w.out.size for c in changed[:w.out.size])


def test_smaller_tau_never_grows_a_window():
    r = rect(np.arange(0, 30, 4), 12, 40)
    sizes = [geo.sliding_window(r, 20, 5, 2, 2, tau=t).out.size for t in (1.0, 0.9, 0.7, 0.5, 0.4, 0.3)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0]


def test_shrink_centres_on_the_real_change_not_on_the_shifted_rect():
    # A right-border position: the shared rect [20, 32) (size 12) was shifted inside the map, but only
    # [28, 32) changed. K = 3, s = 1, p = 1, tau = 0.25: cap round(8) = 8 < exact size 13, W^I' = 6 >= 4,
    # so the change keeps its 4 cells and reaches outputs [27, 32); the rect of 8 shifts in to [24, 32).
    r = geo.Rect1D(np.array([20]), 12, 32, np.array([28]), np.array([32]))
    w = geo.sliding_window(r, 32, kernel=3, stride=1, pad_before=1, tau=0.25)
    assert (w.out.origin.tolist(), w.out.size, w.out.lo.tolist(), w.out.hi.tolist()) == ([24], 8, [27], [32])
    # Centring on the rect instead would keep [23, 29) of the input and lose the changed cells 30-31.
    plain = geo.sliding_window(rect([20], 12, 32), 32, kernel=3, stride=1, pad_before=1, tau=0.25)
    assert (plain.out.origin.tolist(), plain.out.size) == ([22], 8)


def test_exact_windows_ignore_the_change_ranges_and_propagate_them_exactly():
    xs = np.arange(0, 40 - 6 + 1, 3)
    r = rect(xs, 6, 40)
    w = geo.sliding_window(r, 20, kernel=3, stride=2, pad_before=1)
    again = geo.sliding_window(geo.Rect1D(xs, 6, 40, xs + 1, xs + 4), 20, kernel=3, stride=2, pad_before=1)
    assert np.array_equal(w.out.origin, again.out.origin) and w.out.size == again.out.size
    for x, lo, hi in zip(xs, w.out.lo, w.out.hi):
        assert list(range(lo, hi)) == brute_force_changed(int(x), 6, 20, 3, 2, 1)
    nxt = geo.sliding_window(w.out, 10, kernel=3, stride=2, pad_before=1)  # chains through a second layer
    assert np.all(nxt.out.lo >= nxt.out.origin) and np.all(nxt.out.hi <= nxt.out.origin + nxt.out.size)


# ---- bounding boxes at add / concat (eq. 20) -------------------------------------------------------------------
def test_bounding_box_shared_size_and_border_shift():
    box = geo.bounding_box([rect([2, 33], 4, 40), rect([10, 34], 4, 40)])
    # unions: [2, 14) (12 cells), [33, 38) (5 cells); shared size 12; the second shifts back to 40 - 12 = 28.
    assert (box.origin.tolist(), box.size) == ([2, 28], 12)


def test_bounding_box_respects_the_cap_and_keeps_the_centre():
    # Union [2, 14) of 12 cells on a 20-wide map; tau = 0.3 caps at round(6) = 6 around the centre: [5, 11).
    box = geo.bounding_box([rect([2], 4, 20), rect([10], 4, 20)], tau=0.3)
    assert (box.origin.tolist(), box.size) == ([5], 6)
    same = geo.bounding_box([rect([2], 4, 20), rect([10], 4, 20)], tau=0.7)  # cap 14 > 12: unchanged
    assert (same.origin.tolist(), same.size) == ([2], 12)


def test_capped_bounding_box_centres_on_the_union_of_the_changes():
    a = geo.Rect1D(np.array([0]), 10, 20, np.array([0]), np.array([3]))
    b = geo.Rect1D(np.array([10]), 10, 20, np.array([15]), np.array([20]))
    box = geo.bounding_box([a, b], tau=0.3)  # union of the rects 20 > cap 6; changes [0, 20) -> [7, 13)
    assert (box.origin.tolist(), box.size, box.lo.tolist(), box.hi.tolist()) == ([7], 6, [7], [13])
    b2 = geo.Rect1D(np.array([10]), 10, 20, np.array([12]), np.array([14]))
    box = geo.bounding_box([geo.Rect1D(np.array([4]), 10, 20, np.array([10]), np.array([13])), b2], tau=0.3)
    assert (box.origin.tolist(), box.size, box.lo.tolist(), box.hi.tolist()) == ([10], 6, [10], [14])


def test_padding_moves_the_changes_too():
    p = geo.padded(geo.Rect1D(np.array([3]), 5, 10, np.array([4]), np.array([6])), 2, 14)
    assert (p.origin.tolist(), p.size, p.extent, p.lo.tolist(), p.hi.tolist()) == ([5], 5, 14, [6], [8])


def test_bounding_box_rejects_mixed_extents():
    with pytest.raises(ValueError, match="extents"):
        geo.bounding_box([rect([0], 2, 10), rect([0], 2, 11)])


# ---- grids ------------------------------------------------------------------------------------------------------
def test_grid_shape_and_origins():
    assert geo.grid_shape(224, 224, 16, 4) == (53, 53)
    assert geo.grid_shape(299, 299, 16, 4) == (71, 71)
    origins = geo.grid_origins(10, 12, 4, 3)
    assert geo.grid_shape(10, 12, 4, 3) == (3, 3)
    assert origins.tolist() == [[y, x] for y in (0, 3, 6) for x in (0, 3, 6)]
    assert geo.centre_origin(224, 224, 16).tolist() == [[104, 104]]


@pytest.mark.parametrize("args, message", [((10, 10, 11, 1), "patch_size=11"), ((10, 10, 4, 0), "stride=0"),
                                           ((10, 10, 4, 2.0), "stride")])
def test_grid_shape_errors_name_the_parameter(args, message):
    with pytest.raises(ValueError, match=message):
        geo.grid_shape(*args)
