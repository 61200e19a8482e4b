"""Chat templates: a conversation (messages) rendered into the prompt text a model was trained on.

GPT-2 has none of its own; gpt2-serve takes one with --chat-template FILE: a Jinja template, rendered the way
transformers' apply_chat_template and vLLM render one (a sandboxed environment with trim_blocks and lstrip_blocks,
the loop-control extension, `messages`, `add_generation_prompt=True`, `bos_token`, `eos_token` and
`raise_exception(message)`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpt2onnx.runtime.errors import InvalidInputError

NO_TEMPLATE = (
    "GPT-2 has no chat template, and this server was started without one: start gpt2-serve with --chat-template "
    "FILE (a Jinja template, as transformers' apply_chat_template takes; examples/chat_template.jinja is one), or "
    "use /v1/completions with a prompt"
)


class TemplateError(Exception):
    """The template refused the conversation (its raise_exception), or failed to render it."""


class ChatTemplate:
    """A compiled chat template."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", name: str = "template") -> None:
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:  # pragma: no cover - jinja2 comes with the serve extra
            raise InvalidInputError("chat templates need jinja2: pip install 'gpt2-onnx[serve]'") from None

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.globals["raise_exception"] = raise_exception
        try:
            self._template = environment.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise InvalidInputError(f"chat template {name}, line {error.lineno}: {error.message}") from None
        self._special = {"bos_token": bos_token, "eos_token": eos_token}

    @classmethod
    def from_file(cls, path: str | Path, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        try:
            source = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise InvalidInputError(f"--chat-template {path}: {reason}") from None
        return cls(source, bos_token, eos_token, name=str(path))

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for these messages, ending where the assistant's answer begins."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._special)
        except TemplateError:
            raise
        except Exception as error:  # jinja2 raises its own types (undefined names, sandbox refusals, ...)
            raise TemplateError(f"{type(error).__name__}: {error}") from None
