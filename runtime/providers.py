"""Execution providers: short names, the TensorRT -> CUDA -> CPU default, and their options."""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import onnxruntime as ort

from vlmguard.errors import BundleError, VlmguardError
from vlmguard.manifest import GraphRecord

SHORT_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
DEFAULT_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class ProviderError(VlmguardError):
    """A requested execution provider is unknown or not offered by the installed onnxruntime."""


def resolve_providers(requested: list[str] | str | None) -> list[str]:
    """Full provider names: the requested ones (short or full) or the best installed ones."""
    available = ort.get_available_providers()
    if requested is None:
        # onnxruntime-gpu lists CUDA/TensorRT even where no GPU exists; ask for them only when
        # an NVIDIA driver is present, so CPU machines get no failed-provider noise.
        # TensorRT likewise only where its library loads (ORT would log an error and skip it).
        usable = {"CPUExecutionProvider"}
        if _loads("libcuda.so.1", "nvcuda.dll"):
            usable.add("CUDAExecutionProvider")
            if _loads("libnvinfer.so.10", "nvinfer_10.dll"):
                usable.add("TensorrtExecutionProvider")
        return [name for name in DEFAULT_ORDER if name in available and name in usable]
    if isinstance(requested, str):
        requested = [part.strip() for part in requested.split(",") if part.strip()]
    names = []
    for entry in requested:
        name = SHORT_NAMES.get(entry.lower(), entry)
        if name not in available:
            raise ProviderError(
                f"execution provider {entry!r} is not offered by this onnxruntime "
                f"({ort.__version__}: {', '.join(available)}); install onnxruntime-gpu for "
                "CUDA/TensorRT, or pass --providers cpu"
            )
        names.append(name)
    return names


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
    """An inference session, with a one-line error if the graph cannot be loaded."""
    settings = ort.SessionOptions()
    settings.log_severity_level = 3
    if threads:
        settings.intra_op_num_threads = threads
    # A request alternates between several sessions (detector, vision, embed, decoder); idle
    # pools that spin-wait steal the cores the next session needs (`vlmguard bench`, 2-core
    # CPU: tiny decode 4x faster, detector 5x faster without spinning).
    settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if "CUDAExecutionProvider" in providers or "TensorrtExecutionProvider" in providers:
        _preload_cuda_libraries()
    try:
        return ort.InferenceSession(
            str(path), sess_options=settings, providers=providers, provider_options=options
        )
    except Exception as err:  # ORT raises several types; all mean "this graph will not load"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BundleError(f"cannot load {path.name}: {first_line}; re-export the bundle") from err
