"""The Starlette application: OpenAI-style /v1/completions, /v1/chat/completions and /v1/models, /health, /metrics.

Every request goes through the scheduler (serve/scheduler.py): one decode batch for all of them.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gpt2onnx.runtime.errors import InvalidInputError
from gpt2onnx.runtime.model import GPT2Model

from . import DEFAULT_MAX_BATCH
from .chat import ChatTemplate
from .protocol import (
    ChatAnswer,
    Choice,
    CompletionAnswer,
    CompletionRequest,
    RequestError,
    completion_body,
    option_error,
    parse_chat_request,
    parse_completion_request,
    usage_body,
)
from .scheduler import Job, Overloaded, Scheduler, TooLarge
from .stepping import join_choices

MAX_BODY_BYTES = 1 << 20
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Answer = CompletionAnswer | ChatAnswer


def create_app(
    model: GPT2Model,
    max_batch: int = DEFAULT_MAX_BATCH,
    queue_size: int = 8,
    model_id: str | None = None,
    chat_template: ChatTemplate | None = None,
) -> Starlette:
    """The server for one loaded model: one decode batch of `max_batch` rows for every request, `queue_size` more
    requests waiting, 503 beyond. model_id: the id the API shows and accepts (default: the bundle's source model).
    chat_template: renders /v1/chat/completions' messages (without one, that route answers 400)."""
    if model.manifest.tokenizer_path is None:  # every answer is text: refuse now, not on each request
        raise InvalidInputError(f"bundle {model.manifest.folder} has no tokenizer, and the server answers with text")
    scheduler = Scheduler(model, max_batch, queue_size)
    created = int(time.time())
    model_id = model_id or model.name

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id, "provider": model.provider})

    async def metrics(request: Request) -> Response:
        return JSONResponse(scheduler.snapshot())

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "gpt2-onnx"}

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def get_model(request: Request) -> Response:
        if request.path_params["model_id"] != model_id:
            raise RequestError(
                f"the model {request.path_params['model_id']!r} does not exist",
                param="model",
                code="model_not_found",
                status=404,
            )
        return JSONResponse(model_card())

    async def completions(request: Request) -> Response:
        parsed = parse_completion_request(await read_json(request), model_id)
        return await answer(request, parsed, CompletionAnswer())

    async def chat_completions(request: Request) -> Response:
        parsed = parse_chat_request(await read_json(request), model_id, chat_template)
        return await answer(request, parsed, ChatAnswer())

    async def answer(request: Request, parsed: CompletionRequest, shape: Answer) -> Response:
        rows = await run_in_threadpool(prepare, model, parsed)
        generator = model.generator(**parsed.options)
        generator.append_tokens(rows)
        try:
            job = scheduler.submit(generator)
        except TooLarge:
            message = f"prompts x n = {generator.rows} rows is more than this server's batch of {max_batch}"
            raise RequestError(message, param="n") from None
        prompt_tokens = sum(map(len, rows))
        body = partial(completion_body, f"{shape.id_prefix}-{uuid.uuid4().hex}", int(time.time()), model_id)
        if parsed.stream:
            return event_stream(
                stream_events(parsed, job, shape, partial(body, kind=shape.chunk_object), prompt_tokens)
            )
        choices = await unless_disconnected(request, job, len(rows) * parsed.n)
        if choices is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        with_logprobs = parsed.logprobs is not None
        bodies = [shape.whole_choice(choice, with_logprobs) for choice in choices]
        return JSONResponse(body(bodies, usage_body(prompt_tokens, choices), kind=shape.whole_object))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(scheduler.close)  # after the last connection: running requests finish first

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/models", list_models),
            Route("/v1/models/{model_id:path}", get_model),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={
            RequestError: request_error,
            Overloaded: overloaded,
            HTTPException: http_error,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler
    return app


def prepare(model: GPT2Model, parsed: CompletionRequest) -> list[list[int]]:
    """Check the options as generate() will, and tokenize the prompts (run in a thread: prompts may be long)."""
    try:
        options = model.options(**parsed.options)
    except InvalidInputError as error:
        raise option_error(error) from None
    try:
        rows = model.encode(parsed.prompts, parsed.input_ids).rows
    except InvalidInputError as error:
        raise RequestError(str(error), param="prompt") from None
    try:
        model.check_context(rows, options.max_new_tokens)
    except InvalidInputError as error:
        raise RequestError(str(error), param="max_tokens", code="context_length_exceeded") from None
    if not model.session.interface.position_ids and len({len(row) for row in rows}) > 1:
        raise RequestError(
            "this model's graph takes no position_ids, so the prompts of one request must have the same number of "
            "tokens: send prompts of different lengths as separate requests",
            param="prompt",
            code="unsupported",
        )
    return rows


async def read_json(request: Request) -> Any:
    """The JSON body, refused with 413 past MAX_BODY_BYTES (whether or not Content-Length says so up front)."""
    too_large = RequestError(
        f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large", status=413
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise RequestError("the request body is not valid JSON") from None


async def unless_disconnected(request: Request, job: Job, count: int) -> list[Choice] | None:
    """The job's choices; None if the client went away first (the scheduler then drops it at its next step)."""

    async def collected() -> list[Choice]:
        return join_choices([updates async for updates in job.updates()], count)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watcher = asyncio.ensure_future(collected()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        job.cancel()
        work.cancel()
        return None
    return work.result()


async def stream_events(
    parsed: CompletionRequest,
    job: Job,
    shape: Answer,
    chunk: partial[dict[str, Any]],
    prompt_tokens: int,
) -> AsyncGenerator[dict[str, Any], None]:
    """Chunks as the scheduler steps the request: each choice's new text (with its logprobs when asked) and its end;
    then the usage when asked. The request is dropped if the client leaves."""
    usage = {"usage": None} if parsed.include_usage else {}
    with_logprobs = parsed.logprobs is not None
    completion_tokens = 0
    try:
        for index in range(job.rows):
            start = shape.start_choice(index)
            if start is not None:
                yield {**chunk([start], None), **usage}
        try:
            async for updates in job.updates():
                for update in updates:
                    completion_tokens += 1
                    if update.piece.text or with_logprobs:
                        yield {**chunk([shape.piece_choice(update.index, update.piece, with_logprobs)], None), **usage}
                    if update.finish_reason is not None:
                        yield {**chunk([shape.end_choice(update.index, update.finish_reason)], None), **usage}
        except Exception as error:
            yield failure(error)
            return
        if parsed.include_usage:
            total = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
            yield chunk([], {**total, "total_tokens": prompt_tokens + completion_tokens})
    finally:
        job.cancel()  # a no-op once it has ended; a client that left stops it at the next step


def failure(error: BaseException) -> dict[str, Any]:
    """The error event that ends a stream whose generation failed after the answer had started."""
    return RequestError(f"generation failed: {error!r}", type="server_error", status=500).body()


def event_stream(events: AsyncGenerator[dict[str, Any], None]) -> StreamingResponse:
    """Server-sent events in OpenAI's format: `data: {json}` per chunk, then `data: [DONE]`."""

    async def lines() -> AsyncIterator[str]:
        async for event in events:
            yield "data: " + json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers=SSE_HEADERS)


async def request_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestError)
    return JSONResponse(error.body(), status_code=error.status)


async def overloaded(request: Request, error: Exception) -> Response:
    body = RequestError(
        "the server is busy: the decode batch is full and so is the queue; retry shortly",
        code="queue_full",
        status=503,
        type="server_overloaded",
    ).body()
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


async def http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    body = RequestError(error.detail, code=f"http_{error.status_code}").body()
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


async def server_error(request: Request, error: Exception) -> Response:
    body = RequestError(f"internal error: {type(error).__name__}", type="server_error", status=500).body()
    return JSONResponse(body, status_code=500)
