"""What the console scripts share: exit codes and turning errors into one-line messages."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from collections.abc import Callable

from gpt2onnx.runtime.errors import BundleError, ExportError, InvalidInputError, ProviderError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
USAGE_ERRORS = (InvalidInputError, BundleError, ProviderError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors as one line 'PROG: error: ...' and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


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
