"""Conversion steps the harness runs under a chosen interpreter (the main venv, or a peer's venv).

python benchmarks/prepare.py checkpoint --out DIR --shape small --seed 0 --tokenizer tokenizer.json [--outliers]
python benchmarks/prepare.py ort-int8 --source model.onnx --out model.onnx --n-head 12 --n-embd 768
python benchmarks/prepare.py ort-int4 --source model.onnx --out model.onnx --n-head 12 --n-embd 768
python benchmarks/prepare.py gguf-quantize --source model-f32.gguf --out model-q4_0.gguf --type q4_0
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


def make_checkpoint(out: Path, shape: str, seed: int, tokenizer: Path, outliers: bool) -> None:
    """export-gpt2 --random-init's seeded random GPT-2 of this shape (with --outliers: the stress checkpoint), saved
    with the GPT-2 tokenizer files and the n_ctx that llama.cpp's GGUF converter reads."""
    from gpt2onnx.export.checkpoint import random_checkpoint

    random_checkpoint(shape, seed, outliers).model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text("utf-8"))
    config["n_ctx"] = config["n_positions"]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    write_tokenizer_files(tokenizer, out)


def _ort_optimized(source: Path, out: Path, n_head: int, n_embd: int) -> Path:
    """onnxruntime's GPT-2 fusions of an optimum export, saved beside out."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = out.with_name("optimized.onnx")
    optimize_model(str(source), model_type="gpt2", num_heads=n_head, hidden_size=n_embd).save_model_to_file(
        str(optimized)
    )
    return optimized


def ort_int8(source: Path, out: Path, n_head: int, n_embd: int) -> None:
    """onnxruntime's GPT-2 fusions, then dynamic int8 quantisation (tied weight kept as float, as it must be)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    optimized = _ort_optimized(source, out, n_head, n_embd)
    quantize_dynamic(
        optimized, out, weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}
    )
    optimized.unlink()


def ort_int4(source: Path, out: Path, n_head: int, n_embd: int) -> None:
    """onnxruntime's GPT-2 fusions, then its int4 weight quantiser (MatMulNBits, symmetric blocks of 32, int8
    activations: the settings of onnxruntime-genai's model builder for the CPU) on every MatMul with a constant
    weight, the lm_head's included; the embedding Gather stays float."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    optimized = _ort_optimized(source, out, n_head, n_embd)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(optimized)), block_size=32, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
    optimized.unlink()


def gguf_quantize(source: Path, out: Path, kind: str) -> None:
    """llama.cpp's own quantiser (llama-quantize's code, through llama-cpp-python) from an f32 GGUF. As llama-quantize
    does, q4_0 keeps the output matrix (GPT-2's tied token embedding) at q6_K."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {source} -> {kind}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    checkpoint = steps.add_parser("checkpoint")
    checkpoint.add_argument("--out", type=Path, required=True)
    checkpoint.add_argument("--shape", required=True, help="a shape of export-gpt2 --random-init")
    checkpoint.add_argument("--seed", type=int, required=True)
    checkpoint.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer.json")
    checkpoint.add_argument("--outliers", action="store_true", help="the stress checkpoint (export-gpt2 --outliers)")
    for step in ("ort-int8", "ort-int4"):
        quantize = steps.add_parser(step)
        quantize.add_argument("--source", type=Path, required=True)
        quantize.add_argument("--out", type=Path, required=True)
        quantize.add_argument("--n-head", type=int, required=True)
        quantize.add_argument("--n-embd", type=int, required=True)
    gguf = steps.add_parser("gguf-quantize")
    gguf.add_argument("--source", type=Path, required=True, help="an f32 GGUF")
    gguf.add_argument("--out", type=Path, required=True)
    gguf.add_argument("--type", choices=("q8_0", "q4_0"), required=True)
    args = parser.parse_args(argv)
    if args.step == "checkpoint":
        make_checkpoint(args.out, args.shape, args.seed, args.tokenizer, args.outliers)
    elif args.step == "gguf-quantize":
        gguf_quantize(args.source, args.out, args.type)
    else:
        (ort_int8 if args.step == "ort-int8" else ort_int4)(args.source, args.out, args.n_head, args.n_embd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
