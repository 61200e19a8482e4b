"""OpenAI's completions API in gpt2onnx terms: check a request body, then shape responses and stream chunks.

No web framework here: plain data in, plain data out, so the mapping can be read (and tested) on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gpt2onnx.runtime.errors import InvalidInputError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 4
MAX_SEQUENCES = 64  # prompts x n in one request: one batch of this many rows at most

# Request fields gpt2onnx cannot honour, with the one value each may take (what OpenAI does by default).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "echo": (False, None),
    "suffix": (None, ""),
    "presence_penalty": (0, None),
    "frequency_penalty": (0, None),
    "logit_bias": (None, {}),
}
KNOWN_FIELDS = {
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "logprobs",
    "stream",
    "stream_options",
    "best_of",
    "user",
    "top_k",  # extensions, as other OpenAI-compatible servers accept them
    "repetition_penalty",
    *NEUTRAL_VALUES,
}
# generate() option -> the request field that sets it, for error messages and `param`.
FIELD_OF_OPTION = {
    "max_new_tokens": "max_tokens",
    "num_return_sequences": "n",
    "top_logprobs": "logprobs",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
    "repetition_penalty": "repetition_penalty",
}


class RequestError(Exception):
    """A request the server refuses: HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.type = type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    """A checked /v1/completions body: the prompt(s), generate() options, and how to answer."""

    prompts: list[str] | None  # text prompts, or None when the prompt came as token ids
    input_ids: list[list[int]] | None
    n: int
    options: dict[str, Any]  # keyword arguments of GPT2Model.generator (generate()'s options)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None


def parse_completion_request(body: Any, model_id: str) -> CompletionRequest:
    """Check the JSON body's shape and what OpenAI's fields mean here (temperature 0 = greedy, limits on n, stop
    and logprobs), and map them to generate() options, whose own checks run in prepare()."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name in body:
        if name not in KNOWN_FIELDS:
            raise RequestError(f"unrecognized request argument supplied: {name}", param=name)
    for name, allowed in NEUTRAL_VALUES.items():
        if body.get(name) not in allowed:
            raise RequestError(f"{name} is not supported by this server", param=name, code="unsupported")
    model = body.get("model")
    if model is not None and model != model_id:
        raise RequestError(
            f"the model {model!r} does not exist; this server serves {model_id!r}",
            param="model",
            code="model_not_found",
            status=404,
        )
    prompts, input_ids = _prompt(body.get("prompt"))
    stream = _flag(body.get("stream"), "stream")
    include_usage = _stream_options(body.get("stream_options"), stream)
    n = _field(body, "n", 1)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise RequestError("best_of is supported only equal to n", param="best_of", code="unsupported")
    temperature = _field(body, "temperature", 1.0)
    greedy = _is_number(temperature) and temperature == 0
    if _is_number(temperature) and temperature < 0:
        raise RequestError(f"temperature must be >= 0 (0 means greedy), got {temperature}", param="temperature")
    if greedy and _is_int(n) and n > 1:
        raise RequestError(
            "n > 1 needs sampling: with temperature 0 every choice would be the same greedy text", param="n"
        )
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        raise RequestError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}", param="stop")
    logprobs = body.get("logprobs")
    if _is_int(logprobs) and logprobs > MAX_LOGPROBS:
        raise RequestError(f"logprobs must be <= {MAX_LOGPROBS}, got {logprobs}", param="logprobs")
    options: dict[str, Any] = {
        "max_new_tokens": _field(body, "max_tokens", DEFAULT_MAX_TOKENS),
        "do_sample": not greedy,
        "top_p": body.get("top_p"),
        "top_k": _field(body, "top_k", 0),  # OpenAI samples from the whole vocabulary
        "num_return_sequences": n,
        "seed": body.get("seed"),
        "stop": stop,
        "repetition_penalty": body.get("repetition_penalty"),
    }
    if not greedy:
        options["temperature"] = temperature
    if logprobs is not None:
        options.update(output_scores=True, top_logprobs=logprobs)
    return CompletionRequest(prompts, input_ids, n, options, stream, include_usage, logprobs)


def option_error(error: InvalidInputError) -> RequestError:
    """A generate() option error told in the request's own field names ('max_new_tokens ...' -> 'max_tokens ...')."""
    message, field_name = str(error), FIELD_OF_OPTION.get(error.option or "")
    if field_name is None or error.option is None:
        return RequestError(message)
    return RequestError(message.replace(error.option, field_name, 1), param=field_name)


def _field(body: dict[str, Any], name: str, default: Any) -> Any:
    """A field's value; absent and null both mean the default, as in OpenAI's API."""
    value = body.get(name)
    return default if value is None else value


def _prompt(prompt: Any) -> tuple[list[str] | None, list[list[int]] | None]:
    """Text prompts or token-id rows: a string, a list of strings, a list of ids, or a list of lists of ids."""
    shapes = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if prompt is None:
        raise RequestError("prompt is required", param="prompt")
    if isinstance(prompt, str):
        return [prompt], None
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(f"prompt must be {shapes} (not empty)", param="prompt")
    if all(isinstance(item, str) for item in prompt):
        return prompt, None
    if all(_is_int(item) for item in prompt):
        return None, [prompt]
    if all(isinstance(row, list) and row and all(_is_int(item) for item in row) for row in prompt):
        return None, prompt
    raise RequestError(f"prompt must be {shapes}", param="prompt")


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {value!r}", param=name)
    return value


def _stream_options(value: Any, stream: bool) -> bool:
    """Whether a stream should end with a usage chunk (stream_options.include_usage)."""
    if value is None:
        return False
    if not stream:
        raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(value, dict) or set(value) - {"include_usage"}:
        raise RequestError("stream_options must be an object with include_usage only", param="stream_options")
    return _flag(value.get("include_usage"), "stream_options.include_usage")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class TokenPiece:
    """One generated token as the response shows it: its share of the choice's text, and its log-probabilities."""

    text: str
    offset: int  # where `text` starts in the choice's text
    token: str
    logprob: float | None = None
    top: dict[str, float] | None = None


@dataclass
class Choice:
    """One returned completion (OpenAI's choice), with per-token pieces when they are to be shown or streamed."""

    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int
    pieces: list[TokenPiece] = field(default_factory=list)


def logprobs_body(pieces: Sequence[TokenPiece]) -> dict[str, Any]:
    """OpenAI's completions `logprobs` object of these tokens."""
    return {
        "tokens": [piece.token for piece in pieces],
        "token_logprobs": [piece.logprob for piece in pieces],
        "top_logprobs": [piece.top for piece in pieces],
        "text_offset": [piece.offset for piece in pieces],
    }


def usage_body(prompt_tokens: int, choices: Sequence[Choice]) -> dict[str, int]:
    completion_tokens = sum(choice.completion_tokens for choice in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def choice_body(index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(
    completion_id: str, created: int, model_id: str, choices: list[dict[str, Any]], usage: dict[str, int] | None
) -> dict[str, Any]:
    """A completion object (the whole answer, or one stream chunk when usage is None)."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model_id,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body
