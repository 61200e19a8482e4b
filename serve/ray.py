"""gpt2-serve on Ray Serve: replicas of (a loaded model + its continuous batcher) behind the same OpenAI routes.

    serve run gpt2onnx.serve.ray:build_app model=models/gpt2 num_replicas=2 max_batch=16

Each replica is one Ray actor that loads the bundle and runs gpt2-serve's own Starlette application (the scheduler
with its one decode batch, /v1/completions with streaming, /v1/chat/completions, /v1/models, /health, /metrics);
Ray's HTTP proxy spreads the requests over the replicas and replaces a replica that dies. Needs the `ray` extra:
pip install 'gpt2-onnx[cpu,serve,ray]'. docs/SERVER.md has a multi-node cluster and KubeRay set-up.
"""

from __future__ import annotations

from typing import Any

from ray import serve

from . import DEFAULT_MAX_BATCH

# serve run's key=value arguments -> how to read them (all arrive as strings)
ARGUMENTS = {
    "model": str,
    "model_name": str,
    "chat_template": str,
    "provider": str,
    "threads": int,
    "max_batch": int,
    "queue_size": int,
    "num_replicas": int,
    "num_cpus": float,
    "min_replicas": int,
    "max_replicas": int,
    "target_ongoing_requests": float,
}


def _application(
    model: str,
    provider: str,
    threads: int | None,
    max_batch: int,
    queue_size: int,
    model_name: str | None,
    chat_template: str | None,
) -> Any:
    """gpt2-serve's application for one replica: built there, when Ray starts the replica."""
    import sys

    import gpt2onnx

    from .app import create_app
    from .chat import ChatTemplate
    from .command import SWITCH_INTERVAL_S, special_token_texts

    sys.setswitchinterval(SWITCH_INTERVAL_S)  # the replica's process is the server's: as gpt2-serve sets it
    loaded = gpt2onnx.load(model, provider=provider, threads=threads)
    template = ChatTemplate.from_file(chat_template, *special_token_texts(loaded)) if chat_template else None
    return create_app(loaded, max_batch=max_batch, queue_size=queue_size, model_id=model_name, chat_template=template)


def build_app(args: dict[str, str]) -> serve.Application:
    """The Ray Serve application for `serve run gpt2onnx.serve.ray:build_app key=value ...`.

    model (required): the bundle folder, which every node must be able to read; model_name, chat_template,
    provider (default auto), threads, max_batch (default 16) and queue_size (default 8) as gpt2-serve's options;
    num_replicas (default 1) or, for autoscaling, min_replicas / max_replicas / target_ongoing_requests (Ray's
    autoscaling_config); num_cpus per replica (default 1). The route prefix is serve run's own --route-prefix.
    """
    unknown = sorted(set(args) - set(ARGUMENTS))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(ARGUMENTS)}")
    if "model" not in args:
        raise ValueError("model=BUNDLE_DIR is required")
    try:
        values = {name: ARGUMENTS[name](value) for name, value in args.items()}
    except ValueError as error:
        raise ValueError(f"a bad argument value: {error}") from None
    max_batch = values.get("max_batch", DEFAULT_MAX_BATCH)
    queue_size = values.get("queue_size", 8)
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": values.get("num_cpus", 1.0)},
        # a replica takes a batch's worth of requests and its queue; Ray sends it no more than that at once
        "max_ongoing_requests": max_batch + queue_size,
    }
    autoscaling = {
        key: values[key] for key in ("min_replicas", "max_replicas", "target_ongoing_requests") if key in values
    }
    if autoscaling:
        options["autoscaling_config"] = autoscaling
    else:
        options["num_replicas"] = values.get("num_replicas", 1)

    def application() -> Any:
        return _application(
            values["model"],
            values.get("provider", "auto"),
            values.get("threads"),
            max_batch,
            queue_size,
            values.get("model_name"),
            values.get("chat_template"),
        )

    @serve.deployment(name="gpt2onnx", **options)
    @serve.ingress(application)
    class GPT2Replica:
        """One loaded model and its decode batch."""

    return GPT2Replica.bind()
