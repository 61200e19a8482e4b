"""export-gpt2: convert a GPT-2 checkpoint into a verified ONNX bundle folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpt2onnx import __version__
from gpt2onnx.export.graph import (
    DEFAULT_HEAD_BITS,
    DEFAULT_INT8_LAYERS,
    HEAD_BITS,
    QUANT_BITS,
    QUANT_BLOCK,
    QUANT_BLOCK_INT4,
    QUANT_BLOCKS,
)
from gpt2onnx.export.rounding import DEFAULT_ROUNDING, ROUNDINGS
from gpt2onnx.runtime.bundle import KV_CACHES

from .common import ArgumentParser, non_negative_int, option_flags, run_command

PROG = "export-gpt2"


def block_list(text: str) -> list[int]:
    """--int8-layers' value: comma-separated block indices from 0 ("0,11"), or "none"."""
    if text.strip().lower() == "none":
        return []
    try:
        blocks = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of block indices or none") from None
    if any(block < 0 for block in blocks):
        raise argparse.ArgumentTypeError(f"{text!r}: block indices start at 0")
    return blocks


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Convert a GPT-2 checkpoint (hub id or local folder) into an ONNX bundle that gpt2-generate "
        "and gpt2onnx.load() run without PyTorch. Loading a hub id needs the Hugging Face hub; "
        "--random-init works offline.",
    )
    parser.add_argument("--model", help="hub id or checkpoint folder (default: gpt2)")
    parser.add_argument(
        "--output", help="bundle folder to write (default: models/<model name>, or models/random-<shape>)"
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "fp16"), default="fp32", help="weight and compute type (fp16 is for CUDA)"
    )
    parser.add_argument(
        "--optimize",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="build the graph from onnxruntime's fused ops (attention with past, fast GELU); "
        "--no-optimize keeps standard ONNX ops only (default: optimize)",
    )
    parser.add_argument(
        "--quantize",
        choices=tuple(QUANT_BITS),
        help="int8 or int4 weights (blocks of --block-size inputs, int8 activations at run time) in the fused graph; "
        "for CPU, fp32 only. int4 decodes faster and is further from fp32 (benchmarks/quality_results.md)",
    )
    parser.add_argument(
        "--block-size",
        type=int,
        choices=QUANT_BLOCKS,
        help=f"with --quantize: inputs per weight scale (default {QUANT_BLOCK} for int8, {QUANT_BLOCK_INT4} for "
        "int4); larger blocks decode faster, smaller ones stay closer to fp32",
    )
    parser.add_argument(
        "--head-bits",
        type=int,
        choices=HEAD_BITS,
        help=f"with --quantize int4: bits of the lm_head and token embedding (default {DEFAULT_HEAD_BITS}, in int8's "
        "blocks of 128; 4 decodes faster and is further from fp32)",
    )
    parser.add_argument(
        "--int8-layers",
        type=block_list,
        metavar="BLOCKS",
        help="with --quantize int4: the transformer blocks (comma-separated indices from 0, or none) whose attention "
        f"and MLP weights stay at 8 bits (default {','.join(map(str, DEFAULT_INT8_LAYERS))}: the first block, the "
        "most sensitive; GPT-2 small on the stress checkpoint: top-1 agreement 94.5%% against 85.5%% for none, "
        "for 3%% more weight bytes)",
    )
    parser.add_argument(
        "--rounding",
        choices=ROUNDINGS,
        help="with --quantize: how the attention and MLP weights reach their levels: gptq rounds them against their "
        "inputs on a calibration text shipped with gpt2onnx (closer to fp32; about 2 minutes more for GPT-2 small on "
        f"one core), nearest rounds each weight on its own (default: {DEFAULT_ROUNDING['int4']} for int4, "
        f"{DEFAULT_ROUNDING['int8']} for int8)",
    )
    parser.add_argument(
        "--fast-prefill",
        action="store_true",
        help="with --quantize int8: store the blocks a second time for onnxruntime's int8 GEMM, used for prompts "
        "(about 1.6x faster first token after a long prompt; +85 MB for GPT-2 small, on disk and in memory)",
    )
    parser.add_argument(
        "--no-outlier-channels",
        dest="isolate_outliers",
        action="store_false",
        help="with --quantize: quantise the outlier input channels with the rest instead of multiplying them in "
        "float32 (for measuring what isolating them gains; see benchmarks/README.md)",
    )
    parser.add_argument(
        "--kv-cache",
        choices=("auto", *KV_CACHES),
        default="auto",
        help="preallocated: the fused graph updates one key/value buffer in place (GroupQueryAttention; no per-step "
        "cache copy; CPU provider only); growing: each step returns past + new positions (MultiHeadAttention; runs on "
        "CUDA too); auto: preallocated for fused fp32 and int8 graphs, growing for fp16 and --no-optimize",
    )
    parser.add_argument(
        "--random-init",
        choices=("tiny", "small", "medium"),
        help="build a GPT-2 of this shape with seeded random weights instead of loading --model (offline; its text "
        "is gibberish), with the GPT-2 tokenizer that ships with gpt2onnx",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed for --random-init and validation inputs")
    parser.add_argument(
        "--outliers",
        action="store_true",
        help="with --random-init: write trained GPT-2's massive activations, outlier channels and peaked logits into "
        "the random weights (a stress checkpoint for quantisation; export/outliers.py)",
    )
    parser.add_argument(
        "--tokenizer",
        help="folder, tokenizer.json or hub id whose tokenizer goes into the bundle (default: the checkpoint's own; "
        "for --random-init, or a folder without one whose vocabulary is GPT-2's: the shipped GPT-2 tokenizer)",
    )
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    parser.add_argument(
        "--from-onnx",
        metavar="FOLDER",
        help="import a GPT-2 ONNX export made by optimum or for transformers.js (config.json and model.onnx or "
        "onnx/*.onnx) into a verified bundle, as it is and without torch (default --output: models/<folder name>)",
    )
    parser.add_argument(
        "--onnx-file",
        metavar="NAME",
        help="with --from-onnx: the graph to import (e.g. onnx/model_quantized.onnx; default model.onnx, else "
        "decoder_model_merged.onnx)",
    )
    parser.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    parser.add_argument("--quiet", action="store_true", help="do not print progress")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def body() -> int:
        if args.from_onnx is not None:
            return import_body()
        if args.onnx_file is not None:
            parser.error("--onnx-file needs --from-onnx")
        from gpt2onnx.export.exporter import Progress, export_bundle

        output = export_bundle(
            args.model,
            args.output,
            dtype=args.dtype,
            optimize=args.optimize,
            quantize=args.quantize,
            fast_prefill=args.fast_prefill,
            kv_cache=args.kv_cache,
            block_size=args.block_size,
            random_init=args.random_init,
            seed=args.seed,
            outliers=args.outliers,
            isolate_outliers=args.isolate_outliers,
            head_bits=args.head_bits,
            rounding=args.rounding,
            int8_layers=args.int8_layers,
            tokenizer=args.tokenizer,
            revision=args.revision,
            force=args.force,
            progress=Progress(enabled=not args.quiet),
        )
        print(output)
        return 0

    def import_body() -> int:
        from gpt2onnx.export.exporter import Progress
        from gpt2onnx.export.onnx_import import import_onnx_folder

        checkpoint_flags = ["--model", "--random-init", "--quantize", "--tokenizer", "--revision", "--outliers"]
        checkpoint_flags += ["--block-size", "--head-bits", "--int8-layers", "--rounding", "--fast-prefill"]
        given = [flag for flag in checkpoint_flags if getattr(args, flag[2:].replace("-", "_")) not in (None, False)]
        given += ["--dtype"] if args.dtype != "fp32" else []
        given += ["--no-optimize"] if not args.optimize else []
        given += ["--kv-cache"] if args.kv_cache != "auto" else []
        given += ["--no-outlier-channels"] if not args.isolate_outliers else []
        if given:
            parser.error(f"{given[0]} is for checkpoints; --from-onnx imports a graph as it is")
        output = args.output or f"models/{Path(args.from_onnx.rstrip('/')).name}"
        progress = Progress(enabled=not args.quiet)
        print(import_onnx_folder(args.from_onnx, output, args.onnx_file, force=args.force, progress=progress))
        return 0

    return run_command(PROG, body, option_flags(parser))


if __name__ == "__main__":
    sys.exit(main())
