"""export_bundle(): checkpoint -> verified bundle folder, written aside and moved into place only when complete."""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from gpt2onnx.runtime import bundle
from gpt2onnx.runtime.errors import ExportError, InvalidInputError

from .calibrate import OUTLIER_RATIO, calibration_ids, input_hessians, outlier_channels, sample_ids
from .checkpoint import VOCAB_SIZE, Checkpoint, load_pretrained, random_checkpoint, tokenizer_json
from .graph import (
    CONTRIB,
    DEFAULT_HEAD_BITS,
    DEFAULT_INT8_LAYERS,
    HEAD_BITS,
    OPSET,
    QUANT_BITS,
    QUANT_BLOCK,
    QUANT_BLOCK_INT4,
    QUANT_BLOCKS,
    build_graph,
    head_block_size,
    projection_bits,
)
from .rounding import DEFAULT_ROUNDING, GPTQ_DAMPING, ROUNDINGS, BlockLevels, gptq
from .sources import (
    TokenizerChoice,
    check_checkpoint_folder,
    check_tokenizer_fits,
    check_tokenizer_source,
    choose_tokenizer,
    fallback_tokenizer,
    is_local_path,
    tokenizer_json_file,
)
from .validate import validate_bundle

# Weights above 32 MiB go to model.onnx.data: onnxruntime reads that file directly instead of parsing the weights out
# of the protobuf (a GPT-2-small session starts in 0.3 s instead of 0.8 s), and protobuf stops at 2 GiB anyway.
EXTERNAL_DATA_THRESHOLD = 32 << 20
DEFAULT_MODEL = "gpt2"
DTYPES = {"fp32": "float32", "fp16": "float16", "float32": "float32", "float16": "float16"}
QUANTIZATIONS = tuple(QUANT_BITS)
DEFAULT_BLOCK_SIZES = {"int8": QUANT_BLOCK, "int4": QUANT_BLOCK_INT4}


class Progress:
    """Prints each slow step and its duration to stderr ('export-gpt2: loading gpt2 ... 3.1 s')."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def notice(self, what: str) -> None:
        """A one-line note about a choice the export made for the user ('export-gpt2: note: ...')."""
        if self.enabled:
            print(f"export-gpt2: note: {what}", file=sys.stderr, flush=True)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.enabled:
            print(f"export-gpt2: {what} ...", end="", file=sys.stderr, flush=True)
        try:
            yield
        except BaseException:
            if self.enabled:
                print(" failed", file=sys.stderr, flush=True)
            raise
        if self.enabled:
            print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _require_export_dependencies() -> None:
    import importlib.util

    missing = [name for name in ("torch", "transformers", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"export-gpt2 needs {', '.join(missing)}: install them with `pip install 'gpt2-onnx[export,cpu]'`"
        )


def default_output(model: str | None, random_init: str | None, outliers: bool = False) -> Path:
    """models/<name>: models/gpt2 for --model gpt2 (or a folder named gpt2), models/random-small for --random-init
    small (models/random-small-outliers with outliers)."""
    name = f"random-{random_init}" if random_init else Path((model or DEFAULT_MODEL).rstrip("/")).name
    return Path("models") / (name + ("-outliers" if outliers else ""))


def check_output(output: Path, force: bool) -> None:
    """InvalidInputError, before any work, when the bundle could not be written at --output."""
    if output.exists() and not force:
        raise InvalidInputError(f"output folder {output} already exists; pass --force to replace it")
    if output.exists() and not output.is_dir():
        raise InvalidInputError(f"--output {output} is a file, not a bundle folder")
    ancestor = output.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InvalidInputError(f"cannot write --output {output}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InvalidInputError(f"cannot write --output {output}: no permission to write in {ancestor}")


def _make_staging(output: Path) -> Path:
    """The hidden sibling folder the bundle is assembled in (stale ones of killed exports are removed first)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(output)
        staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
        staging.mkdir()
    except OSError as error:
        raise InvalidInputError(f"cannot write --output {output}: {error.strerror or error}") from None
    return staging


def _save_tokenizer(
    choice: TokenizerChoice, model: str | None, revision: str | None, vocab_size: int, staging: Path
) -> tuple[TokenizerChoice, str | None]:
    """Write the chosen tokenizer into the staging folder as tokenizer.json. Returns the choice (a hub checkpoint
    without a tokenizer falls back to the shipped one or none) and the file's name, None without a tokenizer."""
    found = None
    if choice.source is not None:
        found = tokenizer_json(choice.source, revision if choice.source == model else None, staging)
        if found is None and choice.source != model:
            raise InvalidInputError(f"--tokenizer {choice.source} has no tokenizer")
        if found is None:
            choice = fallback_tokenizer(f"{model} has no tokenizer", vocab_size)
            found = tokenizer_json(choice.source, None, staging) if choice.source else None
    if found is None:
        return choice, None
    check_tokenizer_fits(found, choice.description, vocab_size)
    found.rename(staging / bundle.TOKENIZER_FILE)
    return choice, bundle.TOKENIZER_FILE


def _tool_versions() -> dict[str, str]:
    import importlib.metadata as metadata

    versions = {}
    for name in ("gpt2-onnx", "torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _save_graph(model_proto: Any, folder: Path) -> str | None:
    """Write model.onnx; weights go to an external data file beside it when large. Returns that file's name."""
    import onnx

    path = folder / bundle.MODEL_FILE
    if sum(init.ByteSize() for init in model_proto.graph.initializer) <= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model_proto, str(path))
        return None
    onnx.save_model(
        model_proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=bundle.MODEL_DATA_FILE,
        size_threshold=1024,
    )
    shutil.copymode(path, folder / bundle.MODEL_DATA_FILE)  # onnx creates it owner-only; share it like model.onnx
    return bundle.MODEL_DATA_FILE


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node of a graph, the nodes of its If branches included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _nodes(attribute.g)


def _scheme(bits: int, block_size: int) -> str:
    if bits == 8:
        return f"int8, symmetric blocks of {block_size} inputs per output, one float32 scale each (zero point 128)"
    return (
        f"int4, asymmetric blocks of {block_size} inputs per output, one float32 scale and one 4-bit zero point each "
        "(two values a byte, the first in the low nibble)"
    )


def _quantization_record(
    model_proto: Any,
    quantize: str,
    block_size: int,
    head_bits: int,
    outliers: dict[str, list[int]],
    rounding: dict[str, Any],
    int8_layers: tuple[int, ...],
) -> dict[str, Any]:
    """What bundle.json says about quantised weights."""
    ops = [node.op_type for node in _nodes(model_proto.graph)]
    bits = QUANT_BITS[quantize]
    head_block = head_block_size(bits, head_bits, block_size)
    record = {
        "weights": quantize,
        "scheme": _scheme(bits, block_size),
        "block_size": block_size,
        "activations": "int8, quantised per block at run time (MatMulNBits accuracy_level 4)",
        "op": "com.microsoft.MatMulNBits",
        "projections": ops.count("MatMulNBits"),
        "covers": "every attention and MLP projection, the lm_head (vocabulary projection) and the token embedding",
        "head": {"bits": head_bits, "block_size": head_block, "scheme": _scheme(head_bits, head_block)},
        "outlier_channels": {
            "rule": f"input channels whose largest |input| on the sample text is over {OUTLIER_RATIO:g}x the median "
            "channel's are multiplied in float32 beside the quantised product (LLM.int8()'s decomposition)",
            "projections": len(outliers),
            "channels": sum(map(len, outliers.values())),
        },
        "rounding": rounding,
    }
    if quantize == "int4":
        record["int8_layers"] = {
            "blocks": list(int8_layers),
            "scheme": _scheme(8, block_size),
            "covers": "every attention and MLP projection of these blocks",
        }
    if "DynamicQuantizeMatMul" in ops:
        record["prompt_steps"] = {
            "when": "a step of more than one token (prompts); single-token steps use the blocks above",
            "scheme": "symmetric int8 holding 7-bit levels (-63..63), one float32 scale per output column",
            "activations": "int8, quantised per tensor at run time",
            "op": "com.microsoft.DynamicQuantizeMatMul",
            "projections": ops.count("DynamicQuantizeMatMul"),
            "covers": "every attention and MLP projection (embedding and lm_head stay in blocks)",
        }
    return record


def _rounding_record(rounding: str, calibration_tokens: int) -> dict[str, Any]:
    """What bundle.json says about how the quantised weights were rounded."""
    if rounding == "nearest":
        return {"method": "nearest", "covers": "every quantised weight: each to its block's nearest level"}
    return {
        "method": "gptq",
        "covers": "every attention and MLP projection's blocks; the lm_head and token embedding round to nearest",
        "calibration": f"export/data/calibration_text.txt, {calibration_tokens} tokens (not the sample text)",
        "damping": GPTQ_DAMPING,
    }


def _gptq_levels(
    checkpoint: Checkpoint,
    weights: dict[str, np.ndarray],
    ids: np.ndarray,
    bits: int,
    block_size: int,
    outliers: dict[str, list[int]],
    int8_layers: tuple[int, ...],
) -> dict[str, BlockLevels]:
    """Each projection's levels rounded by GPTQ on the inputs it sees over ids (8 bits in int8_layers' blocks), its
    outlier channels (multiplied in float by the graph) zeroed in the matrix and left out of its Hessian."""
    levels = {}
    for name, hessian in input_hessians(checkpoint.model, ids):
        matrix = weights[name].copy()  # Conv1D: [in, out]
        channels = outliers.get(name, [])
        matrix[channels] = 0.0
        hessian[channels, :] = 0.0
        hessian[:, channels] = 0.0
        levels[name] = gptq(matrix.T, hessian, projection_bits(name, bits, int8_layers), block_size)
    return levels


def _precision_hint(quantize: str, block_size: int, head_bits: int, rounding: str) -> str:
    """What keeps more precision than this variant, in export-gpt2 flags."""
    options = ["--head-bits 8"] if quantize == "int4" and head_bits == 4 else []
    options += ["more blocks in --int8-layers"] if quantize == "int4" else []
    options += ["a smaller --block-size"] if block_size > min(QUANT_BLOCKS) else []
    options += ["--rounding gptq"] if rounding == "nearest" else []
    options += ["--quantize int8"] if quantize == "int4" else ["fp32 weights (no --quantize)"]
    return " or ".join(options) + " would keep more precision"


def _contrib_ops(model_proto: Any) -> list[str]:
    """The onnxruntime contrib ops (fusions) the graph uses, by name."""
    return sorted({node.op_type for node in _nodes(model_proto.graph) if node.domain == CONTRIB})


def _remove_stale_staging(output: Path) -> None:
    """Delete staging folders that killed exports (kill -9, power loss) left beside output."""
    for folder in output.parent.glob(f".{output.name}.partial-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _process_alive(int(pid))):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _place(staging: Path, output: Path, force: bool) -> None:
    """Move the finished staging folder to output; an existing output is replaced only with force."""
    if output.exists():
        if not force:
            raise InvalidInputError(f"output folder {output} already exists; pass --force to replace it")
        retired = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(retired)
        staging.rename(output)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(output)


def resolve_kv_cache(kv_cache: str, dtype: str, optimize: bool) -> str:
    """'auto' -> preallocated for fused fp32/int8 graphs (CPU), growing for fp16 (CUDA) and standard-op graphs."""
    if kv_cache != "auto":
        return kv_cache
    return "preallocated" if optimize and DTYPES[dtype] == "float32" else "growing"


def check_graph_options(
    dtype: str,
    optimize: bool,
    quantize: str | None,
    fast_prefill: bool,
    kv_cache: str,
    block_size: int | None,
    head_bits: int | None = None,
    rounding: str | None = None,
    int8_layers: Sequence[int] | None = None,
) -> None:
    """Raise InvalidInputError for a graph variant that cannot be built (named by its export-gpt2 flags)."""
    if dtype not in DTYPES:
        raise InvalidInputError(f"unsupported dtype {dtype!r}; choose fp32 or fp16")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise InvalidInputError(f"unsupported quantization {quantize!r}; choose {', '.join(QUANTIZATIONS)}")
    if quantize is not None and DTYPES[dtype] != "float32":
        raise InvalidInputError(f"--quantize {quantize} applies to fp32 weights; drop --dtype {dtype}")
    if quantize is not None and not optimize:
        raise InvalidInputError(f"--quantize {quantize} builds on the fused graph; drop --no-optimize")
    if fast_prefill and quantize != "int8":
        raise InvalidInputError("--fast-prefill adds int8 prompt kernels to an int8 graph; add --quantize int8")
    if block_size is not None and quantize is None:
        raise InvalidInputError("--block-size sets the quantised weights' blocks; add --quantize int8 or int4")
    if head_bits is not None and quantize != "int4":
        raise InvalidInputError("--head-bits sets the lm_head's bits in an int4 graph; add --quantize int4")
    if head_bits is not None and head_bits not in HEAD_BITS:
        raise InvalidInputError(f"unsupported head bits {head_bits!r}; choose {' or '.join(map(str, HEAD_BITS))}")
    if int8_layers is not None and quantize != "int4":
        raise InvalidInputError("--int8-layers keeps blocks of an int4 graph at 8 bits; add --quantize int4")
    if int8_layers is not None and any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in int8_layers):
        raise InvalidInputError(f"--int8-layers takes block indices from 0, got {list(int8_layers)}")
    if rounding is not None and quantize is None:
        raise InvalidInputError("--rounding sets how quantised weights are rounded; add --quantize int8 or int4")
    if rounding is not None and rounding not in ROUNDINGS:
        raise InvalidInputError(f"unsupported rounding {rounding!r}; choose {' or '.join(ROUNDINGS)}")
    if block_size is not None and block_size not in QUANT_BLOCKS:
        raise InvalidInputError(f"unsupported block size {block_size!r}; choose {', '.join(map(str, QUANT_BLOCKS))}")
    if kv_cache not in ("auto", *bundle.KV_CACHES):
        raise InvalidInputError(f"unsupported kv_cache {kv_cache!r}; choose auto, {', '.join(bundle.KV_CACHES)}")
    if kv_cache == "preallocated" and not optimize:
        raise InvalidInputError(
            "--kv-cache preallocated needs the fused graph (GroupQueryAttention); drop --no-optimize"
        )


def export_bundle(
    model: str | None = None,
    output: str | Path | None = None,
    *,
    dtype: str = "fp32",
    optimize: bool = True,
    quantize: str | None = None,
    fast_prefill: bool = False,
    kv_cache: str = "auto",
    block_size: int | None = None,
    random_init: str | None = None,
    seed: int = 0,
    outliers: bool = False,
    isolate_outliers: bool = True,
    head_bits: int | None = None,
    rounding: str | None = None,
    int8_layers: Sequence[int] | None = None,
    tokenizer: str | None = None,
    revision: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Export a GPT-2 checkpoint (hub id or folder; default gpt2) or a random_init shape to a bundle folder (default
    models/<name>); return its path.

    Every input is checked before the slow work, each problem an InvalidInputError naming the export-gpt2 flag. The
    tokenizer is `tokenizer` (a folder, tokenizer.json file or hub id), else the checkpoint's own; random_init, and a
    checkpoint folder without tokenizer files whose vocabulary is GPT-2's, get the GPT-2 tokenizer shipped with
    gpt2onnx; bundle.json's source.tokenizer records which (None: the bundle takes token ids only, said in a notice).

    optimize: build the graph from onnxruntime's fused contrib ops (attention with past/present, FastGelu); False
    keeps standard ONNX ops only. kv_cache: "preallocated" (fused only: GroupQueryAttention updates one buffer in
    place; CPU provider only), "growing" (each step returns past + new positions; CUDA too) or "auto" (preallocated
    for fused fp32 and int8 graphs, growing otherwise). quantize="int8" or "int4": quantised weights in the fused
    graph (MatMulNBits, int8 activations at run time; fp32 only), one scale per block_size inputs (32 to 256, default
    128 for int8, 32 for int4; larger decodes faster, smaller stays closer to fp32); head_bits (int4 only, default 8):
    the lm_head's and token embedding's bits; int8_layers (int4 only, default graph.DEFAULT_INT8_LAYERS, the first):
    the blocks whose projections stay at 8 bits (in blocks of block_size). rounding (with quantize): "gptq" (each
    projection rounded by GPTQ against its inputs' Hessian on export/data/calibration_text.txt, export/rounding.py;
    int4's default) or "nearest" (int8's default).
    fast_prefill (with int8): the blocks a second time as
    int8 matrices for onnxruntime's int8 GEMM, used for steps of several tokens (prompts): faster prompts for more
    memory. Quantised projections multiply their outlier input channels (export/calibrate.py, found on the sample
    text) in float32 beside the int8 product unless isolate_outliers is False. outliers (with random_init): write
    trained GPT-2's outliers into the random weights (export/outliers.py). Validation warns when quantised weights
    fall below validate.FLOORS on the sample text. The bundle is assembled in a hidden sibling folder and renamed into
    place after validation, so a failed or interrupted export leaves no bundle (and no half-written one) at `output`.
    """
    progress = progress or Progress(enabled=False)
    check_graph_options(dtype, optimize, quantize, fast_prefill, kv_cache, block_size, head_bits, rounding, int8_layers)
    kv_cache = resolve_kv_cache(kv_cache, dtype, optimize)
    block_size = block_size or DEFAULT_BLOCK_SIZES.get(quantize or "int8")
    head_bits = (head_bits or DEFAULT_HEAD_BITS) if quantize == "int4" else QUANT_BITS.get(quantize)
    rounding = rounding or DEFAULT_ROUNDING.get(quantize or "int8")
    int8_layers = tuple(sorted(set(DEFAULT_INT8_LAYERS if int8_layers is None else int8_layers)))
    int8_layers = int8_layers if quantize == "int4" else ()
    if model is not None and random_init is not None:
        raise InvalidInputError("give --model or --random-init, not both: --random-init builds its own weights")
    if outliers and random_init is None:
        raise InvalidInputError("--outliers writes outliers into --random-init's weights; add --random-init SHAPE")
    if not isolate_outliers and quantize is None:
        raise InvalidInputError("--no-outlier-channels applies to quantised weights; add --quantize int8 or int4")
    model = model or (None if random_init else DEFAULT_MODEL)
    output = Path(output) if output is not None else default_output(model, random_init, outliers)
    check_output(output, force)
    # Every input is checked before the slow work (importing torch, loading, building): a bad one fails at once.
    vocab_size = VOCAB_SIZE if random_init else None
    if model is not None and is_local_path(model):
        vocab_size = check_checkpoint_folder(model).get("vocab_size", VOCAB_SIZE)
    if tokenizer is not None:
        check_tokenizer_source(tokenizer)
    choice = choose_tokenizer(tokenizer, model, vocab_size)
    early_tokenizer = None if choice.source is None or vocab_size is None else tokenizer_json_file(choice.source)
    if early_tokenizer is not None:
        check_tokenizer_fits(early_tokenizer, choice.description, vocab_size)
    _require_export_dependencies()
    graph_dtype = DTYPES[dtype]
    staging = _make_staging(output)
    try:
        what = f"random {random_init} GPT-2" + (" with outliers" if outliers else "") if random_init else model
        with progress.step(f"loading {what}"):
            checkpoint: Checkpoint = (
                random_checkpoint(random_init, seed, outliers)
                if random_init
                else load_pretrained(model, revision, show_downloads=progress.enabled)
            )
        spec = checkpoint.spec
        if int8_layers and int8_layers[-1] >= spec.n_layer:
            raise InvalidInputError(
                f"--int8-layers {int8_layers[-1]} is not a block of this model: it has {spec.n_layer} blocks, "
                f"0 to {spec.n_layer - 1}"
            )
        with progress.step("saving the tokenizer"):
            choice, tokenizer_name = _save_tokenizer(choice, model, revision, spec.vocab_size, staging)
        if choice.notice and choice.source is None:
            warnings.warn(choice.notice, UserWarning, stacklevel=2)  # shown with --quiet and to API callers too
        elif choice.notice:
            progress.notice(choice.notice)
        checkpoint.source["tokenizer"] = choice.description
        kind = ("fused" if optimize else "plain") + (
            f", {quantize} weights in blocks of {block_size}, rounded by {rounding}" if quantize else ""
        )
        if int8_layers:
            kind += f", block{'s' if len(int8_layers) > 1 else ''} {', '.join(map(str, int8_layers))} at 8 bits"
        kind += (", fast prefill" if fast_prefill else "") + f", {kv_cache} cache"
        tokenizer_file = staging / bundle.TOKENIZER_FILE if tokenizer_name else None
        text_ids = sample_ids(tokenizer_file, spec.vocab_size, seed)
        float_channels: dict[str, list[int]] = {}
        if quantize and isolate_outliers:
            with progress.step("finding outlier channels on the sample text"):
                float_channels = outlier_channels(checkpoint.model, text_ids)
        weights = checkpoint.weights()
        rounded: dict[str, BlockLevels] = {}
        rounding_record = _rounding_record(rounding, 0)
        if quantize and rounding == "gptq":
            calibration = calibration_ids(tokenizer_file, spec.vocab_size, seed)
            with progress.step(f"rounding the projections by GPTQ on the calibration text ({len(calibration)} tokens)"):
                bits = QUANT_BITS[quantize]
                rounded = _gptq_levels(checkpoint, weights, calibration, bits, block_size, float_channels, int8_layers)
            rounding_record = _rounding_record(rounding, len(calibration))
        with progress.step(f"building the ONNX graph ({spec.n_layer} layers, {graph_dtype}, {kind})"):
            model_proto = build_graph(
                spec,
                weights,
                graph_dtype,
                fused=optimize,
                bits=QUANT_BITS.get(quantize),
                head_bits=head_bits,
                fast_prefill=fast_prefill,
                kv_cache=kv_cache,
                block_size=block_size,
                outliers=float_channels,
                rounded=rounded,
                int8_layers=int8_layers,
            )
            optimizations = _contrib_ops(model_proto)
            quantization = (
                _quantization_record(
                    model_proto, quantize, block_size, head_bits, float_channels, rounding_record, int8_layers
                )
                if quantize
                else None
            )
            external = _save_graph(model_proto, staging)
            del weights, model_proto, rounded
        architecture = {
            "n_layer": spec.n_layer,
            "n_head": spec.n_head,
            "head_dim": spec.head_dim,
            "n_embd": spec.n_embd,
            "n_inner": spec.n_inner,
            "vocab_size": spec.vocab_size,
            "n_positions": spec.n_positions,
            "activation": spec.activation,
            "layer_norm_epsilon": spec.layer_norm_epsilon,
        }
        data = bundle.new_manifest(
            source=checkpoint.source,
            architecture=architecture,
            special_tokens=checkpoint.special_tokens,
            generation_defaults=checkpoint.generation_defaults,
            external_data=external,
            dtype=graph_dtype,
            opset=OPSET,
            kv_cache=kv_cache,
            ragged_rows=kv_cache == "preallocated",  # GroupQueryAttention's seqlens_k per row (export/graph.py)
            tied_embeddings=spec.tied_embeddings,
            optimizations=optimizations,
            quantization=quantization,
            tokenizer=tokenizer_name,
            tools=_tool_versions(),
        )
        with progress.step("hashing files"):
            data["files"] = bundle.describe_files(staging)
        bundle.write_manifest(staging, data)
        with progress.step("validating against PyTorch"):
            manifest = bundle.read_manifest(staging, verify_hashes=False)
            report = validate_bundle(checkpoint.model, manifest, quantize or graph_dtype, text_ids, seed=seed)
        if not report.passed:
            raise ExportError(
                f"validation failed: max |logits diff| {report.max_abs_diff:.3g} "
                f"(relative {report.relative_diff:.3g}) is over the tolerance {report.tolerance:g}"
            )
        missed = report.below_floors()
        if missed:
            warnings.warn(
                f"{quantize} weights fall below the quality floors on the sample text: {', '.join(missed)}; "
                f"{_precision_hint(quantize, block_size, head_bits, rounding)} (benchmarks/README.md, "
                "'Quantisation quality', has each variant's figures)",
                UserWarning,
                stacklevel=2,
            )
        data["validation"] = report.to_dict()
        bundle.write_manifest(staging, data)
        _place(staging, output, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output
