"""Peak memory of a block of work (a request, a benchmark run, the memory calibration).

GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
allocated when the request started (the caching allocator's own accounting: exact for tensors).

CPU: there is no allocator-level peak counter for torch's CPU tensors, so we measure the
process's resident memory, which is what an operator sees and what the OOM killer acts on:
  1. ``malloc_trim(0)`` (glibc) returns freed heap pages to the OS, so that pages kept by the
     allocator from earlier requests do not hide this request's allocations;
  2. writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's peak-RSS counter (VmHWM) to the
     current RSS (Linux >= 4.0);
  3. after the work, peak = VmHWM - VmRSS at the start.
It counts every page first touched during the request by any thread of the worker (torch's
intra-op threads included), and nothing that was already resident (e.g. the materialized
activations of a cache hit, the weights). A TorchServe worker runs one batch at a time, and the
handler measures each request of a batch on its own, so nothing else runs in the process meanwhile;
the benchmark and the engine's calibration measure one run at a time too.
Where /proc/self/clear_refs is not writable the fallback is ``getrusage`` ru_maxrss, which cannot
be reset: it is reported under its own method name and is only an upper bound after the first
request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from contextlib import contextmanager
from typing import Dict, Optional

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"

CPU_METHOD = ("peak RSS delta: VmHWM (reset by writing 5 to /proc/self/clear_refs, after glibc "
              "malloc_trim(0)) minus VmRSS at request start, plus the arena's kept pages the run used again")
CPU_FALLBACK_METHOD = "getrusage ru_maxrss delta (not resettable: upper bound)"
CUDA_METHOD = "torch.cuda.max_memory_allocated minus memory_allocated at request start"

ARENA_ENV = "KRYPTON_ARENA"  # "off": explain()'s batches allocate through torch's own CPU allocator
# Blocks from this size on come from the arena (ext/arena.cpp); smaller ones from malloc. At 1 MB, the smaller
# tensors of late layers (resnet18's 100-400 KB) stayed in glibc's heap, where they landed by its history:
# a naive batch-1 request peaked at 29-39 MB against 19-20 MB at 64 KB, estimated 25-27 and 20.
ARENA_MIN_BYTES = 1 << 16
# Free arena pages below this many MiB stay resident between explanations (ext/arena.cpp: the next run reuses
# them instead of page-faulting them in again); 0 gives every free page back when a run ends.
ARENA_KEEP_ENV, ARENA_KEEP_MB = "KRYPTON_ARENA_KEEP_MB", 256

_libc = None


def _glibc():
    """glibc, or None where the C library is not glibc (then malloc_trim is skipped)."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


@contextmanager
def batch_arena():
    """Within: torch's CPU tensors of ARENA_MIN_BYTES or more come from krypton's arena (ext/arena.cpp), one
    reserved address range, first fit, freed blocks coalescing; on exit its free pages above the first
    KRYPTON_ARENA_KEEP_MB go back to the OS (arena_keep_bytes). Yields whether it is in effect (False without
    the compiled extension or with KRYPTON_ARENA=off). Scopes nest: the outermost one gives the pages back.

    Why: explain()'s batches allocate the same large tensors batch after batch. With glibc either each batch
    page-faults them in afresh (blocks over its mmap threshold are mapped per allocation: a 59 MB stitch took
    28 ms into fresh pages and 3 ms into reused ones) or, with freed blocks kept in its heap, a run's tensors
    land over whatever earlier work left free there, so identical requests peaked up to 1.7x apart (vgg16
    incremental at batch 139: 377-651 MB). In the arena a run's peak depends on its own allocations only:
    measured one process, five requests each (peak RSS MB, glibc keeping freed blocks -> arena):
    resnet18 b256 313-391 -> 183-203, efficientnet_lite0 b155 538-621 -> 318-321, vgg16 b139 394-517 ->
    276-293, inception_v3 b40 300-413 -> 193-254; naive batches stop page-faulting too (resnet18 naive b58
    14 s -> 9 s a request).
    """
    arena = _arena_ops() if os.environ.get(ARENA_ENV, "").strip().lower() not in ("off", "0") else None
    on = False
    try:
        on = arena is not None and bool(arena.arena_begin(ARENA_MIN_BYTES, arena_keep_bytes()))
        yield on
    finally:
        if on:
            arena.arena_end()


def arena_keep_bytes() -> int:
    """KRYPTON_ARENA_KEEP_MB (default ARENA_KEEP_MB) in bytes; a clear error when it is not a whole number >= 0."""
    raw = os.environ.get(ARENA_KEEP_ENV, "").strip()
    if not raw:
        return ARENA_KEEP_MB << 20
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise ValueError(f"{ARENA_KEEP_ENV}={raw[:20]!r}: expected a whole number of MiB in [0, 999999999]")
    return int(raw) << 20


_arena = None
_ARENA_STATS = ("in_use", "high_water", "free_blocks", "reserved", "reused")


def _arena_ops():
    """torch.ops.krypton, where the loaded extension has the arena (an older build does not), else None
    (looked up once)."""
    global _arena
    if _arena is None:
        from . import ops

        _arena = False
        if ops.compiled_available():
            import torch

            _arena = torch.ops.krypton if hasattr(torch.ops.krypton, "arena_mark") else False
    return _arena or None


def arena_stats() -> Dict[str, int]:
    """The arena's bytes in use, its high-water mark since the outermost scope opened, free blocks, reserved
    bytes and the kept pages reused since arena_mark() (all 0 before its first scope or without the compiled
    extension)."""
    arena = _arena_ops()
    return dict(zip(_ARENA_STATS, arena.arena_stats() if arena is not None else (0,) * len(_ARENA_STATS)))


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc malloc_trim; a no-op elsewhere)."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (e.g. after a warm-up's temporaries). The
    arena's kept pages stay: the next request reuses them (KRYPTON_ARENA_KEEP_MB bounds them)."""
    import gc

    gc.collect()
    trim_heap()


def arena_mark() -> None:
    """At the start of a measured run (not nested in another one): count the arena's kept pages that the
    run uses again from here (kept_pages_reused)."""
    arena = _arena_ops()
    if arena is not None:
        arena.arena_mark()


def kept_pages_reused() -> int:
    """Bytes to add to a peak RSS delta measured since arena_mark(): the free pages the arena kept resident
    between runs (KRYPTON_ARENA_KEEP_MB) that blocks of the run were carved from. Their RSS was already in
    the base, so without them a run that reused kept pages would look smaller than one that faulted them in
    afresh; with them it reports the peak it would have had with every free page given back first (or more,
    where it reused kept pages only after its peak)."""
    return arena_stats()["reused"]


def _status_kb() -> Dict[str, int]:
    out = {}
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` and ``m.method``."""

    def __init__(self, device=None):
        self.device = device
        self.peak_bytes: Optional[int] = None
        self.method: str = ""
        self._cuda = False
        self._base = 0

    def __enter__(self):
        import torch

        dev = self.device
        if dev is not None and torch.device(dev).type == "cuda" and torch.cuda.is_available():
            self._cuda = True
            self.method = CUDA_METHOD
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self._base = torch.cuda.memory_allocated(dev)
            return self
        trim_heap()
        if _reset_hwm():
            st = _status_kb()
            if "VmRSS" in st and "VmHWM" in st:
                self.method = CPU_METHOD
                self._base = st["VmRSS"] * 1024
                arena_mark()
                return self
        self.method = CPU_FALLBACK_METHOD
        self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self._cuda:
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, int(torch.cuda.max_memory_allocated(self.device)) - self._base)
        elif self.method == CPU_METHOD:
            st = _status_kb()
            self.peak_bytes = max(0, st.get("VmHWM", 0) * 1024 - self._base) + kept_pages_reused()
        else:
            self.peak_bytes = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._base)
        return False

    def to_dict(self) -> Dict[str, object]:
        return {"measured_peak_bytes": self.peak_bytes, "measured_method": self.method}
