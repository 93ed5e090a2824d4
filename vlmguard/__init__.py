"""vlmguard: training-free jailbreak guards for vision-language models, as ONNX bundles.

`from vlmguard import GuardedVLM, export_bundle`: both are imported on first use, so the lean
runtime never pulls in torch and the exporter only when it is asked for.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vlmguard")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["GuardPolicy", "GuardReport", "GuardedVLM", "__version__", "export_bundle"]


def __getattr__(name: str) -> object:
    """Import the public classes lazily (PEP 562)."""
    if name == "GuardedVLM":
        from .runtime.guarded_vlm import GuardedVLM

        return GuardedVLM
    if name == "GuardPolicy":
        from .runtime.policy import GuardPolicy

        return GuardPolicy
    if name == "GuardReport":
        from .runtime.report import GuardReport

        return GuardReport
    if name == "export_bundle":
        from .export.exporter import export_bundle

        return export_bundle
    raise AttributeError(f"module 'vlmguard' has no attribute {name!r}")
