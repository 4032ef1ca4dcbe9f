"""A real TorchServe for tests: isolated scratch folder, free ports, started once, always stopped.

    with TorchServeProcess(model_store, models=["tiny"], workdir=tmp) as ts:
        status, headers, body = ts.request("POST", "/explanations/tiny", body=jpeg_bytes)

Isolation (see shared/design/torchserve.md): TMPDIR/TEMP point to a short private folder (pid
file and worker unix sockets live there), LOG_LOCATION/METRICS_LOCATION and the CWD (where
key_file.json lands) to the test's folder, and the five listeners get free ports on 127.0.0.1.
The config is the repo's config.properties with only ports, model store and model list replaced,
so the tests run the shipped settings, token authorization included: the keys are read from
key_file.json and every request sends the right one (inference key on the inference API, management
key on the management API) unless asked not to.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Dict, Iterable, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHSERVE = os.path.join(os.path.dirname(sys.executable), "torchserve")

# A small CNN for most server tests: every op the engine handles incrementally, 10 classes, fast.
# No weights file: the handler seeds torch before building it (random init), like the default
# archives of vgg16/resnet18/inception_v3 without user weights.
TINY_MODEL = '''
import torch
import torch.nn as nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))
'''


def tiny_model_class():
    """The same TinyNet class, in-process (for comparing heatmaps with the engine)."""
    ns: Dict[str, object] = {}
    exec(compile(TINY_MODEL, "tiny_model.py", "exec"), ns)
    return ns["TinyNet"]


def free_ports(n: int) -> List[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def derived_config(ports: Dict[str, int], model_store: str, models: Iterable[str],
                   token_auth: Optional[bool] = None, extra: Optional[Dict[str, str]] = None) -> str:
    """The repo's config.properties for a test instance; ``token_auth`` None keeps the shipped setting."""
    with open(os.path.join(REPO, "config.properties")) as f:
        text = f.read()
    repl = {
        "inference_address": f"http://127.0.0.1:{ports['inference']}",
        "management_address": f"http://127.0.0.1:{ports['management']}",
        "metrics_address": f"http://127.0.0.1:{ports['metrics']}",
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_port": str(ports["grpc_management"]),
        "model_store": model_store,
        "load_models": ",".join(f"{m}.mar" for m in models),
    }
    if token_auth is not None:
        repl["disable_token_authorization"] = "false" if token_auth else "true"
    repl.update(extra or {})
    for key, value in repl.items():
        text, n = re.subn(rf"(?m)^{re.escape(key)}=.*$", f"{key}={value}", text)
        if n == 0:
            text += f"\n{key}={value}\n"
    return text


def load_failures(log_dir: str, models: Iterable[str]) -> Dict[str, str]:
    """{model: the worker's exception} for models whose worker failed to load (TorchServe's model_log.log
    says "Failed to load model NAME, exception ..." and then retries with back-off, forever)."""
    path = os.path.join(log_dir, "model_log.log")
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return {}
    out = {}
    for m in models:
        found = re.findall(rf"Failed to load model {re.escape(m)}, exception (.*)", text)
        if found:
            out[m] = found[-1].strip()
    return out


class TorchServeProcess:
    def __init__(self, model_store: str, models: List[str], workdir: str, token_auth: Optional[bool] = None,
                 startup_timeout: float = 240.0, extra_config: Optional[Dict[str, str]] = None):
        self.model_store = os.path.abspath(model_store)
        self.models = list(models)
        self.workdir = os.path.abspath(workdir)
        self.token_auth = token_auth
        self.startup_timeout = startup_timeout
        self.extra_config = extra_config
        self.tmpdir = ""  # made by start()
        p = free_ports(5)
        self.ports = dict(zip(("inference", "management", "metrics", "grpc_inference", "grpc_management"), p))
        self.keys: Dict[str, str] = {}
        self.started = False

    # -------------------------------------------------------------------------- lifecycle
    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(TMPDIR=self.tmpdir, TEMP=self.tmpdir, LOG_LOCATION=self.log_dir,
                   METRICS_LOCATION=self.log_dir,
                   PYTHONPATH=REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
        return env

    @property
    def log_dir(self) -> str:
        return os.path.join(self.workdir, "logs")

    def start(self) -> "TorchServeProcess":
        # pid file and worker unix sockets go to TMPDIR; socket paths are limited to ~107 bytes
        self.tmpdir = tempfile.mkdtemp(prefix="ts", dir="/tmp")
        os.makedirs(self.log_dir, exist_ok=True)
        cfg = os.path.join(self.workdir, "config.properties")
        text = derived_config(self.ports, self.model_store, self.models, self.token_auth, self.extra_config)
        self.token_auth = bool(re.search(r"(?m)^disable_token_authorization=false\s*$", text))
        with open(cfg, "w") as f:
            f.write(text)
        with open(os.path.join(self.log_dir, "start.out"), "w") as out:
            subprocess.run([TORCHSERVE, "--start", "--ncs", "--model-store", self.model_store,
                            "--ts-config", cfg], cwd=self.workdir, env=self.env(), stdout=out,
                           stderr=subprocess.STDOUT, check=True, timeout=60)
        self.started = True
        try:
            self._wait_ready()
        except Exception:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.time() + self.startup_timeout
        pending = set(self.models)
        while (pending or (self.token_auth and not self.keys)) and time.time() < deadline:
            if not self.keys:
                self._read_keys()  # present when token authorization is on
            failed = load_failures(self.log_dir, pending)
            if failed:  # TorchServe retries such a worker forever: say why at once
                raise RuntimeError(f"TorchServe: model(s) failed to load: {failed}\n{self.log_tail()}")
            for m in sorted(pending):
                try:
                    status, _, body = self.request("GET", f"/models/{m}", api="management", timeout=5)
                except OSError:
                    continue
                if status == 200 and any(w.get("status") == "READY" for w in json.loads(body)[0]["workers"]):
                    pending.discard(m)
            time.sleep(0.5)
        if pending:
            raise RuntimeError(f"TorchServe: no READY worker for {sorted(pending)} after "
                               f"{self.startup_timeout:.0f}s\n{self.log_tail()}")

    def _read_keys(self) -> None:
        try:
            with open(os.path.join(self.workdir, "key_file.json")) as f:
                k = json.load(f)
            self.keys = {"inference": k["inference"]["key"], "management": k["management"]["key"]}
        except (OSError, ValueError, KeyError):
            pass

    def log_tail(self, n: int = 60) -> str:
        out = []
        for name in ("start.out", "ts_log.log", "model_log.log"):
            p = os.path.join(self.log_dir, name)
            if os.path.exists(p):
                with open(p, errors="replace") as f:
                    out.append(f"----- {name}\n" + "".join(f.readlines()[-n:]))
        return "\n".join(out)

    def stop(self) -> None:
        if not self.started:
            return
        pid = None
        try:
            with open(os.path.join(self.tmpdir, ".model_server.pid")) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            pass
        try:
            subprocess.run([TORCHSERVE, "--stop", "--foreground"], cwd=self.workdir, env=self.env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        except subprocess.TimeoutExpired:
            pass
        if pid is not None:  # the frontend we started, by its pid, if --stop left it alive
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.2)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.started = False
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    # -------------------------------------------------------------------------- requests
    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Dict[str, str]] = None, api: str = "inference",
                timeout: float = 300.0, auth: bool = True) -> Tuple[int, Dict[str, str], bytes]:
        """One HTTP request; returns (status, lower-cased headers, body). No header is added
        unless given (http.client sends no Content-Type of its own)."""
        h = dict(headers or {})
        if auth and self.keys and "Authorization" not in h:
            h["Authorization"] = f"Bearer {self.keys['management' if api == 'management' else 'inference']}"
        conn = http.client.HTTPConnection("127.0.0.1", self.ports[api], timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def worker_pids(self, model: str) -> List[int]:
        status, _, body = self.request("GET", f"/models/{model}", api="management", timeout=10)
        assert status == 200, body
        return [int(w["pid"]) for w in json.loads(body)[0]["workers"] if w.get("pid")]

    def post_json(self, path: str, obj, headers: Optional[Dict[str, str]] = None, **kw):
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        return self.request("POST", path, json.dumps(obj).encode(), h, **kw)


def multipart(fields: Dict[str, object], file_field: str = "data", filename: str = "image.jpg",
              content_type: str = "image/jpeg") -> Tuple[bytes, str]:
    """Encode a multipart/form-data body; bytes values become file parts."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        if isinstance(value, (bytes, bytearray)):
            head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                    f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n')
            parts.append(head.encode() + bytes(value) + b"\r\n")
        else:
            parts.append((f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                          f"{value}\r\n").encode())
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# ------------------------------------------------------------------------------------ test images
def image_bytes(w: int = 48, h: int = 40, fmt: str = "JPEG", mode: str = "RGB", seed: int = 0) -> bytes:
    """A smooth random photo-like image, encoded."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    im = Image.fromarray(small, "RGB").resize((w, h), Image.BILINEAR)
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def png_raw(width: int, height: int, bitdepth: int, colortype: int, pixels: Optional[bytes] = None) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB, nor lie about the size)."""
    import struct
    import zlib

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colortype]
    if pixels is None:
        row = bytes(width * channels * bitdepth // 8)
        pixels = b"".join(b"\x00" + row for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bitdepth, colortype, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(pixels))
            + chunk(b"IEND", b""))


def png16_rgb(w: int = 40, h: int = 40) -> bytes:
    import numpy as np

    a = np.random.default_rng(1).integers(0, 65536, size=(h, w, 3)).astype(">u2")
    return png_raw(w, h, 16, 2, b"".join(b"\x00" + a[y].tobytes() for y in range(h)))


def bomb_png(side: int = 100_000) -> bytes:
    """Header says side x side; the data is a few bytes: decoding it would need ~30 GB."""
    import struct
    import zlib

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
            + chunk(b"IEND", b""))
