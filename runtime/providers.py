"""Execution providers: short names, the TensorRT -> CUDA -> CPU default, and their options.

An explicitly requested provider that cannot run here is refused in one line, unless the
request lists a fallback after it (`cuda,cpu`): then the fallback is stated once on the
`vlmguard.runtime` logger and the report's providers show it. The default (no request) takes
the best provider that runs, silently. ONNX Runtime's own messages about a provider it cannot
create are silenced wherever this module handles that case (VLMGUARD_DEBUG=1 keeps them).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnxruntime as ort

from vlmguard.errors import DEBUG_ENV, BundleError, VlmguardError
from vlmguard.manifest import GraphRecord

log = logging.getLogger("vlmguard.runtime")

SHORT_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEFAULT_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
ORT_DEFAULT_SEVERITY = 2  # onnxruntime's own default for its process-wide logger (warning)

# A one-node ONNX model (y = Identity(x), float[1], opset 13), protobuf-encoded by hand so the
# runtime can try a provider without the `onnx` package: ORT drops a provider it cannot create
# from the session, which is how we learn that it cannot run here.
_PROBE_MODEL = (
    b'\x08\x08B\x02\x10\r:;\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x05probeZ\x0f\n\x01x'
    b"\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n"
    b"\x02\x08\x01"
)
_probed: dict[str, str | None] = {}  # provider -> why it cannot run here (None: it runs)
_stated: set[str] = set()  # fallbacks already logged in this process


class ProviderError(VlmguardError):
    """A requested execution provider is unknown, not offered, or cannot run on this machine."""


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def quiet_onnxruntime() -> Iterator[io.StringIO]:
    """Silence ORT's process-wide logger and capture what `preload_dlls` prints.

    ORT logs provider-creation failures (several lines per session) on its default logger, not
    the session's; `preload_dlls` prints every library it misses. Yields the captured prints.
    """
    captured = io.StringIO()
    if _debug():
        yield captured
        return
    ort.set_default_logger_severity(4)  # fatal only
    try:
        with contextlib.redirect_stdout(captured):
            yield captured
    finally:
        ort.set_default_logger_severity(ORT_DEFAULT_SEVERITY)


def unavailable_reason(name: str, try_session: bool = True) -> str | None:
    """Why provider `name` cannot run on this machine, or None when it can (cached).

    The NVIDIA driver (and TensorRT's library) must load; then, with `try_session`, ORT must
    create the provider for a one-node graph (that catches missing CUDA or cuDNN libraries).
    """
    if name == "CPUExecutionProvider" or name not in GPU_PROVIDERS:
        return None
    if not _loads("libcuda.so.1", "nvcuda.dll"):
        return "no NVIDIA driver here (libcuda.so.1 does not load)"
    if name == "TensorrtExecutionProvider" and not _loads("libnvinfer.so.10", "nvinfer_10.dll"):
        return "TensorRT's library libnvinfer.so.10 does not load"
    if not try_session:
        return None
    if name not in _probed:
        _probed[name] = _try_session(name)
    return _probed[name]


def _try_session(name: str) -> str | None:
    """Create `name` for the one-node probe graph; None if ORT kept it, else why not."""
    settings = ort.SessionOptions()
    settings.log_severity_level = 4
    with quiet_onnxruntime() as printed:
        _preload_cuda_libraries()
        try:
            session = ort.InferenceSession(_PROBE_MODEL, sess_options=settings, providers=[name])
            kept = name in session.get_providers()
        except Exception as err:  # ORT raises several types; all mean "it will not run here"
            text = str(err).strip()
            return f"ONNX Runtime could not create it ({text.splitlines()[0] if text else err!r})"
    if kept:
        return None
    missing = [
        line.split(":")[0].removeprefix("Failed to load ").strip()
        for line in printed.getvalue().splitlines()
        if line.startswith("Failed to load")
    ]
    libraries = f"; missing {', '.join(missing[:3])}" if missing else ""
    return (
        f"ONNX Runtime could not create it (its CUDA/cuDNN libraries do not load{libraries}; "
        "see https://onnxruntime.ai/docs/install/#cuda-and-cudnn)"
    )


def resolve_providers(requested: list[str] | str | None) -> list[str]:
    """Full provider names: the requested ones (short or full) or the best that run here.

    A requested provider that cannot run here is an error, unless a provider listed after it
    runs: then it is dropped and the fallback is logged once.
    """
    available = ort.get_available_providers()
    if requested is None:
        # onnxruntime-gpu lists CUDA/TensorRT even where no GPU exists; ask for them only where
        # they run (driver, TensorRT's library, CUDA's libraries), so CPU machines get no
        # failed-provider noise. TensorRT is not tried on a graph here: that builds an engine.
        return [
            name
            for name in DEFAULT_ORDER
            if name in available
            and unavailable_reason(name, try_session=name != "TensorrtExecutionProvider") is None
        ]
    if isinstance(requested, str):
        requested = [part.strip() for part in requested.split(",") if part.strip()]
    names: list[str] = []
    for entry in requested:
        name = SHORT_NAMES.get(entry.lower(), entry)
        if name not in available:
            raise ProviderError(
                f"execution provider {entry!r} is not offered by this onnxruntime "
                f"({ort.__version__}: {', '.join(available)}); install onnxruntime-gpu for "
                "CUDA/TensorRT, or pass --providers cpu"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise ProviderError("--providers names no provider; e.g. --providers cuda,cpu")
    reasons = {name: unavailable_reason(name) for name in names}
    usable = [name for name in names if reasons[name] is None]
    if not usable:
        entry = requested[0]
        raise ProviderError(
            f"execution provider {entry!r} cannot run here: {reasons[names[0]]}; pass "
            f"--providers cpu, or list the fallback to accept it (--providers {entry},cpu)"
        )
    for name in names:
        if reasons[name] is not None:
            _state_fallback(name, reasons[name], usable)
    return usable


def _state_fallback(name: str, reason: str, used: list[str]) -> None:
    """Log, once per process, that a requested provider is replaced by the listed fallback."""
    if name in _stated:
        return
    _stated.add(name)
    log.warning(
        "vlmguard: %s cannot run here: %s; falling back to %s as requested",
        name,
        reason,
        ", ".join(used),
    )


def _loads(linux_name: str, windows_name: str) -> bool:
    """Whether a shared library (the NVIDIA driver, TensorRT) can be loaded on this machine."""
    try:
        ctypes.CDLL(linux_name if sys.platform != "win32" else windows_name)
    except OSError:
        return False
    return True


def _preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from pip's nvidia-* packages when present (ORT >= 1.21 knows where)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # best effort: the system's libraries may serve instead
            pass


def engine_cache_dir(bundle_sha: str, device: str = "gpu0") -> Path:
    """TensorRT engine/timing cache folder keyed by bundle hash, ORT and TRT versions, device."""
    try:
        trt_version = version("tensorrt")
    except PackageNotFoundError:  # JetPack installs TensorRT outside pip
        trt_version = os.environ.get("TRT_VERSION", "system")
    device = f"{device}:{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"
    key = hashlib.sha256(f"{bundle_sha}|{ort.__version__}|{trt_version}|{device}".encode())
    root = Path(os.environ.get("VLMGUARD_CACHE", Path.home() / ".cache" / "vlmguard"))
    return root / "trt" / key.hexdigest()[:16]


def trt_profiles(graph: GraphRecord, context: int, max_batch: int = 4) -> dict[str, str]:
    """TensorRT's explicit min/opt/max shape profiles for one graph's dynamic inputs.

    The decoder's axes are known here; a family's own axes (tiles, patches) come with the
    graph's record in guard_config.json as `"axes": {name: [min, opt, max]}`.
    """
    ranges = {  # axis name -> (min, opt, max)
        "batch_size": (1, 1, max_batch),
        "num_images": (1, 1, max_batch),
        "sequence_length": (1, 1, context),
        "past_sequence_length": (0, context // 2, context),
        "total_sequence_length": (1, context // 2, context),
        "guard_positions_length": (0, 0, context),
    } | {name: tuple(bounds) for name, bounds in graph.axes.items()}
    shapes: dict[str, list[str]] = {"min": [], "opt": [], "max": []}
    for spec in graph.inputs:
        if not any(isinstance(d, str) for d in spec.dims):
            continue
        unknown = [d for d in spec.dims if isinstance(d, str) and d not in ranges]
        if unknown:
            raise BundleError(
                f"{graph.file}: input {spec.name} has axis {unknown[0]!r} with no TensorRT "
                "range; re-export the bundle (its graph record must list the axis under 'axes')"
            )
        for which, index in (("min", 0), ("opt", 1), ("max", 2)):
            dims = [str(ranges[d][index]) if isinstance(d, str) else str(d) for d in spec.dims]
            shapes[which].append(f"{spec.name}:{'x'.join(dims) or '1'}")
    return {f"trt_profile_{k}_shapes": ",".join(v) for k, v in shapes.items() if v}


def provider_options(
    names: list[str],
    bundle_sha: str,
    profiles: dict[str, str] | None = None,
    overrides: dict[str, dict] | None = None,
) -> list[dict]:
    """Options per provider: TensorRT fp16 + engine/timing caches + shape profiles."""
    options = []
    for name in names:
        opts: dict = {}
        if name == "TensorrtExecutionProvider":
            cache = engine_cache_dir(bundle_sha)
            opts = {
                "trt_fp16_enable": True,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
            }
            opts |= profiles or {}
        opts |= (overrides or {}).get(name, {})
        options.append(opts)
    return options


def create_session(
    path: Path, providers: list[str], options: list[dict], threads: int | None = None
) -> ort.InferenceSession:
    """An inference session, with a one-line error if the graph cannot be loaded.

    A provider ORT drops while creating the session is an error when `providers` lists no CPU
    fallback (the user asked for exactly these), else a fallback stated once.
    """
    settings = ort.SessionOptions()
    settings.log_severity_level = 3
    if threads:
        settings.intra_op_num_threads = threads
    # A request alternates between several sessions (detector, vision, embed, decoder); idle
    # pools that spin-wait steal the cores the next session needs (`vlmguard bench`, 2-core
    # CPU: tiny decode 4x faster, detector 5x faster without spinning).
    settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
    gpu = any(name in GPU_PROVIDERS for name in providers)
    try:
        with quiet_onnxruntime() if gpu else contextlib.nullcontext():
            if gpu:
                _preload_cuda_libraries()
            session = ort.InferenceSession(
                str(path), sess_options=settings, providers=providers, provider_options=options
            )
    except Exception as err:  # ORT raises several types; all mean "this graph will not load"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BundleError(f"cannot load {path.name}: {first_line}; re-export the bundle") from err
    dropped = [name for name in providers if name not in session.get_providers()]
    if dropped and "CPUExecutionProvider" not in providers:
        raise ProviderError(
            f"execution provider {dropped[0]} did not start for {path.name} (ONNX Runtime "
            "dropped it); rerun with VLMGUARD_DEBUG=1 to see why, or add the fallback: "
            "--providers ...,cpu"
        )
    for name in dropped:
        _state_fallback(name, f"ONNX Runtime dropped it for {path.name}", session.get_providers())
    return session
