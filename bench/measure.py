"""How every contender is measured: wall time and peak memory, the same way for all of them.

CPU peak memory = peak resident set size (VmHWM from /proc/self/status) minus the resident set size
just before the run. Before each run we return freed heap pages to the OS (glibc malloc_trim) and
reset the high-water mark by writing "5" to /proc/self/clear_refs (Linux >= 4.0), so the number is
"how much extra memory this run made resident at its peak": model weights and the input are already
resident and not counted; activations, copies, workspaces and the materialized tensors are. The free pages
krypton's arena keeps resident between runs (KRYPTON_ARENA_KEEP_MB) and the run uses again count as the
run's (krypton.memory.kept_pages_reused): a krypton run that reuses them reports the peak it would have had
faulting them in afresh.

CUDA peak memory = torch.cuda.max_memory_allocated() minus memory_allocated() before the run, after
reset_peak_memory_stats(): the caching allocator's live tensors, the same quantity for everyone.
"""
from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from krypton.memory import arena_mark, kept_pages_reused

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def hwm_reset_works() -> bool:
    """True when writing 5 to /proc/self/clear_refs resets VmHWM here (checked once, cheaply)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_bytes: int | None = None
    method: str = ""


class Meter:
    """Times a block and measures its peak memory on `device` (cpu or cuda)."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.method = "torch.cuda.max_memory_allocated() - memory_allocated() before"
        elif hwm_reset_works():
            self.method = ("peak RSS (VmHWM after clear_refs=5) - RSS before, after malloc_trim, plus the "
                           "arena's kept pages the run used again")
        else:
            self.method = "unavailable (/proc/self/clear_refs not writable)"
        self.available = self.cuda or self.method.startswith("peak RSS")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextmanager
    def measure(self):
        m = Measurement(method=self.method)
        gc.collect()
        self.sync()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        else:
            libc = _libc()
            if libc:
                libc.malloc_trim(0)
            base = None
            if self.available:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                base = _status_kb("VmRSS")
                arena_mark()
        t0 = time.perf_counter()
        try:
            yield m
        finally:
            self.sync()
            m.seconds = time.perf_counter() - t0
            if self.cuda:
                m.peak_bytes = int(torch.cuda.max_memory_allocated(self.device) - base)
            elif base is not None:
                m.peak_bytes = max(0, (_status_kb("VmHWM") - base) * 1024) + kept_pages_reused()


def _git(*args) -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except Exception:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_snapshot() -> dict | None:
    """Busy CPU seconds of the whole machine (/proc/stat) and of this process and its children."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    busy = sum(fields[:3]) + sum(fields[5:8])
    own = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    return {"wall": time.time(), "busy_s": busy / os.sysconf("SC_CLK_TCK"), "own_s": own}


def others_cpu_share(start: dict | None) -> float | None:
    """Share of the machine's CPU time used by OTHER processes since `start` (0 = quiet, 1 = all of it).

    The load average cannot tell: a benchmark using every core raises it to the core count by itself.
    """
    end = cpu_snapshot()
    if start is None or end is None:
        return None
    wall = (end["wall"] - start["wall"]) * (os.cpu_count() or 1)
    others = (end["busy_s"] - start["busy_s"]) - (end["own_s"] - start["own_s"])
    return round(max(0.0, others) / wall, 3) if wall > 0 else None


def machine_info(device: str | torch.device = "cpu") -> dict:
    device = torch.device(device)
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_version": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_snapshot_start": cpu_snapshot(),
        # Settings that change the timings: thread counts and oneDNN's primitive cache (default 1024
        # primitives; krypton's many window shapes can overflow it, see bench/README.md).
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(("ONEDNN_", "DNNL_", "OMP_", "MKL_", "KMP_", "KRYPTON_", "CUDA_VISIBLE"))},
    }
    try:
        import captum
        info["captum_version"] = captum.__version__
    except ImportError:
        info["captum_version"] = None
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    try:
        from krypton import ops
        info["krypton_stitch_backend"] = ops.backend()
    except Exception:
        pass
    return info
