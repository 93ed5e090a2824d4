"""vlmguard: training-free jailbreak guards for vision-language models, as ONNX bundles.

`from vlmguard import GuardedVLM, export_bundle`: the runtime's classes and the exporter are
imported on first use, so the lean runtime never pulls in torch and the exporter only when it
is asked for. The public errors all derive from `VlmguardError`.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

from .errors import BundleError, UsageError, VlmguardError

try:
    __version__ = version("vlmguard")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

_LAZY = {  # name -> module that defines it (imported on first use, PEP 562)
    "GuardedVLM": ".runtime.guarded_vlm",
    "Result": ".runtime.request",
    "Sampling": ".runtime.sampling",
    "GuardPolicy": ".runtime.policy",
    "GuardReport": ".runtime.report",
    "TokenStream": ".runtime.generation",
    "ContextLengthError": ".runtime.request",
    "ModelRunError": ".runtime.request",
    "PolicyError": ".runtime.policy",
    "PromptError": ".runtime.prompting",
    "ImageInputError": ".runtime.image_preprocess",
    "export_bundle": ".export.exporter",
}

__all__ = ["BundleError", "UsageError", "VlmguardError", "__version__", *_LAZY]


def __getattr__(name: str) -> object:
    """Import the public classes lazily (PEP 562)."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'vlmguard' has no attribute {name!r}")
