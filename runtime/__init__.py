"""The lean online half: preprocessing and ONNX Runtime sessions; never imports torch or transformers."""
