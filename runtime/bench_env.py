"""What a benchmark ran on, its memory high-water marks and the memory-bandwidth roofline.

Lean: standard library, numpy and ONNX Runtime; GPU facts come from nvidia-smi (and the device
copy bandwidth from CuPy) only when they are there. The exporter side can measure it with torch
(export/bench_peers.py) where CuPy is missing.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vlmguard.manifest import Manifest

TEGRA_RELEASE = Path("/etc/nv_tegra_release")


def _cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi(query: str) -> list[list[str]]:
    """Rows of an nvidia-smi CSV query, or nothing when there is no NVIDIA driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line]


def _tensorrt_version() -> str | None:
    """TensorRT's version from its Python package or libnvinfer, if either is installed."""
    try:
        import tensorrt  # type: ignore[import-not-found]

        return str(tensorrt.__version__)
    except ImportError:
        pass
    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "libnvinfer.so"):
        try:
            version = ctypes.CDLL(name).getInferLibVersion()
        except (OSError, AttributeError):
            continue
        return f"{version // 10000}.{version // 100 % 100}.{version % 100}"
    return None


def _jetpack() -> str | None:
    """The L4T release line of a Jetson board (JetPack's base), if this is one."""
    try:
        return TEGRA_RELEASE.read_text().splitlines()[0].lstrip("# ").strip()
    except (OSError, IndexError):
        return None


def environment(providers_used: dict[str, list[str]]) -> dict:
    """The machine, library versions and the execution providers the sessions really use."""
    from onnxruntime.capi import build_and_package_info as build

    gpus = _nvidia_smi("gpu=name,driver_version,memory.total")
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "gpus": [{"name": g[0], "driver": g[1], "memory_mib": g[2]} for g in gpus if len(g) == 3],
        "onnxruntime": ort.__version__,
        "onnxruntime_package": getattr(build, "package_name", "onnxruntime"),
        "cuda": getattr(build, "cuda_version", None),
        "tensorrt": _tensorrt_version(),
        "jetpack_l4t": _jetpack(),
        "providers_available": ort.get_available_providers(),
        "providers_used": providers_used,
    }


def peak_host_mib() -> float:
    """This process's resident-memory high-water mark so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def device_memory_mib() -> float | None:
    """GPU memory this process holds now (nvidia-smi), or None without an NVIDIA GPU."""
    rows = _nvidia_smi("compute-apps=pid,used_memory")
    used = [float(r[1]) for r in rows if len(r) == 2 and r[0] == str(os.getpid())]
    return sum(used) if used else None


def host_copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Host memory bandwidth in bytes/s: a large array copy, bytes read plus written, best run."""
    source = np.ones(megabytes * (1 << 20) // 4, np.float32)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best


def copy_rate(
    copy: Callable[[], object], sync: Callable[[], object], nbytes: int, repeats: int
) -> float:
    """Bytes/s of a repeated device copy of `nbytes` (read plus written), after a warm-up copy."""
    copy()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        copy()
    sync()
    return 2 * nbytes * repeats / (time.perf_counter() - started)


def device_copy_bandwidth(megabytes: int = 1024, repeats: int = 10) -> float | None:
    """GPU memory bandwidth in bytes/s (device-to-device copy) through CuPy, if installed."""
    try:
        import cupy  # type: ignore[import-not-found]
    except ImportError:
        return None
    source = cupy.ones(megabytes * (1 << 20) // 4, cupy.float32)
    target = cupy.empty_like(source)
    return copy_rate(
        lambda: cupy.copyto(target, source), cupy.cuda.Device().synchronize, source.nbytes, repeats
    )


def decoder_weight_bytes(manifest: Manifest) -> int:
    """Bytes of the decoder's weights (its graph file and external data) as the manifest lists."""
    stem = manifest.graphs["decoder"].file
    return sum(r["size"] for name, r in manifest.files.items() if name.startswith(stem))


def kv_bytes_per_token(manifest: Manifest, context_tokens: int) -> int:
    """Bytes of past keys and values one decode step reads at a given context length."""
    total = 0
    for spec in manifest.graphs["decoder"].inputs:
        if spec.name.startswith("past_key_values."):
            _, heads, _, dim = spec.dims
            total += heads * dim * context_tokens * np.dtype(spec.dtype).itemsize
    return total


def roofline(
    manifest: Manifest,
    context_tokens: int,
    tokens_per_s: float,
    bandwidth: float | None,
    memory: str,
) -> dict[str, float | str | None]:
    """Decode tokens/s as a fraction of what memory bandwidth allows (weights + KV per token)."""
    weights = decoder_weight_bytes(manifest)
    kv = kv_bytes_per_token(manifest, context_tokens)
    record: dict[str, float | str | None] = {
        "weight_bytes_per_token": weights,
        "kv_bytes_per_token": kv,
        "memory": memory,
        "copy_bandwidth_gb_s": None if bandwidth is None else bandwidth / 1e9,
        "roofline_tokens_per_s": None,
        "fraction": None,
    }
    if bandwidth is None:
        record["note"] = f"no way to measure {memory} bandwidth here (install CuPy)"
        return record
    ceiling = bandwidth / (weights + kv)
    record["roofline_tokens_per_s"] = ceiling
    record["fraction"] = tokens_per_s / ceiling
    return record
