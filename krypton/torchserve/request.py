"""Request parsing, validation, image decoding and preprocessing for the Krypton handler.

Pure functions and small value classes: nothing here imports TorchServe or the engine, so the
unit tests exercise all of it without a server. Every client mistake raises ``RequestError``
(a ``ValueError``) carrying the HTTP status (400 or 413), the parameter at fault and a message
that names the parameter, the value and the allowed range.

Part of the installed package (``krypton.torchserve``); archives hold only ``krypton_handler.py``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from PIL import Image, ImageFile, ImageOps

from krypton.preprocess import PreprocessError, check_bounds, preprocess_pil
from krypton.preprocess import resized_size  # noqa: F401 (part of this module's API)

# Never decode half an image silently: a truncated file is a client error.
ImageFile.LOAD_TRUNCATED_IMAGES = False

HEADER_PREFIX = "x-krypton-"
IMAGE_FIELD = "data"
EXPLAIN_OPTIONS = ("patch_size", "stride", "fill", "target", "method", "batch_size", "format", "tau",
                   "target_ssim", "drilldown", "mode", "stream", "occlusion", "n_segments", "png_size", "precision")
OCCLUSIONS = ("grid", "segments")  # grid: OBE's sliding patch; segments: SLIC superpixels (segments.py)
N_SEGMENTS_RANGE = (2, 500)
GRID_ONLY = ("patch_size", "stride", "tau", "target_ssim", "drilldown", "mode", "stream", "precision")
APPROX_MODES = ("exact", "approximate")
DRILLDOWN_KEYS = ("r", "target_speedup", "s1")
NAMED_FILLS = ("gray", "grey", "black", "mean")
METHODS = ("incremental", "naive")
PRECISIONS = ("float32", "bf16", "fp16")  # the engine refuses fp16 for a model on the CPU (CUDA-only)
FORMATS = ("json", "png")
# Longer side of the photo in a format=png answer (obe_render): 2048x2048 RGB stays under max_response_size.
PNG_SIZE_RANGE = (64, 2048)
FILL_RANGE = (-1000.0, 1000.0)
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
# Headers cannot carry a name with a space: TorchServe's worker cannot deliver it to a client-made key.
DUPLICATES_KEY = " krypton duplicate parts"
ECHO_CHARS = 64          # a client's value is echoed in messages and logs as at most this many characters
ECHO_NAMES = 5           # and at most this many names of unknown options or fields


def clip(value: Any, n: int = ECHO_CHARS) -> str:
    """A short, bounded repr of a client's value for error messages and logs: the first ``n``
    characters, then "..." and the full length. Bounded work too (reprlib) for huge containers."""
    if isinstance(value, (bytes, bytearray)):
        head = bytes(value[: n + 1])
        text = repr(head[:n]) + (f"... ({len(value)} bytes)" if len(value) > n else "")
        return text
    if isinstance(value, str):
        return repr(value[:n]) + (f"... ({len(value)} chars)" if len(value) > n else "")
    r = reprlib.Repr()
    r.maxstring = r.maxother = n
    r.maxlist = r.maxtuple = r.maxdict = r.maxset = 8
    r.maxlevel = 3
    text = r.repr(value)
    return text if len(text) <= 2 * n else text[: 2 * n] + "..."


def clip_text(text: str, n: int) -> str:
    """A message or log line cut to ``n`` characters."""
    return text if len(text) <= n else text[:n] + f"... ({len(text)} chars)"


def cut(name: Any, n: int = 32) -> str:
    """A client-chosen name as the ``parameter`` of an error: plain text, at most ``n`` characters."""
    text = str(name)
    return text if len(text) <= n else text[:n] + "..."


def clip_names(names) -> str:
    names = list(names)
    shown = ", ".join(clip(str(k), 32) for k in names[:ECHO_NAMES])
    more = f", ... ({len(names)} in all)" if len(names) > ECHO_NAMES else ""
    return f"[{shown}{more}]"


class RequestError(ValueError):
    """A client mistake: mapped to HTTP ``status`` with ``message`` in a JSON body."""

    def __init__(self, message: str, status: int = 400, parameter: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.parameter = parameter

    def to_dict(self) -> Dict[str, Any]:
        body = {"code": self.status, "type": _STATUS_TYPES.get(self.status, "Error"),
                "message": self.message}
        if self.parameter is not None:
            body["parameter"] = self.parameter
        return body


_STATUS_TYPES = {400: "BadRequest", 404: "NotFound", 413: "PayloadTooLarge", 500: "InternalServerError",
                 503: "ServiceUnavailable"}


# --------------------------------------------------------------------------------------------
# Settings that come from the archive (model-config.yaml ``handler:`` section)
# --------------------------------------------------------------------------------------------

@dataclass
class Limits:
    max_body_bytes: int = 8 * 2**20          # encoded image bytes (TorchServe's max_request_size caps the HTTP body)
    max_image_pixels: int = 40_000_000       # width * height: from the header before decoding, again after
    max_aspect_ratio: float = 10.0           # long side / short side, checked before resizing
    max_resized_pixels: int = 4_000_000      # width * height after the resize step, checked before resizing
    min_image_side: int = 32                 # shorter side of the decoded image, in pixels
    max_positions: int = 6_000               # occlusion positions (heatmap cells) per request
    max_batch_size: int = 256                # occluded images per engine batch
    max_json_depth: int = 16                 # nesting of a JSON body (KServe v2 needs 4)
    max_option_bytes: int = 1024             # length of one option value (header, form field or JSON string)
    max_request_seconds: int = 600           # estimated work per TorchServe batch; responseTimeout must exceed it
    formats: Tuple[str, ...] = DEFAULT_FORMATS  # image formats PIL may open


@dataclass
class Preprocess:
    resize: Optional[int] = 256              # shorter side, torchvision Resize(int) semantics; None: keep
    crop: Optional[int] = 224                # centre crop side, torchvision CenterCrop; None: no crop
    mean: Tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: Tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass
class Defaults:
    patch_size: int = 16
    stride: int = 4
    fill: Any = "gray"
    method: str = "incremental"
    format: str = "json"
    png_size: int = 1024                     # longer side of the photo in a PNG answer (never enlarged)


@dataclass
class Settings:
    arch: Optional[str] = None
    weights: Optional[str] = None            # a label; None: inferred from the manifest
    seed: int = 0                            # used for an explicit random init (no weights file)
    cache_bytes: int = 512 * 2**20           # LRU of materialized activations per worker
    memory_budget: Optional[int] = None      # bytes a request's peak may take (None: the engine's 1 GiB)
    calibrate_memory: bool = True            # measure the model's memory at load (a few probe runs)
    threads: Optional[int] = None            # torch intra-op threads per worker; None: torch default
    explain_threads: Optional[int] = None    # the same, for a NAME_explain registration (README "Deployment")
    allow_mode_conversion: bool = False      # convert gray / RGBA / 16-bit / CMYK to 8-bit RGB
    topk: int = 5
    preprocess: Preprocess = field(default_factory=Preprocess)
    limits: Limits = field(default_factory=Limits)
    defaults: Defaults = field(default_factory=Defaults)


def _config_error(path: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"model-config.yaml handler.{path}: {value!r} is invalid, expected {expected}")


def _cfg_int(path: str, value: Any, lo: int, hi: Optional[int] = None, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise _config_error(path, value, rng + (" or null" if allow_none else ""))
    return value


def _cfg_triple(path: str, value: Any, positive: bool) -> Tuple[float, float, float]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or (positive and not all(v > 0 for v in value))):
        raise _config_error(path, value, "a list of 3 numbers" + (" > 0" if positive else ""))
    return tuple(float(v) for v in value)


def _section(cfg: Mapping[str, Any], name: str, fields_of) -> Dict[str, Any]:
    """One sub-section of the handler config; keys that are not fields of `fields_of` are typos."""
    section = dict(cfg.get(name) or {})
    bad = sorted(set(section) - set(fields_of.__dataclass_fields__))
    if bad:
        raise ValueError(f"model-config.yaml handler.{name}: unknown keys {bad}")
    return section


def settings_from_config(handler_cfg: Optional[Mapping[str, Any]]) -> Settings:
    """Validate the ``handler:`` section of model-config.yaml; typos fail at model load."""
    cfg = dict(handler_cfg or {})
    s = Settings()
    known = set(Settings.__dataclass_fields__)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"model-config.yaml handler: unknown keys {unknown}; allowed: {sorted(known)}")
    if "arch" in cfg:
        s.arch = None if cfg["arch"] is None else str(cfg["arch"])
    if "weights" in cfg:
        s.weights = None if cfg["weights"] is None else str(cfg["weights"])
    if "seed" in cfg:
        s.seed = _cfg_int("seed", cfg["seed"], 0)
    if "cache_bytes" in cfg:
        s.cache_bytes = _cfg_int("cache_bytes", cfg["cache_bytes"], 0)
    if "memory_budget" in cfg:
        s.memory_budget = _cfg_int("memory_budget", cfg["memory_budget"], 1, allow_none=True)
    if "calibrate_memory" in cfg:
        if not isinstance(cfg["calibrate_memory"], bool):
            raise _config_error("calibrate_memory", cfg["calibrate_memory"], "true or false")
        s.calibrate_memory = cfg["calibrate_memory"]
    if "threads" in cfg:
        s.threads = _cfg_int("threads", cfg["threads"], 1, 1024, allow_none=True)
    if "explain_threads" in cfg:
        s.explain_threads = _cfg_int("explain_threads", cfg["explain_threads"], 1, 1024, allow_none=True)
    if "allow_mode_conversion" in cfg:
        if not isinstance(cfg["allow_mode_conversion"], bool):
            raise _config_error("allow_mode_conversion", cfg["allow_mode_conversion"], "true or false")
        s.allow_mode_conversion = cfg["allow_mode_conversion"]
    if "topk" in cfg:
        s.topk = _cfg_int("topk", cfg["topk"], 1, 1000)

    pre = _section(cfg, "preprocess", Preprocess)
    p = Preprocess()
    if "resize" in pre:
        p.resize = _cfg_int("preprocess.resize", pre["resize"], 1, 8192, allow_none=True)
    if "crop" in pre:
        p.crop = _cfg_int("preprocess.crop", pre["crop"], 1, 8192, allow_none=True)
    if "mean" in pre:
        p.mean = _cfg_triple("preprocess.mean", pre["mean"], positive=False)
    if "std" in pre:
        p.std = _cfg_triple("preprocess.std", pre["std"], positive=True)
    s.preprocess = p

    lim = _section(cfg, "limits", Limits)
    L = Limits()
    for key in ("max_body_bytes", "max_image_pixels", "max_resized_pixels", "min_image_side", "max_positions",
                "max_batch_size", "max_json_depth", "max_option_bytes", "max_request_seconds"):
        if key in lim:
            setattr(L, key, _cfg_int(f"limits.{key}", lim[key], 1))
    if "max_json_depth" in lim:
        L.max_json_depth = _cfg_int("limits.max_json_depth", lim["max_json_depth"], 4, 1000)
    if "max_aspect_ratio" in lim:
        v = lim["max_aspect_ratio"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1:
            raise _config_error("limits.max_aspect_ratio", v, "a number >= 1")
        L.max_aspect_ratio = float(v)
    if "formats" in lim:
        if not isinstance(lim["formats"], (list, tuple)) or not lim["formats"]:
            raise _config_error("limits.formats", lim["formats"], "a non-empty list of PIL format names")
        L.formats = tuple(str(f).upper() for f in lim["formats"])
    s.limits = L

    d = _section(cfg, "defaults", Defaults)
    D = Defaults()
    try:
        if "patch_size" in d:
            D.patch_size = parse_int("patch_size", d["patch_size"], 1, None)
        if "stride" in d:
            D.stride = parse_int("stride", d["stride"], 1, None)
        if "fill" in d:
            D.fill = parse_fill(d["fill"])
        if "method" in d:
            D.method = parse_choice("method", d["method"], METHODS)
        if "format" in d:
            D.format = parse_choice("format", d["format"], FORMATS)
        if "png_size" in d:
            D.png_size = parse_int("png_size", d["png_size"], *PNG_SIZE_RANGE)
    except RequestError as e:
        raise ValueError(f"model-config.yaml handler.defaults: {e.message}") from None
    s.defaults = D
    return s


# --------------------------------------------------------------------------------------------
# Option parsing: values arrive as JSON types, or as text (headers, multipart fields)
# --------------------------------------------------------------------------------------------

def _text(name: str, value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise RequestError(f"option {name}: value {clip(value)} is not UTF-8 text", parameter=name) from None
    if isinstance(value, str):
        return value.strip()
    return value


_INT_RE = re.compile(r"^[+-]?\d+$")
_INT_DIGITS = 12  # a longer integer is out of every option's range: reported so, without converting it
_NUM_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _range_text(lo: int, hi: Optional[int]) -> str:
    return f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"


def parse_int(name: str, value: Any, lo: int, hi: Optional[int]) -> int:
    v = _text(name, value)
    if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and _INT_RE.match(v))):
        raise RequestError(f"option {name}: {clip(value)} is not an integer; allowed: {_range_text(lo, hi)}",
                           parameter=name)
    n = None if isinstance(v, str) and len(v.lstrip("+-")) > _INT_DIGITS else int(v)
    if n is None or n < lo or (hi is not None and n > hi):
        raise RequestError(f"option {name}: {clip(value) if n is None else n} is out of range; "
                           f"allowed: {_range_text(lo, hi)}", parameter=name)
    return n


def parse_float(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    v = _text(name, value)
    rng = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if isinstance(v, str) and _NUM_RE.match(v):
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"option {name}: {clip(value)} is not a number; allowed: {rng}", parameter=name)
    f = float(v)
    if not math.isfinite(f) or f > hi or f < lo or (lo_open and f == lo):
        raise RequestError(f"option {name}: {clip(value)} is out of range; allowed: {rng}", parameter=name)
    return f


def parse_choice(name: str, value: Any, choices: Tuple[str, ...]) -> str:
    v = _text(name, value)
    if not isinstance(v, str) or v.lower() not in choices:
        raise RequestError(f"option {name}: {clip(value)} is not allowed; allowed: {' | '.join(choices)}",
                           parameter=name)
    return v.lower()


def parse_fill(value: Any):
    v = _text("fill", value)
    allowed = (f"{' | '.join(NAMED_FILLS)} or a finite number in [{FILL_RANGE[0]:g}, {FILL_RANGE[1]:g}] "
               "(written as-is into the normalized input)")
    if isinstance(v, str) and v.lower() in NAMED_FILLS:
        return v.lower()
    if isinstance(v, str) and _NUM_RE.match(v):
        v = float(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"option fill: {clip(value)} is not allowed; allowed: {allowed}", parameter="fill")
    f = float(v)
    if not math.isfinite(f) or not FILL_RANGE[0] <= f <= FILL_RANGE[1]:
        raise RequestError(f"option fill: {clip(value)} is out of range; allowed: {allowed}", parameter="fill")
    return f


@dataclass
class Options:
    patch_size: int
    stride: int
    fill: Any
    target: Optional[int]
    method: str
    batch_size: Optional[int]
    format: str
    tau: float = 1.0
    target_ssim: Optional[float] = None
    drilldown: Any = None  # None, False, True (defaults) or {r, target_speedup, s1}
    mode: Optional[str] = None
    stream: bool = False
    occlusion: str = "grid"
    n_segments: int = 50
    png_size: int = 1024
    precision: str = "float32"


def parse_bool(name: str, value: Any) -> bool:
    v = _text(name, value)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return v.lower() in ("true", "1", "yes", "on")
    raise RequestError(f"option {name}: {clip(value)} is not allowed; allowed: true | false", parameter=name)


def parse_drilldown(value: Any) -> Any:
    """true/false, or an object (JSON text in headers and form fields) with keys r, target_speedup, s1.

    The values' ranges depend on the image and stride: the engine checks them (eq. 30) and its
    OptionError becomes a 400 naming the parameter.
    """
    v = _text("drilldown", value)
    if isinstance(v, str) and v.strip().startswith("{"):
        try:
            v = json.loads(v)
        except (ValueError, RecursionError):
            raise RequestError(f"option drilldown: {clip(value)} is not valid JSON", parameter="drilldown") from None
    if isinstance(v, dict):
        unknown = sorted(set(v) - set(DRILLDOWN_KEYS))
        if unknown:
            raise RequestError(f"option drilldown: unknown key(s) {clip_names(unknown)}; allowed: {list(DRILLDOWN_KEYS)}",
                               parameter="drilldown")
        for k, x in v.items():
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise RequestError(f"option drilldown.{clip(k, 32)}: {clip(x)} is not a number; allowed: a number",
                                   parameter="drilldown")
        return dict(v)
    return parse_bool("drilldown", v)


def parse_options(raw: Mapping[str, Any], settings: Settings, num_classes: Optional[int]) -> Options:
    """Turn raw option values (already checked for unknown names) into typed, range-checked Options."""
    d = settings.defaults
    lim = settings.limits
    unknown = sorted(set(raw) - set(EXPLAIN_OPTIONS))
    if unknown:
        raise RequestError(f"unknown option(s) {clip_names(unknown)}; allowed: {list(EXPLAIN_OPTIONS)}",
                           parameter=cut(unknown[0]))
    for k, v in raw.items():
        n = len(v) if isinstance(v, (str, bytes, bytearray)) else len(json.dumps(v)) if isinstance(v, (dict, list)) else 0
        if n > lim.max_option_bytes:
            raise RequestError(f"option {k}: value {clip(v)} is {n} long; limit max_option_bytes="
                               f"{lim.max_option_bytes} (allowed: 1..{lim.max_option_bytes})", parameter=k)

    def present(k):
        return k in raw and raw[k] is not None and _text(k, raw[k]) != ""

    patch = parse_int("patch_size", raw["patch_size"], 1, None) if present("patch_size") else d.patch_size
    stride = parse_int("stride", raw["stride"], 1, None) if present("stride") else d.stride
    fill = parse_fill(raw["fill"]) if present("fill") else d.fill
    method = parse_choice("method", raw["method"], METHODS) if present("method") else d.method
    fmt = parse_choice("format", raw["format"], FORMATS) if present("format") else d.format
    target = None
    if present("target"):
        hi = None if num_classes is None else num_classes - 1
        target = parse_int("target", raw["target"], 0, hi)
    batch = None
    if present("batch_size") and str(_text("batch_size", raw["batch_size"])).lower() != "auto":
        batch = parse_int("batch_size", raw["batch_size"], 1, lim.max_batch_size)
    tau = 1.0
    if present("tau"):
        tau = parse_float("tau", raw["tau"], 0.0, 1.0, lo_open=True)
    target_ssim = parse_float("target_ssim", raw["target_ssim"], 0.0, 1.0, lo_open=True) \
        if present("target_ssim") else None
    drilldown = parse_drilldown(raw["drilldown"]) if present("drilldown") else None
    mode = parse_choice("mode", raw["mode"], APPROX_MODES) if present("mode") else None
    stream = parse_bool("stream", raw["stream"]) if present("stream") else False
    occlusion = parse_choice("occlusion", raw["occlusion"], OCCLUSIONS) if present("occlusion") else "grid"
    n_segments = 50
    if present("n_segments"):
        if occlusion != "segments":
            raise RequestError("option n_segments: applies to occlusion=segments only", parameter="n_segments")
        n_segments = parse_int("n_segments", raw["n_segments"], *N_SEGMENTS_RANGE)
    if occlusion == "segments":
        grid_only = [k for k in GRID_ONLY if present(k)]
        if grid_only:
            raise RequestError(f"option {grid_only[0]}: applies to occlusion=grid only (segments occlude SLIC "
                               "superpixels, exactly)", parameter=grid_only[0])
        if n_segments > lim.max_positions:
            raise RequestError(f"option n_segments: {n_segments} segments exceed the limit max_positions="
                               f"{lim.max_positions}", parameter="n_segments")
    png_size = parse_int("png_size", raw["png_size"], *PNG_SIZE_RANGE) if present("png_size") else d.png_size
    precision = parse_choice("precision", raw["precision"], PRECISIONS) if present("precision") else "float32"
    return Options(patch, stride, fill, target, method, batch, fmt, tau, target_ssim, drilldown, mode, stream,
                   occlusion, n_segments, png_size, precision)


# --------------------------------------------------------------------------------------------
# Request shapes -> (image bytes, raw options)
# --------------------------------------------------------------------------------------------

def _header_options(headers: Mapping[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in (headers or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            continue  # per-part content types of multipart bodies are dicts
        k = key.lower()
        if k.startswith(HEADER_PREFIX):
            out[k[len(HEADER_PREFIX):].replace("-", "_")] = value
    return out


def _b64(value: Any, where: str) -> bytes:
    if isinstance(value, dict) and set(value) == {"b64"}:
        value = value["b64"]
    if not isinstance(value, str):
        raise RequestError(f"{where}: expected a base64 string, got {type(value).__name__}", parameter=IMAGE_FIELD)
    s = value.strip()
    if s.startswith("data:") and "," in s:  # a data: URL
        s = s.split(",", 1)[1]
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: not valid base64", parameter=IMAGE_FIELD) from None


V2_TENSOR_KEYS = ("name", "shape", "datatype", "parameters", "data")


def _check_v2_tensor(tensor: Mapping[str, Any]) -> None:
    """KServe v2 (open inference protocol): one input tensor {"name", "shape": [1], "datatype": "BYTES",
    "data": ["<base64 image>"]}; the spec makes name, shape and datatype mandatory."""
    unknown = sorted(set(tensor) - set(V2_TENSOR_KEYS))
    if unknown:
        raise RequestError(f"KServe v2 inputs[0]: unknown key(s) {clip_names(unknown)}; allowed: "
                           f"{list(V2_TENSOR_KEYS)}", parameter="inputs")
    for key in ("name", "shape", "datatype", "data"):
        if key not in tensor:
            raise RequestError(f"KServe v2 inputs[0] has no '{key}': send {{\"name\": \"data\", \"shape\": [1], "
                               "\"datatype\": \"BYTES\", \"data\": [\"<base64 image>\"]}", parameter=f"inputs[0].{key}")
    if not isinstance(tensor["name"], str):
        raise RequestError(f"KServe v2 inputs[0].name: {clip(tensor['name'])} is not a string", parameter="inputs[0].name")
    if tensor["datatype"] != "BYTES":
        raise RequestError(f"KServe v2 inputs[0].datatype: {clip(tensor['datatype'])} is not allowed; allowed: "
                           "BYTES (the encoded image as base64)", parameter="inputs[0].datatype")
    if tensor["shape"] != [1]:
        raise RequestError(f"KServe v2 inputs[0].shape: {clip(tensor['shape'])} is not allowed; allowed: [1] "
                           "(one image per request)", parameter="inputs[0].shape")
    if not isinstance(tensor["data"], list) or len(tensor["data"]) != 1:
        raise RequestError(f"KServe v2 inputs[0].data: {clip(tensor['data'])} does not match shape [1]; allowed: "
                           "a list of exactly 1 base64 string", parameter="inputs[0].data")


def json_depth_exceeds(obj: Any, limit: int) -> bool:
    """True when containers nest deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, dict):
            children = o.values()
        elif isinstance(o, list):
            children = o
        else:
            continue
        if d > limit:
            return True
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _depth_error(limit: int) -> RequestError:
    return RequestError(f"JSON body nests deeper than the limit max_json_depth={limit} (allowed: at most {limit} "
                        "levels of objects/arrays)", parameter="body")


def _only_item(body: Dict[str, Any], key: str, protocol: str, what: str, hint: str) -> Dict[str, Any]:
    """The single object of body[key] (one image per request); any other top-level key is refused."""
    items = body.pop(key)
    if body:
        raise RequestError(f"{protocol} body: unexpected top-level keys {clip_names(sorted(body))}; {hint}",
                           parameter=cut(sorted(body)[0]))
    if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], dict):
        raise RequestError(f"{protocol} body: '{key}' must be a list of exactly 1 {what} "
                           "(one image per request)", parameter=key)
    return items[0]


def _from_json(body: Any) -> Tuple[bytes, Dict[str, Any], str]:
    if not isinstance(body, dict):
        raise RequestError(f"JSON body must be an object like {{\"data\": \"<base64 image>\", \"stride\": 8}}, "
                           f"got a {type(body).__name__}")
    body = dict(body)
    if "instances" in body:  # KServe v1: {"instances": [{"data": "<b64>", ...options}]}
        body = dict(_only_item(body, "instances", "KServe v1", "object", "put options inside the instance"))
        kind = "kserve-v1"
    elif "inputs" in body:  # KServe v2: {"inputs": [{"name": "data", "datatype": "BYTES", "data": ["<b64>"]}]}
        params = body.pop("parameters", {}) or {}
        body.pop("id", None)
        tensor = _only_item(body, "inputs", "KServe v2", "input tensor", "options go in 'parameters'")
        _check_v2_tensor(tensor)
        data = tensor["data"][0]
        if not isinstance(params, dict) or not isinstance(tensor.get("parameters", {}) or {}, dict):
            raise RequestError("KServe v2 body: 'parameters' must be an object", parameter="parameters")
        opts = dict(params)
        opts.update(tensor.get("parameters", {}) or {})
        opts.pop("content_type", None)
        return _b64(data, "KServe v2 inputs[0].data"), opts, "kserve-v2"
    else:
        kind = "json"
    if IMAGE_FIELD not in body:
        raise RequestError("JSON body has no 'data' field: send {\"data\": \"<base64 image>\", ...options}",
                           parameter=IMAGE_FIELD)
    image = _b64(body.pop(IMAGE_FIELD), f"JSON field '{IMAGE_FIELD}'")
    return image, body, kind


def extract(payload: Mapping[str, Any], headers: Mapping[str, Any],
            limits: Optional[Limits] = None) -> Tuple[bytes, Dict[str, Any], str]:
    """Split one TorchServe request into (encoded image bytes, raw options, request kind).

    Shapes (checked against TorchServe 0.12): raw body -> {"body": bytearray}; JSON with
    Content-Type application/json -> {"body": dict|list} (bytearray when it failed to parse);
    text/* -> {"body": str}; multipart -> {"data": bytes, "<field>": bytes, ...};
    form-urlencoded -> {"<field>": bytes} with no image at all.
    """
    if not isinstance(payload, Mapping):
        raise RequestError("unrecognized request payload")
    limits = limits or Limits()
    dups = (headers or {}).get(DUPLICATES_KEY)
    if dups:
        raise RequestError(f"multipart field(s) {clip_names(dups)} sent more than once; allowed: each field "
                           "once (which one would win is not defined)", parameter=cut(dups[0]))
    header_opts = _header_options(headers)
    content_type = ""
    for k, v in (headers or {}).items():
        if isinstance(k, str) and k.lower() == "content-type" and isinstance(v, str):
            content_type = v.lower()

    if "body" in payload:
        extra = sorted(set(payload) - {"body"})
        if extra:
            raise RequestError(f"unexpected form field(s) {clip_names(extra)} next to a body",
                               parameter=cut(extra[0]))
        body = payload["body"]
        if isinstance(body, (dict, list)):
            if json_depth_exceeds(body, limits.max_json_depth):
                raise _depth_error(limits.max_json_depth)
            image, opts, kind = _from_json(body)
        elif isinstance(body, str):
            raise RequestError(f"the body arrived as text (Content-Type {clip(content_type or 'text/*')}): "
                               "send the image as binary, e.g. curl -T cat.jpg or "
                               "--data-binary @cat.jpg -H 'Content-Type: image/jpeg'")
        elif isinstance(body, (bytes, bytearray)):
            raw = bytes(body)
            if "json" in content_type:
                try:
                    parsed = json.loads(raw.decode("utf-8"))
                except RecursionError:  # TorchServe's own json.loads failed on it the same way
                    raise _depth_error(limits.max_json_depth) from None
                except (UnicodeDecodeError, ValueError) as e:
                    raise RequestError(f"Content-Type is {clip(content_type)} but the body is not valid JSON: "
                                       f"{clip(str(e), 120)}", parameter="body") from None
                if json_depth_exceeds(parsed, limits.max_json_depth):
                    raise _depth_error(limits.max_json_depth)
                image, opts, kind = _from_json(parsed)
            else:
                image, opts, kind = raw, {}, "raw"
        else:
            raise RequestError(f"unrecognized body of type {type(body).__name__}")
    elif IMAGE_FIELD in payload:
        image = payload[IMAGE_FIELD]
        if isinstance(image, str):
            raise RequestError(f"multipart field '{IMAGE_FIELD}' arrived as text: attach the file "
                               f"with -F {IMAGE_FIELD}=@cat.jpg", parameter=IMAGE_FIELD)
        if not isinstance(image, (bytes, bytearray)):
            raise RequestError(f"multipart field '{IMAGE_FIELD}' is not a file", parameter=IMAGE_FIELD)
        image = bytes(image)
        opts = {k: v for k, v in payload.items() if k != IMAGE_FIELD}
        kind = "multipart"
    else:
        fields = sorted(payload)
        how = ("a form-urlencoded body (the default of curl -d and urllib) carries no image"
               if "x-www-form-urlencoded" in content_type else "no image in the request")
        raise RequestError(f"{how}; fields seen: {clip_names(fields)}. Send the image as the raw body "
                           f"(curl -T cat.jpg), as multipart field '{IMAGE_FIELD}' (-F {IMAGE_FIELD}=@cat.jpg) "
                           f"or as JSON {{\"{IMAGE_FIELD}\": \"<base64>\"}} with Content-Type application/json",
                           parameter=IMAGE_FIELD)

    # Options: body/form fields and X-Krypton-* headers; the same option twice must agree.
    merged: Dict[str, Any] = dict(header_opts)
    for k, v in opts.items():
        if k in merged and str(_text(k, merged[k])).lower() != str(_text(k, v)).lower():
            raise RequestError(f"option {k} given twice with different values: header "
                               f"{clip(merged[k])} and body {clip(_text(k, v))}", parameter=k)
        merged[k] = v
    return image, merged, kind


# --------------------------------------------------------------------------------------------
# Image decoding with limits, then model preprocessing
# --------------------------------------------------------------------------------------------

def _rawmodes(im: Image.Image) -> List[str]:
    modes = []
    for t in getattr(im, "tile", None) or []:
        args = t[3] if len(t) > 3 else None
        if isinstance(args, tuple):
            args = args[0] if args else None
        if isinstance(args, str):
            modes.append(args)
    return modes


def _describe_mode(im: Image.Image, sixteen: bool) -> Optional[str]:
    """None for plain 8-bit RGB; otherwise a description of what is wrong with the pixel format."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return f"16/32-bit grayscale (PIL mode {mode})"
    if mode == "F":
        return "32-bit float grayscale (PIL mode F)"
    if sixteen:
        return f"16 bits per channel (PIL mode {mode}, raw {'/'.join(_rawmodes(im))})"
    if mode == "RGB":
        return None
    if mode in ("L", "1"):
        return f"grayscale (PIL mode {mode})"
    if mode in ("LA", "La", "RGBA", "RGBa", "PA"):
        return f"with an alpha channel (PIL mode {mode})"
    if mode == "P":
        if "transparency" in im.info:
            return "palette with transparency (PIL mode P)"
        return None  # an 8-bit colour palette converts to RGB losslessly
    return f"PIL mode {mode}"


def decode_image(data: bytes, limits: Limits, allow_conversion: bool = False) -> Image.Image:
    """Decode to an 8-bit RGB PIL image, checking size limits before any pixel is decoded."""
    im = open_image(data, limits)
    return _decode(im, limits, allow_conversion)


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Open (not decode) an encoded image and check body size, format, pixel count and aspect ratio from
    its header: what can be refused before any pixel is decoded."""
    if data is None or len(data) == 0:
        raise RequestError("empty body: no image bytes were sent", parameter=IMAGE_FIELD)
    if len(data) > limits.max_body_bytes:
        raise RequestError(f"image is {len(data)} bytes; limit max_body_bytes={limits.max_body_bytes}",
                           status=413, parameter=IMAGE_FIELD)
    try:
        im = Image.open(io.BytesIO(data), formats=list(limits.formats))
    except Image.DecompressionBombError as e:
        raise RequestError(f"image dimensions are too large (decompression bomb protection): {e}",
                           status=413, parameter=IMAGE_FIELD) from None
    except Image.UnidentifiedImageError:
        raise RequestError(f"not an image: the {len(data)} bytes sent are not a readable "
                           f"{'/'.join(limits.formats)} file", parameter=IMAGE_FIELD) from None
    except Exception as e:  # corrupt headers raise assorted errors inside PIL plugins
        raise RequestError(f"truncated or corrupt image (header unreadable): {type(e).__name__}: {e}",
                           parameter=IMAGE_FIELD) from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise RequestError(f"image has empty dimensions {w}x{h}", parameter=IMAGE_FIELD)
    if w * h > limits.max_image_pixels:
        raise RequestError(f"image is {w}x{h} = {w * h} pixels; limit max_image_pixels="
                           f"{limits.max_image_pixels} (checked before decoding: decompression bomb "
                           "protection)", status=413, parameter=IMAGE_FIELD)
    try:  # a thin image is refused before its pixels are decoded too (the rest: preprocess)
        check_bounds(w, h, None, None, max_aspect_ratio=limits.max_aspect_ratio)
    except PreprocessError as e:
        raise RequestError(e.message, status=e.status, parameter=IMAGE_FIELD) from None
    return im


def _decode(im: Image.Image, limits: Limits, allow_conversion: bool) -> Image.Image:
    sixteen = any("16" in m for m in _rawmodes(im)) and im.mode not in ("I;16", "I;16B", "I;16L", "I;16N")
    problem = _describe_mode(im, sixteen)
    if problem is not None and not allow_conversion:
        raise RequestError(f"image pixel format not accepted: {problem}; send an 8-bit RGB image "
                           "(e.g. PIL: Image.open(f).convert('RGB').save('rgb.jpg'))",
                           parameter=IMAGE_FIELD)
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise RequestError(f"image too large (decompression bomb protection): {e}", status=413,
                           parameter=IMAGE_FIELD) from None
    except Exception as e:  # OSError "image file is truncated", SyntaxError, ValueError, zlib errors
        raise RequestError(f"truncated or corrupt image ({im.format}): {type(e).__name__}: {e}",
                           parameter=IMAGE_FIELD) from None
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:
        pass  # a broken EXIF block is not worth refusing the image for
    w, h = im.size  # what was decoded, not what the header said
    if w * h > limits.max_image_pixels:
        raise RequestError(f"decoded image is {w}x{h} = {w * h} pixels; limit max_image_pixels="
                           f"{limits.max_image_pixels}", status=413, parameter=IMAGE_FIELD)
    return _to_rgb(im)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a8 = np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([a8] * 3, axis=-1), "RGB")
    if im.mode == "F":
        a8 = np.clip(np.rint(np.asarray(im, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([a8] * 3, axis=-1), "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")  # as shown on a white page
    return im.convert("RGB")


def preprocess(im: Image.Image, pre: Preprocess, limits: Optional[Limits] = None):
    """PIL RGB -> (float32 tensor (3, H, W) normalized, uint8 array (H, W, 3) of the same view).

    krypton.preprocess (torchvision Resize(int, BILINEAR) + CenterCrop + ToTensor + Normalize, the one
    implementation the benchmark and the tuning scripts use too), with ``limits`` (default: ``Limits()``)
    checked before anything is resized: min_image_side, max_aspect_ratio, max_resized_pixels.
    """
    lim = limits or Limits()
    try:
        return preprocess_pil(im, pre.resize, pre.crop, pre.mean, pre.std, min_side=lim.min_image_side,
                              max_aspect_ratio=lim.max_aspect_ratio, max_resized_pixels=lim.max_resized_pixels)
    except PreprocessError as e:
        raise RequestError(e.message, status=e.status, parameter=IMAGE_FIELD) from None
