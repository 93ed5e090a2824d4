"""vlmguard: training-free jailbreak guards for vision-language models, as ONNX bundles."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vlmguard")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
