"""The light runtime: onnxruntime, numpy and tokenizers only; never torch or transformers."""

from .errors import BundleError, GPT2OnnxError, InvalidInputError, ProviderError
from .options import GenerationOptions

__all__ = [
    "BundleError",
    "GPT2OnnxError",
    "GenerationOptions",
    "Generator",
    "InvalidInputError",
    "ProviderError",
    "load",
]


def __getattr__(name: str):
    if name == "load":
        from .model import load

        return load
    if name == "Generator":
        from .generator import Generator

        return Generator
    raise AttributeError(name)
