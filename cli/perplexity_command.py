"""gpt2-perplexity: the perplexity of a text file under a bundle, and how far a quantised bundle is from its fp32."""

from __future__ import annotations

import json
import sys
from typing import Any

from gpt2onnx import __version__

from .common import ArgumentParser, add_bundle_arguments, load_bundle, option_flags, positive_int, run_command

PROG = "gpt2-perplexity"
BAR_WIDTH = 30


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Perplexity of a text (any length) under a GPT-2 bundle, by transformers' sliding-window method "
        "(windows of the model's context, --stride tokens apart); with --compare, how far the bundle's next-token "
        "distributions are from another bundle's (e.g. a quantised bundle against its fp32 export).",
    )
    parser.add_argument("file", metavar="FILE", help="a UTF-8 text file (- reads stdin)")
    add_bundle_arguments(parser, parser, threads_help="CPU threads (default: physical cores)")
    parser.add_argument(
        "--stride", type=positive_int, help="tokens between windows (default 512, or the context if it is shorter)"
    )
    parser.add_argument(
        "--compare",
        metavar="BUNDLE",
        help="a reference bundle of the same model (its fp32 export): adds the mean KL divergence per token "
        "(reference || --model), teacher-forced top-1 agreement and max |logits difference|",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def read_text(parser: ArgumentParser, name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    try:
        with open(name, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        parser.error(f"{name}: {reason}")
        raise  # parser.error exits


class ProgressBar:
    """A bar on stderr while windows are scored, when stderr is a terminal; nothing otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        filled = round(BAR_WIDTH * done / total)
        end = "\n" if done == total else ""
        print(f"\r{PROG}: [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] window {done}/{total}", end=end, file=sys.stderr)
        sys.stderr.flush()


def report_lines(report: Any) -> list[str]:
    lines = [
        f"perplexity {report.perplexity:.4f} over {report.tokens} tokens "
        f"({report.windows} window{'s' if report.windows != 1 else ''} of up to {report.context} tokens, "
        f"stride {report.stride})"
    ]
    if report.kl_divergence is not None:
        lines += [
            f"KL divergence (reference || model), mean per token: {report.kl_divergence:.6f}",
            f"top-1 agreement with the reference: {report.top1_agreement:.2%}",
            f"max |logits difference|: {report.max_logits_diff:.4f}",
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    text = read_text(parser, args.file)

    def body() -> int:
        model = load_bundle(args, args.threads, PROG)
        reference = None
        if args.compare:
            import gpt2onnx

            reference = gpt2onnx.load(
                args.compare, provider=args.provider, verify_hashes=not args.no_verify, threads=args.threads
            )
        progress = ProgressBar(sys.stderr.isatty() and not args.json)
        report = model.perplexity(text, stride=args.stride, compare=reference, progress=progress)
        if args.json:
            print(json.dumps({"model": model.name, **report.to_dict()}))
        else:
            print("\n".join(report_lines(report)))
        return 0

    return run_command(PROG, body, option_flags(parser))


if __name__ == "__main__":
    sys.exit(main())
