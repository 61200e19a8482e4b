"""Conversion steps the harness runs under a chosen interpreter (the main venv, or a peer's venv).

python benchmarks/prepare.py checkpoint --out DIR --shape small --seed 0 --tokenizer tokenizer.json
python benchmarks/prepare.py ort-int8 --source model.onnx --out model.onnx --n-head 12 --n-embd 768
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def write_tokenizer_files(tokenizer_json: Path, out: Path) -> None:
    """tokenizer.json, and the vocab.json + merges.txt it was made of (CTranslate2's converter and optimum's
    exporter load GPT-2's tokenizer from those two files)."""
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")
    model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def make_checkpoint(out: Path, shape: str, seed: int, tokenizer: Path) -> None:
    """export-gpt2 --random-init's seeded random GPT-2 of this shape, saved with the GPT-2 tokenizer files."""
    from gpt2onnx.export.checkpoint import random_checkpoint

    random_checkpoint(shape, seed).model.save_pretrained(out)
    write_tokenizer_files(tokenizer, out)


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
    checkpoint.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer.json")
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
