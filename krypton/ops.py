"""The stitch op: gather B read-in windows from one materialized tensor and paste B patches.

``stitch`` calls the compiled op ``torch.ops.krypton.stitch`` (ext/stitch.cpp: CPU, OpenMP;
ext/cuda/: CUDA when built). Without the compiled extension it warns loudly and runs
``stitch_reference``, a pure-torch implementation of the same semantics (also the test oracle).
Set KRYPTON_FORCE_REFERENCE=1 to route ``stitch`` to the reference even when the build is there.

Semantics, for b < B, c < C, i < window_h, j < window_w and (y, x) = window_origin[b] + (i, j):

- (y, x) outside [0, H) x [0, W)                           -> pad_value
- (y, x) inside [patch_origin[b], patch_origin[b] + (ph, pw)) -> patch[b, c, y - py, x - px]
- otherwise                                                 -> materialized[c, y, x]

This module imports nothing else from krypton: the engine imports ops, never the reverse.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import torch

__all__ = ["stitch", "stitch_reference", "backend", "compiled_available", "load_error"]

_LOAD_ERROR: Optional[str] = None
try:
    from krypton import _C  # noqa: F401  (loading the library registers torch.ops.krypton.*)

    _COMPILED = True
except ImportError as exc:  # the build is missing or broken: say so, never silently
    _COMPILED = False
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "krypton: the compiled stitch op (krypton._C) could not be loaded "
        f"({_LOAD_ERROR}); falling back to the pure-torch reference, which is much slower. "
        "Build it with `bash scripts/setup.sh` or `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def _forced_reference() -> bool:
    return os.environ.get("KRYPTON_FORCE_REFERENCE", "").strip() not in ("", "0")


def compiled_available() -> bool:
    """True when the compiled op is loaded (regardless of KRYPTON_FORCE_REFERENCE)."""
    return _COMPILED


def load_error() -> Optional[str]:
    """Why the compiled op is missing (the ImportError text), or None when it loaded."""
    return _LOAD_ERROR


def _has_cuda_kernel() -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key("krypton::stitch", "CUDA"))
    except Exception:  # pragma: no cover - private API moved
        return False


def backend() -> str:
    """"compiled-cpu", "compiled-cpu+cuda" or "reference" (what ``stitch`` will run)."""
    if not _COMPILED or _forced_reference():
        return "reference"
    return "compiled-cpu+cuda" if _has_cuda_kernel() else "compiled-cpu"


# ---------------------------------------------------------------------------------------------
# fake (meta) implementations, so torch.compile / fx / FakeTensor see output shapes and strides
# ---------------------------------------------------------------------------------------------
def _output_memory_format(patch: torch.Tensor) -> torch.memory_format:
    """Same rule as the C++ op: patch's format when it is channels_last and B > 0."""
    if patch.dim() == 4 and patch.shape[0] > 0:
        from torch._prims_common import suggest_memory_format

        if suggest_memory_format(patch) == torch.channels_last:
            return torch.channels_last
    return torch.contiguous_format


if _COMPILED:

    @torch.library.register_fake("krypton::stitch")
    def _stitch_fake(materialized, patch, patch_origin, window_origin, window_h, window_w, pad_value):
        torch._check(materialized.dim() in (3, 4), lambda: "materialized must be [C,H,W] or [1,C,H,W]")
        torch._check(patch.dim() == 4, lambda: "patch must be [B,C,ph,pw]")
        torch._check(patch.dtype == materialized.dtype, lambda: "patch dtype must match materialized")
        C = materialized.shape[-3]
        B = patch.shape[0]
        return torch.empty(
            (B, C, window_h, window_w), dtype=patch.dtype, device=patch.device,
            memory_format=_output_memory_format(patch),
        )


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def stitch(
    materialized: torch.Tensor,
    patch: torch.Tensor,
    patch_origin: torch.Tensor,
    window_origin: torch.Tensor,
    window_h: int,
    window_w: int,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Gather B windows of size (window_h, window_w) from ``materialized`` with patches pasted.

    materialized: [C,H,W] or [1,C,H,W]; patch: [B,C,ph,pw] (ph or pw may be 0); patch_origin,
    window_origin: [B,2] int64 (y, x) on the data's device. Returns [B,C,window_h,window_w];
    channels_last when ``patch`` is channels_last and B > 0, else contiguous.
    """
    if _COMPILED and not _forced_reference():
        return torch.ops.krypton.stitch(
            materialized, patch, patch_origin, window_origin, int(window_h), int(window_w),
            float(pad_value),
        )
    return stitch_reference(materialized, patch, patch_origin, window_origin, window_h, window_w, pad_value)


def _check_reference_inputs(materialized, patch, patch_origin, window_origin, window_h, window_w):
    if materialized.dim() == 4 and materialized.shape[0] == 1:
        materialized = materialized[0]
    if materialized.dim() != 3:
        raise ValueError(f"stitch: materialized must be [C,H,W] or [1,C,H,W], got {tuple(materialized.shape)}")
    if patch.dim() != 4:
        raise ValueError(f"stitch: patch must be [B,C,ph,pw], got {tuple(patch.shape)}")
    if not materialized.dtype.is_floating_point:
        raise ValueError(f"stitch: materialized must be a floating tensor, got {materialized.dtype}")
    if patch.dtype != materialized.dtype:
        raise ValueError(f"stitch: patch dtype ({patch.dtype}) must match materialized dtype ({materialized.dtype})")
    if patch.device != materialized.device:
        raise ValueError(f"stitch: patch is on {patch.device} but materialized is on {materialized.device}")
    if patch.shape[1] != materialized.shape[0]:
        raise ValueError(
            f"stitch: patch has {patch.shape[1]} channels but materialized has {materialized.shape[0]}"
        )
    B = patch.shape[0]
    for name, o in (("patch_origin", patch_origin), ("window_origin", window_origin)):
        if o.dtype != torch.int64:
            raise ValueError(f"stitch: {name} must be int64 (torch.long), got {o.dtype}")
        if o.dim() != 2 or o.shape[0] != B or o.shape[1] != 2:
            raise ValueError(f"stitch: {name} must have shape [B,2] = [{B},2], got {tuple(o.shape)}")
        if o.device != materialized.device:
            raise ValueError(f"stitch: {name} is on {o.device} but the data is on {materialized.device}")
    if window_h < 0 or window_w < 0:
        raise ValueError(f"stitch: window_h and window_w must be >= 0, got ({window_h}, {window_w})")
    return materialized


def stitch_reference(
    materialized: torch.Tensor,
    patch: torch.Tensor,
    patch_origin: torch.Tensor,
    window_origin: torch.Tensor,
    window_h: int,
    window_w: int,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """Pure-torch ``stitch`` (vectorized gathers, no loop over B); same semantics and layout."""
    mat = _check_reference_inputs(materialized, patch, patch_origin, window_origin, window_h, window_w)
    C, H, W = mat.shape
    B, _, ph, pw = patch.shape
    Hr, Wr = int(window_h), int(window_w)
    dev = mat.device
    # One gather from a single source holding [materialized pixels | pad | all patches' pixels].
    # channels_last output: pixel-major source rows of C values (index_select on dim 0 yields the
    # channels_last result directly); otherwise channel-major rows, gathered along dim 1.
    pad_slot = H * W
    fmt = _output_memory_format(patch)
    pixel_major = fmt == torch.channels_last
    if pixel_major:
        src = torch.cat(
            [
                mat.permute(1, 2, 0).reshape(H * W, C),
                torch.full((1, C), pad_value, dtype=mat.dtype, device=dev),
                patch.permute(0, 2, 3, 1).reshape(B * ph * pw, C),
            ],
            0,
        )
    else:
        src = torch.cat(
            [
                mat.reshape(C, H * W),
                torch.full((C, 1), pad_value, dtype=mat.dtype, device=dev),
                patch.permute(1, 0, 2, 3).reshape(C, B * ph * pw),
            ],
            1,
        )
    ys = window_origin[:, 0:1] + torch.arange(Hr, device=dev)  # [B,Hr]
    xs = window_origin[:, 1:2] + torch.arange(Wr, device=dev)  # [B,Wr]
    idx = ys[:, :, None] * W + xs[:, None, :]  # [B,Hr,Wr] index into the materialized plane
    if ph > 0 and pw > 0:
        ry = ys - patch_origin[:, 0:1]
        rx = xs - patch_origin[:, 1:2]
        in_patch = ((ry >= 0) & (ry < ph))[:, :, None] & ((rx >= 0) & (rx < pw))[:, None, :]
        b_off = (pad_slot + 1 + torch.arange(B, device=dev) * (ph * pw))[:, None, None]
        idx = torch.where(in_patch, b_off + ry[:, :, None] * pw + rx[:, None, :], idx)
    valid = ((ys >= 0) & (ys < H))[:, :, None] & ((xs >= 0) & (xs < W))[:, None, :]
    idx = torch.where(valid, idx, pad_slot)
    if pixel_major:
        res = src.index_select(0, idx.reshape(-1)).view(B, Hr, Wr, C).permute(0, 3, 1, 2)
    else:
        res = src.index_select(1, idx.reshape(-1)).view(C, B, Hr, Wr).permute(1, 0, 2, 3)
    return res.contiguous(memory_format=fmt)
