"""The offline half: export of guarded vision-language models to ONNX bundles."""
