"""Exception types raised by gpt2onnx; every message is one line that names the problem."""

from __future__ import annotations


class GPT2OnnxError(Exception):
    """Base class of every error gpt2onnx raises on purpose."""


class InvalidInputError(GPT2OnnxError, ValueError):
    """A prompt, token id or generation option is not acceptable (CLI exit code 2). `option` names the generation
    option the message is about, when it is about one (the server reports it under its own field name)."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class BundleError(GPT2OnnxError):
    """A bundle folder is missing, incomplete, damaged or of an unknown format (CLI exit code 2)."""


class ProviderError(GPT2OnnxError):
    """The requested onnxruntime execution provider cannot be used here (CLI exit code 2)."""


class ExportError(GPT2OnnxError):
    """Exporting a checkpoint failed; nothing was left at the output path."""


def counted(count: int, noun: str) -> str:
    """'1 token', '3 tokens': a count for a message."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
