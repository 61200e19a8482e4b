"""The light runtime: onnxruntime, numpy and tokenizers only; never torch or transformers."""

from .errors import BundleError, GPT2OnnxError, InvalidInputError, ProviderError
from .options import GenerationOptions

__all__ = ["BundleError", "GPT2OnnxError", "GenerationOptions", "InvalidInputError", "ProviderError", "load"]


def __getattr__(name: str):
    if name == "load":
        from .model import load

        return load
    raise AttributeError(name)
