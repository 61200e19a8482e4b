"""OpenAI's completions and chat completions APIs in gpt2onnx terms: check a request body, then shape responses
and stream chunks.

No web framework here: plain data in, plain data out, so the mapping can be read (and tested) on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gpt2onnx.runtime.errors import InvalidInputError

from .chat import NO_TEMPLATE, ChatTemplate, TemplateError

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 256  # chat answers are longer; a prompt plus this must still fit the context
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 4

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
CHAT_FIELDS = (KNOWN_FIELDS - {"prompt", "logprobs", "best_of"}) | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
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
    _check_fields(body, KNOWN_FIELDS, model_id)
    prompts, input_ids = _prompt(body.get("prompt"))
    logprobs = body.get("logprobs")
    if _is_int(logprobs) and logprobs > MAX_LOGPROBS:
        raise RequestError(f"logprobs must be <= {MAX_LOGPROBS}, got {logprobs}", param="logprobs")
    best_of = body.get("best_of")
    if best_of is not None and best_of != _field(body, "n", 1):
        raise RequestError("best_of is supported only equal to n", param="best_of", code="unsupported")
    return _request(body, prompts, input_ids, _field(body, "max_tokens", DEFAULT_MAX_TOKENS), logprobs)


def parse_chat_request(body: Any, model_id: str, template: ChatTemplate | None) -> CompletionRequest:
    """/v1/chat/completions: the messages rendered by the chat template into one prompt, and the same options as a
    completion (max_tokens or max_completion_tokens; logprobs true with top_logprobs)."""
    _check_fields(body, CHAT_FIELDS, model_id)
    messages = _messages(body.get("messages"))
    if template is None:
        raise RequestError(NO_TEMPLATE, param="messages", code="chat_template_missing")
    try:
        prompt = template.render(messages)
    except TemplateError as error:
        raise RequestError(f"the chat template refused the messages: {error}", param="messages") from None
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise RequestError("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    max_tokens = _field(body, "max_completion_tokens", _field(body, "max_tokens", DEFAULT_CHAT_MAX_TOKENS))
    with_logprobs = _flag(body.get("logprobs"), "logprobs")
    top = body.get("top_logprobs")
    if top is not None and not with_logprobs:
        raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= MAX_LOGPROBS):
        raise RequestError(
            f"top_logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {top!r}", param="top_logprobs"
        )
    return _request(body, [prompt], None, max_tokens, (top or 0) if with_logprobs else None)


def _check_fields(body: Any, known: set[str], model_id: str) -> None:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name in body:
        if name not in known:
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


def _request(
    body: dict[str, Any],
    prompts: list[str] | None,
    input_ids: list[list[int]] | None,
    max_tokens: Any,
    logprobs: int | None,
) -> CompletionRequest:
    """The generate() options of the sampling fields both endpoints share."""
    stream = _flag(body.get("stream"), "stream")
    include_usage = _stream_options(body.get("stream_options"), stream)
    n = _field(body, "n", 1)
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
    options: dict[str, Any] = {
        "max_new_tokens": max_tokens,
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


def _messages(value: Any) -> list[dict[str, Any]]:
    """OpenAI's messages: a non-empty list of {role, content}; content a string or a list of text parts."""
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    messages = []
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(f"{where} must be an object with a string role", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                raise RequestError(f"{where}.content: only text parts are supported", param="messages")
            content = "".join(str(part.get("text", "")) for part in content)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string or a list of text parts", param="messages")
        messages.append({**message, "content": content})
    return messages


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


def chat_logprobs_body(pieces: Sequence[TokenPiece]) -> dict[str, Any]:
    """OpenAI's chat `logprobs` object: per token its text, log-probability, UTF-8 bytes and the best alternatives."""

    def entry(token: str, logprob: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {
                **entry(piece.token, piece.logprob),
                "top_logprobs": [entry(token, value) for token, value in (piece.top or {}).items()],
            }
            for piece in pieces
        ]
    }


class CompletionAnswer:
    """/v1/completions' shapes: text_completion objects, `text` per choice."""

    id_prefix, whole_object, chunk_object = "cmpl", "text_completion", "text_completion"

    def whole_choice(self, choice: Choice, with_logprobs: bool) -> dict[str, Any]:
        return choice_body(choice.index, choice.text, choice.finish_reason, _logprobs_of(choice.pieces, with_logprobs))

    def piece_choice(self, index: int, piece: TokenPiece, with_logprobs: bool) -> dict[str, Any]:
        return choice_body(index, piece.text, None, logprobs_body([piece]) if with_logprobs else None)

    def end_choice(self, index: int, finish_reason: str) -> dict[str, Any]:
        return choice_body(index, "", finish_reason, None)

    def start_choice(self, index: int) -> dict[str, Any] | None:
        return None


class ChatAnswer:
    """/v1/chat/completions' shapes: chat.completion objects, an assistant `message` (or `delta`) per choice."""

    id_prefix, whole_object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def whole_choice(self, choice: Choice, with_logprobs: bool) -> dict[str, Any]:
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": chat_logprobs_body(choice.pieces) if with_logprobs else None,
            "finish_reason": choice.finish_reason,
        }

    def piece_choice(self, index: int, piece: TokenPiece, with_logprobs: bool) -> dict[str, Any]:
        logprobs = chat_logprobs_body([piece]) if with_logprobs else None
        return {"index": index, "delta": {"content": piece.text}, "logprobs": logprobs, "finish_reason": None}

    def end_choice(self, index: int, finish_reason: str) -> dict[str, Any]:
        return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}

    def start_choice(self, index: int) -> dict[str, Any] | None:
        """A stream's first chunk of each choice names the role, as OpenAI's do."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def _logprobs_of(pieces: Sequence[TokenPiece], with_logprobs: bool) -> dict[str, Any] | None:
    return logprobs_body(pieces) if with_logprobs else None


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
    completion_id: str,
    created: int,
    model_id: str,
    choices: list[dict[str, Any]],
    usage: dict[str, int] | None,
    kind: str = "text_completion",
) -> dict[str, Any]:
    """A completion object (the whole answer, or one stream chunk when usage is None) of this `object` kind."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": kind,
        "created": created,
        "model": model_id,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body
