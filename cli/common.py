"""What the console scripts share: exit codes and turning errors into one-line messages."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from gpt2onnx.runtime.errors import BundleError, ExportError, InvalidInputError, ProviderError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
USAGE_ERRORS = (InvalidInputError, BundleError, ProviderError)
DEFAULT_BUNDLE = "models/gpt2"
PROVIDERS = ("auto", "cpu", "cuda")  # runtime.session's choices, kept here so that parsing does not load onnxruntime


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors as one line 'PROG: error: ...' and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def add_bundle_arguments(parser: argparse.ArgumentParser, runtime: Any, threads_help: str) -> None:
    """--model (on the parser), and --provider, --threads, --no-verify (on `runtime`, a group or the parser)."""
    parser.add_argument("--model", default=DEFAULT_BUNDLE, help=f"bundle folder (default: {DEFAULT_BUNDLE})")
    runtime.add_argument("--provider", choices=PROVIDERS, default="auto", help="execution provider")
    runtime.add_argument("--threads", type=positive_int, help=threads_help)
    runtime.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")


def load_bundle(args: argparse.Namespace, threads: int | None) -> Any:
    """gpt2onnx.load with the options add_bundle_arguments defined."""
    import gpt2onnx

    return gpt2onnx.load(args.model, provider=args.provider, verify_hashes=not args.no_verify, threads=threads)


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a command body; map gpt2onnx errors to one-line messages and exit codes, never a traceback."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_FAILURE))  # so cleanup (finally) runs on kill
    try:
        return body()
    except USAGE_ERRORS as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ExportError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except Exception as error:  # a bug or an environment problem: one line, unless GPT2ONNX_DEBUG asks for more
        if os.environ.get("GPT2ONNX_DEBUG"):
            raise
        print(
            f"{prog}: error: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


positive_int = _int_at_least(1)
non_negative_int = _int_at_least(0)


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
