"""gpt2onnx: run GPT-2 from an ONNX bundle with onnxruntime, numpy and tokenizers; no PyTorch at run time.

import gpt2onnx
model = gpt2onnx.load("models/gpt2")
print(model.generate("Artificial intelligence", max_new_tokens=20).text)
"""

from gpt2onnx.runtime import BundleError, GenerationOptions, GPT2OnnxError, InvalidInputError, ProviderError

__version__ = "0.1.0"
__all__ = [
    "BundleError",
    "GPT2OnnxError",
    "GenerationOptions",
    "Generator",
    "InvalidInputError",
    "ProviderError",
    "__version__",
    "load",
]


def __getattr__(name: str):
    # `load` and `Generator` pull in onnxruntime; keep `import gpt2onnx` (and the exporter's use of the bundle
    # format) free of it.
    if name == "load":
        from gpt2onnx.runtime.model import load

        return load
    if name == "Generator":
        from gpt2onnx.runtime.generator import Generator

        return Generator
    raise AttributeError(name)
