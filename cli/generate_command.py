"""gpt2-generate: generate text from a bundle (greedy, sampling, beams), show tokens and next-token tables."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from gpt2onnx import __version__
from gpt2onnx.runtime.options import GenerationOptions

from .common import (
    ArgumentParser,
    add_bundle_arguments,
    finite_float,
    in_flags,
    load_bundle,
    non_negative_int,
    option_flags,
    positive_int,
    run_command,
)

PROG = "gpt2-generate"


BAR_WIDTH = 30  # characters of the --top-probs bar of the most likely token
BAR_EIGHTHS = " ▏▎▍▌▋▊▉"


def _token_list(text: str) -> list[int]:
    parts = text.replace(" ", "").split(",")
    if not all(part.removeprefix("-").isdigit() for part in parts):  # negative ids get the API's range error
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids such as 1,2,3, got {text!r}")
    return [int(part) for part in parts]


def _early_stopping(text: str) -> bool | str:
    values = {"true": True, "false": False, "never": "never"}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"expected true, false or never, got {text!r}")
    return values[text.lower()]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Generate text with a GPT-2 bundle written by export-gpt2 (no PyTorch needed).",
    )
    parser.add_argument(
        "prompts", nargs="*", metavar="PROMPT", help="prompt text (- reads it from stdin); several prompts form a batch"
    )
    parser.add_argument(
        "--prompt-file",
        action="append",
        metavar="FILE",
        help="read a prompt from a file (its final newline dropped); repeat for a batch",
    )
    runtime = parser.add_argument_group("runtime")
    add_bundle_arguments(parser, runtime, threads_help="CPU threads (default: physical cores)")
    parser.add_argument(
        "--input-ids",
        type=_token_list,
        action="append",
        metavar="1,2,3",
        help="prompt as token ids instead of text; repeat for a batch",
    )
    generation = parser.add_argument_group("generation options (transformers' names and defaults)")
    generation.add_argument("--max-new-tokens", type=positive_int, help="tokens to generate (default 20)")
    generation.add_argument(
        "--max-length", type=positive_int, help="transformers' older limit: prompt + new tokens (instead of the above)"
    )
    generation.add_argument("--min-new-tokens", type=non_negative_int, help="suppress EOS before this many (default 0)")
    generation.add_argument("--do-sample", action="store_true", default=None, help="sample (default: greedy or beams)")
    generation.add_argument("--temperature", type=finite_float, help="sampling temperature (default 1.0)")
    generation.add_argument("--top-k", type=non_negative_int, help="sampling: keep the k best (default 50; 0 = all)")
    generation.add_argument("--top-p", type=finite_float, help="sampling: nucleus mass (default 1.0)")
    generation.add_argument("--min-p", type=finite_float, help="sampling: drop tokens below min_p * best probability")
    generation.add_argument("--typical-p", type=finite_float, help="sampling: typical mass (default 1.0)")
    generation.add_argument("--num-beams", type=positive_int, help="beam search width (default 1)")
    generation.add_argument("--length-penalty", type=finite_float, help="beam score length exponent (default 1.0)")
    generation.add_argument(
        "--early-stopping",
        type=_early_stopping,
        nargs="?",
        const=True,
        metavar="true|false|never",
        help="beam search stopping rule (default false; the flag alone = true)",
    )
    generation.add_argument("--num-return-sequences", type=positive_int, help="sequences per prompt (default 1)")
    generation.add_argument("--repetition-penalty", type=finite_float, help="penalise repeated tokens (default 1.0)")
    generation.add_argument("--no-repeat-ngram-size", type=non_negative_int, help="forbid repeated n-grams (size)")
    generation.add_argument("--stop", action="append", metavar="TEXT", help="stop when this text appears (repeatable)")
    generation.add_argument("--seed", type=non_negative_int, help="random seed for sampling (reproducible runs)")
    output = parser.add_argument_group("output")
    output.add_argument("--stream", action="store_true", help="print text as it is generated")
    output.add_argument("--json", action="store_true", help="print one JSON object (see README)")
    output.add_argument("--show-tokens", action="store_true", help="print the prompt's |token| -> id table")
    output.add_argument(
        "--top-probs",
        type=positive_int,
        metavar="N",
        help="print the N most likely next tokens, each with a bar (the most likely one's is full width)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def generation_options(args: Any) -> dict[str, Any]:
    """The generate() keyword arguments the command line set (the others keep the bundle's defaults)."""
    options = {
        "max_new_tokens": args.max_new_tokens,
        "max_length": args.max_length,
        "min_new_tokens": args.min_new_tokens,
        "do_sample": args.do_sample,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "typical_p": args.typical_p,
        "num_beams": args.num_beams,
        "length_penalty": args.length_penalty,
        "early_stopping": args.early_stopping,
        "num_return_sequences": args.num_return_sequences,
        "repetition_penalty": args.repetition_penalty,
        "no_repeat_ngram_size": args.no_repeat_ngram_size,
        "stop": tuple(args.stop) if args.stop else None,
        "seed": args.seed,
    }
    return {name: value for name, value in options.items() if value is not None}


def _read_prompts(parser: ArgumentParser, args: Any) -> list[str]:
    """The text prompts: PROMPT arguments (- is stdin) and --prompt-file files, each without its final newline."""
    if args.prompts.count("-") > 1:
        parser.error("- (read the prompt from stdin) can be given once")
    prompts = []
    for prompt in args.prompts:
        prompts.append(_without_final_newline(sys.stdin.read()) if prompt == "-" else prompt)
    for name in args.prompt_file or ():
        try:
            with open(name, encoding="utf-8") as handle:
                prompts.append(_without_final_newline(handle.read()))
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            parser.error(f"--prompt-file {name}: {reason}")
    return prompts


def _without_final_newline(text: str) -> str:
    return text[:-1] if text.endswith("\n") else text


def _check_combinations(parser: ArgumentParser, args: Any) -> None:
    """Refuse, before loading the bundle, argument combinations that cannot work (one line, exit code 2)."""
    if (args.prompts or args.prompt_file) and args.input_ids:
        parser.error("give PROMPT text (or --prompt-file) or --input-ids, not both")
    if not args.prompts and not args.prompt_file and not args.input_ids:
        parser.error("give a PROMPT (text, or - for stdin), --prompt-file FILE or --input-ids 1,2,3")
    if args.max_length is not None and args.max_new_tokens is not None:
        parser.error("give --max-new-tokens or --max-length, not both")
    if args.stream:
        if args.json:
            parser.error("--stream and --json cannot be combined")
        if len(args.prompts) + len(args.prompt_file or ()) > 1 or len(args.input_ids or ()) > 1:
            parser.error("--stream takes one prompt")
        search = GenerationOptions(num_beams=args.num_beams or 1, num_return_sequences=args.num_return_sequences or 1)
        refusal = search.streaming_refusal()
        if refusal:
            parser.error(f"--stream {in_flags(refusal, option_flags(parser))}")


def _print_token_table(model: Any, token_ids: list[int]) -> None:
    strings = model.tokenizer.token_strings(token_ids) if model.manifest.tokenizer_path else [None] * len(token_ids)
    for token, text in zip(token_ids, strings, strict=True):
        print(f"|{text}| -> {token}" if text is not None else f"{token}")


def _print_top_probs(table: list[Any]) -> None:
    """rank, probability, id, |token| and a bar as long as the probability (the first row's is BAR_WIDTH)."""
    top = table[0].probability if table else 0.0
    for rank, row in enumerate(table, 1):
        print(f"{rank:>3}  {row.probability:8.4%}  {row.token_id:>6}  |{row.token}|  {_bar(row.probability, top)}")


def _bar(value: float, top: float) -> str:
    """A bar of value / top * BAR_WIDTH characters, to an eighth of a character."""
    eighths = round(value / top * BAR_WIDTH * 8) if top > 0 else 0
    return "█" * (eighths // 8) + BAR_EIGHTHS[eighths % 8].strip()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_combinations(parser, args)
    prompts = _read_prompts(parser, args)

    def body() -> int:
        model = load_bundle(args, args.threads, PROG)
        options = generation_options(args)
        model.options(**options)  # checked with the bundle's defaults before anything is printed
        prompt = None if args.input_ids else (prompts[0] if len(prompts) == 1 else prompts)
        input_ids = None if not args.input_ids else (args.input_ids[0] if len(args.input_ids) == 1 else args.input_ids)
        extras: dict[str, Any] = {}
        if args.show_tokens or args.top_probs:
            encoded = model.encode(prompt, input_ids)
            several = len(encoded.rows) > 1
            for index, (text, row) in enumerate(zip(encoded.prompts, encoded.rows, strict=True)):
                if args.show_tokens and not args.json:
                    if several:
                        print(f"tokens of {text!r}:" if text is not None else f"tokens of prompt {index + 1}:")
                    _print_token_table(model, row)
                if args.top_probs:
                    table = model.next_token_probs(input_ids=row, top=args.top_probs)
                    extras.setdefault("top_probs", []).append([dataclasses.asdict(entry) for entry in table])
                    if not args.json:
                        print(
                            f"next-token probabilities after {text!r}:"
                            if text is not None
                            else "next-token probabilities:"
                        )
                        _print_top_probs(table)
        if args.stream:
            pieces = model.stream(prompt, input_ids=input_ids, **options)
            if prompt is not None:
                print(prompt, end="", flush=True)
            for piece in pieces:
                print(piece, end="", flush=True)
            print()
            return 0
        output = model.generate(prompt, input_ids=input_ids, **options)
        if args.json:
            document = {"model": model.name, "provider": model.provider, **output.to_dict(), **extras}
            print(json.dumps(document, ensure_ascii=False))
            return 0
        sequences = [(i, j, seq) for i, result in enumerate(output.results) for j, seq in enumerate(result.sequences)]
        for i, j, sequence in sequences:
            if len(sequences) > 1:
                score = f" (score {sequence.score:.4f})" if sequence.score is not None else ""
                print(f"=== prompt {i + 1}, sequence {j + 1}{score} ===")
            print(sequence.text if model.manifest.tokenizer_path else " ".join(map(str, sequence.token_ids)))
        return 0

    return run_command(PROG, body, option_flags(parser))


if __name__ == "__main__":
    sys.exit(main())
