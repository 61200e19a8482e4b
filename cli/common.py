"""What the console scripts share: exit codes and turning errors into one-line messages."""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gpt2onnx.runtime.errors import BundleError, ExportError, InvalidInputError, ProviderError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
USAGE_ERRORS = (InvalidInputError, BundleError, ProviderError)
MODELS_FOLDER = Path("models")  # where export-gpt2 writes by default, relative to the working folder
DEFAULT_BUNDLE = MODELS_FOLDER / "gpt2"
PROVIDERS = ("auto", "cpu", "cuda")  # runtime.session's choices, kept here so that parsing does not load onnxruntime


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors as one line 'PROG: error: ...' and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def add_bundle_arguments(parser: argparse.ArgumentParser, runtime: Any, threads_help: str) -> None:
    """--model (on the parser), and --provider, --threads, --no-verify (on `runtime`, a group or the parser)."""
    parser.add_argument(
        "--model",
        help=f"bundle folder (default: {DEFAULT_BUNDLE}, else the only bundle under {MODELS_FOLDER}/, as export-gpt2 "
        "writes them), or a GPT-2 ONNX folder made by optimum or for transformers.js, as it is",
    )
    parser.add_argument(
        "--onnx-file",
        metavar="NAME",
        help="the graph to run in an optimum or transformers.js folder (e.g. onnx/model_quantized.onnx; default "
        "model.onnx, else decoder_model_merged.onnx)",
    )
    runtime.add_argument("--provider", choices=PROVIDERS, default="auto", help="execution provider")
    runtime.add_argument("--threads", type=positive_int, help=threads_help)
    runtime.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")


def default_bundle(prog: str) -> Path:
    """The bundle to use without --model: models/gpt2, else the only bundle under models/ (said on stderr)."""
    if (DEFAULT_BUNDLE / "bundle.json").is_file():
        return DEFAULT_BUNDLE
    found = sorted(path.parent for path in MODELS_FOLDER.glob("*/bundle.json") if not path.parent.name.startswith("."))
    if len(found) == 1:
        print(f"{prog}: using {found[0]}, the only bundle under {MODELS_FOLDER}/", file=sys.stderr)
        return found[0]
    if not found:
        raise BundleError(
            f"no bundle in {DEFAULT_BUNDLE} or elsewhere under {MODELS_FOLDER}/: create one with export-gpt2 "
            "(offline: export-gpt2 --random-init small), or name one with --model"
        )
    names = ", ".join(str(path) for path in found)
    raise BundleError(
        f"{len(found)} bundles under {MODELS_FOLDER}/ ({names}) and none is {DEFAULT_BUNDLE}: pick one with --model"
    )


def load_bundle(args: argparse.Namespace, threads: int | None, prog: str) -> Any:
    """gpt2onnx.load with the options add_bundle_arguments defined."""
    import gpt2onnx

    folder = args.model if args.model is not None else default_bundle(prog)
    return gpt2onnx.load(
        folder, provider=args.provider, verify_hashes=not args.no_verify, threads=threads, onnx_file=args.onnx_file
    )


def option_flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each generation option's command-line flag, by the option's name ('top_p' -> '--top-p')."""
    return {
        action.dest: action.option_strings[-1]
        for action in parser._actions
        if action.option_strings and action.option_strings[-1].startswith("--")
    }


def in_flags(message: str, flags: Mapping[str, str], option: str | None = None) -> str:
    """An option message told in command-line flags: 'top_p must be <= 1.0' -> '--top-p must be <= 1.0'."""
    for name, flag in flags.items():
        if "_" in name or name == option:  # plain words such as 'stop' only where the message is about them
            message = re.sub(rf"(?<![\w-]){re.escape(name)}\b", flag, message)
    return message


def run_command(prog: str, body: Callable[[], int], flags: Mapping[str, str] | None = None) -> int:
    """Run a command body; map gpt2onnx errors to one-line messages and exit codes, never a traceback.

    flags: option name -> command-line flag, so that option errors name the flag the user typed. Warnings print as
    one line each ('PROG: warning: ...').
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_FAILURE))  # so cleanup (finally) runs on kill
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, *_, **__: print(f"{prog}: warning: {message}", file=sys.stderr)
            return body()
    except InvalidInputError as error:
        print(f"{prog}: error: {in_flags(str(error), flags or {}, error.option)}", file=sys.stderr)
        return EXIT_USAGE
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
