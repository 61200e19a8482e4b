"""gpt2-serve: load a bundle and serve it over HTTP with uvicorn (loopback only unless told otherwise)."""

from __future__ import annotations

import errno
import ipaddress
import signal
import socket
import sys

from gpt2onnx import __version__
from gpt2onnx.cli.common import (
    EXIT_FAILURE,
    EXIT_OK,
    ArgumentParser,
    add_bundle_arguments,
    load_bundle,
    non_negative_int,
    option_flags,
    positive_int,
    run_command,
)
from gpt2onnx.runtime.errors import InvalidInputError

from . import DEFAULT_MAX_BATCH

PROG = "gpt2-serve"
# How long a thread may hold the GIL while another waits. Python's 5 ms default makes the scheduler's thread wait for
# the event loop's after every step; 0.5 ms measured, in process, 16 clients: 699 -> 878 tokens/s, inter-token
# latency p99 32.8 -> 21.3 ms; 1 client: 117 -> 151 tokens/s.
SWITCH_INTERVAL_S = 0.0005


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Serve a GPT-2 bundle over HTTP with OpenAI's /v1/completions API (no PyTorch needed).",
    )
    add_bundle_arguments(parser, parser, threads_help="CPU threads of the model's steps (default: physical cores)")
    parser.add_argument(
        "--model-name", help="model id the API shows and accepts (default: the bundle's source model, e.g. gpt2)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=non_negative_int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--max-batch",
        type=positive_int,
        default=DEFAULT_MAX_BATCH,
        help=f"rows decoded together in one batch, all requests' choices included (default: {DEFAULT_MAX_BATCH})",
    )
    parser.add_argument(
        "--queue-size",
        type=non_negative_int,
        default=8,
        help="requests that may wait for room in the batch; more get 503",
    )
    parser.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a Jinja chat template for /v1/chat/completions (GPT-2 has none; examples/chat_template.jinja is one)",
    )
    parser.add_argument(
        "--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info", help="uvicorn's"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a busy port fails at once (exit 2)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as error:
        reason = "it is in use" if error.errno == errno.EADDRINUSE else error.strerror or str(error)
        raise InvalidInputError(f"cannot listen on {host} port {port}: {reason} (choose another with --port)") from None


def special_token_texts(model) -> tuple[str, str]:
    """The BOS and EOS tokens' texts, for the chat template's bos_token and eos_token."""
    manifest = model.manifest
    return tuple(
        model.tokenizer.decode([token]) if token is not None else ""
        for token in (manifest.bos_token_id, manifest.eos_token_id)
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def body() -> int:
        try:
            import uvicorn

            from .app import create_app
            from .chat import ChatTemplate
        except ImportError as error:
            print(f"{PROG}: error: {error}; install the serve extra: pip install 'gpt2-onnx[serve]'", file=sys.stderr)
            return EXIT_FAILURE
        listener = bind(args.host, args.port)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        template = ChatTemplate.from_file(args.chat_template) if args.chat_template else None  # checked before loading
        model = load_bundle(args, args.threads, PROG)
        if template is not None:
            template = ChatTemplate.from_file(args.chat_template, *special_token_texts(model))
        app = create_app(
            model,
            max_batch=args.max_batch,
            queue_size=args.queue_size,
            model_id=args.model_name,
            chat_template=template,
        )
        if not is_loopback(args.host):
            print(
                f"{PROG}: warning: listening on {args.host}, reachable from other machines, with no authentication",
                file=sys.stderr,
            )
        print(f"{PROG}: serving {args.model_name or model.name!r} on {model.provider}", file=sys.stderr)
        # uvicorn stops gracefully on SIGTERM, then raises it again: a normal stop, not a failure.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_OK))
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
        uvicorn.Server(config).run(sockets=[listener])
        return 0

    return run_command(PROG, body, option_flags(parser))


if __name__ == "__main__":
    sys.exit(main())
