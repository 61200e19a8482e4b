"""Imports onnxruntime, or explains which extra installs it."""

from __future__ import annotations

try:
    import onnxruntime as ort
except ImportError as error:  # pragma: no cover - exercised only without onnxruntime
    raise ImportError(
        "gpt2onnx needs onnxruntime: install it with `pip install 'gpt2-onnx[cpu]'` "
        "(or `pip install 'gpt2-onnx[gpu]'` for the CUDA provider)"
    ) from error

__all__ = ["ort"]
