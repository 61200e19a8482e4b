"""Conversion steps the harness runs under a chosen interpreter (the main venv, or a peer's venv).

python benchmarks/prepare.py checkpoint --out DIR --shape small --seed 0 --tokenizer DIR
python benchmarks/prepare.py ort-int8 --source model.onnx --out model.onnx --n-head 12 --n-embd 768
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")


def make_checkpoint(out: Path, shape: str, seed: int, tokenizer: Path) -> None:
    """export-gpt2 --random-init's seeded random GPT-2 of this shape, saved with the real GPT-2 tokenizer files."""
    from gpt2onnx.export.checkpoint import random_checkpoint

    random_checkpoint(shape, seed).model.save_pretrained(out)
    for name in TOKENIZER_FILES:  # CTranslate2's converter and optimum's exporter look for a tokenizer here
        shutil.copyfile(tokenizer / name, out / name)


def ort_int8(source: Path, out: Path, n_head: int, n_embd: int) -> None:
    """onnxruntime's GPT-2 fusions, then dynamic int8 quantisation (tied weight kept as float, as it must be)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = out.with_name("optimized.onnx")
    optimize_model(str(source), model_type="gpt2", num_heads=n_head, hidden_size=n_embd).save_model_to_file(
        str(optimized)
    )
    quantize_dynamic(
        optimized, out, weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}
    )
    optimized.unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    checkpoint = steps.add_parser("checkpoint")
    checkpoint.add_argument("--out", type=Path, required=True)
    checkpoint.add_argument("--shape", required=True, help="a shape of export-gpt2 --random-init")
    checkpoint.add_argument("--seed", type=int, required=True)
    checkpoint.add_argument("--tokenizer", type=Path, required=True)
    quantize = steps.add_parser("ort-int8")
    quantize.add_argument("--source", type=Path, required=True)
    quantize.add_argument("--out", type=Path, required=True)
    quantize.add_argument("--n-head", type=int, required=True)
    quantize.add_argument("--n-embd", type=int, required=True)
    args = parser.parse_args(argv)
    if args.step == "checkpoint":
        make_checkpoint(args.out, args.shape, args.seed, args.tokenizer)
    else:
        ort_int8(args.source, args.out, args.n_head, args.n_embd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
