"""The Starlette application: OpenAI-style /v1/completions and /v1/models, /health and /metrics."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
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

from .engine import Engine, Overloaded, Relay
from .protocol import (
    MAX_SEQUENCES,
    Choice,
    CompletionRequest,
    RequestError,
    choice_body,
    completion_body,
    logprobs_body,
    option_error,
    parse_completion_request,
    usage_body,
)
from .stepping import ChoiceUpdate, choice_steps, collect_choices

MAX_BODY_BYTES = 1 << 20
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(model: GPT2Model, workers: int = 1, queue_size: int = 8, model_id: str | None = None) -> Starlette:
    """The server for one loaded model: `workers` generations at a time, `queue_size` more waiting, 503 beyond.

    model_id: the id the API shows and accepts (default: the bundle's source model, model.name).
    """
    if model.manifest.tokenizer_path is None:  # every answer is text: refuse now, not on each request
        raise InvalidInputError(f"bundle {model.manifest.folder} has no tokenizer, and the server answers with text")
    engine = Engine(workers, queue_size)
    created = int(time.time())
    model_id = model_id or model.name

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id, "provider": model.provider})

    async def metrics(request: Request) -> Response:
        return JSONResponse(engine.snapshot())

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
        rows = await run_in_threadpool(prepare, model, parsed)
        prompt_tokens = sum(map(len, rows))
        answer = partial(completion_body, f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_id)
        steps = request_steps(model, rows, parsed)  # generates nothing until iterated, on a worker
        if parsed.stream:
            return event_stream(step_events(parsed, Relay(engine, steps), answer, prompt_tokens))
        cancelled = threading.Event()
        job = engine.submit(partial(collect_choices, steps, len(rows) * parsed.n, cancelled))
        choices = await unless_disconnected(request, job, cancelled)
        if choices is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        with_logprobs = parsed.logprobs is not None
        bodies = [
            choice_body(c.index, c.text, c.finish_reason, logprobs_body(c.pieces) if with_logprobs else None)
            for c in choices
        ]
        return JSONResponse(answer(bodies, usage_body(prompt_tokens, choices)))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        engine.close()

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/metrics", metrics),
            Route("/v1/models", list_models),
            Route("/v1/models/{model_id:path}", get_model),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={
            RequestError: request_error,
            Overloaded: overloaded,
            HTTPException: http_error,
            Exception: server_error,
        },
        lifespan=lifespan,
    )
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
    if len(rows) * parsed.n > MAX_SEQUENCES:
        raise RequestError(f"prompts x n must be <= {MAX_SEQUENCES}, got {len(rows)} x {parsed.n}", param="n")
    try:
        model.check_context(rows, options.max_new_tokens)
    except InvalidInputError as error:
        raise RequestError(str(error), param="max_tokens", code="context_length_exceeded") from None
    return rows


def request_steps(model: GPT2Model, rows: list[list[int]], parsed: CompletionRequest) -> Iterator[list[ChoiceUpdate]]:
    """The request's choices step by step, from one Generator over all its rows (prompts x n)."""
    generator = model.generator(**parsed.options)
    generator.append_tokens(rows)
    return choice_steps(generator, model.tokenizer, generator.options.stop)


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


async def unless_disconnected(
    request: Request, job: asyncio.Future[list[Choice]], cancelled: threading.Event
) -> list[Choice] | None:
    """The job's result; None if the client went away first (then the job is dropped if it has not started, and
    stops at its next step if it has)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not job.done():
        cancelled.set()
        job.cancel()
        return None
    return job.result()


async def step_events(
    parsed: CompletionRequest,
    steps: Relay[list[ChoiceUpdate]],
    answer: partial[dict[str, Any]],
    prompt_tokens: int,
) -> AsyncGenerator[dict[str, Any], None]:
    """Chunks as the generation runs on a worker: each choice's new text (with its logprobs when asked) and its end;
    then the usage when asked. The generation stops if the client leaves."""
    usage = {"usage": None} if parsed.include_usage else {}
    with_logprobs = parsed.logprobs is not None
    completion_tokens = 0
    try:
        async for updates in steps:
            for update in updates:
                completion_tokens += 1
                if update.piece.text or with_logprobs:
                    logprobs = logprobs_body([update.piece]) if with_logprobs else None
                    yield {**answer([choice_body(update.index, update.piece.text, None, logprobs)], None), **usage}
                if update.finish_reason is not None:
                    yield {**answer([choice_body(update.index, "", update.finish_reason, None)], None), **usage}
        if steps.job.cancelled() or steps.job.exception() is not None:
            yield failure(steps.job)
            return
        if parsed.include_usage:
            total = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
            yield answer([], {**total, "total_tokens": prompt_tokens + completion_tokens})
    finally:
        steps.close()


def failure(job: asyncio.Future[Any]) -> dict[str, Any]:
    """The error event that ends a stream whose generation failed after the answer had started."""
    reason = "cancelled (the server is shutting down)" if job.cancelled() else repr(job.exception())
    return RequestError(f"generation failed: {reason}", type="server_error", status=500).body()


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
        "the server is busy: every worker is generating and the queue is full; retry shortly",
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
