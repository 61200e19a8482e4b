"""import_onnx_folder(): an optimum or transformers.js GPT-2 export -> a verified bundle, without torch.

The graph, its external data and the tokenizer are copied as they are; bundle.json records their hashes (so the
integrity checks of every bundle apply), the interface found in the graph, and a check run on the sample text: the
logits of the whole text in one step against those of the same text fed with a past (prefill, then a token a step),
and the greedy tokens after it. Written in a hidden sibling folder and moved into place only when complete.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from gpt2onnx import __version__
from gpt2onnx.runtime import bundle
from gpt2onnx.runtime._ort import ort
from gpt2onnx.runtime.errors import ExportError, InvalidInputError
from gpt2onnx.runtime.onnx_folder import CONFIG_FILE, is_onnx_folder, read_onnx_folder
from gpt2onnx.runtime.session import DecoderSession

from .calibrate import sample_ids
from .exporter import Progress, _make_staging, _place, check_output

CHECK_TOKENS = 64  # tokens of the sample text the check run feeds (fewer if the context is shorter)
CHECK_GREEDY = 8  # greedy tokens recorded after them
# Largest |logits difference| between the text fed whole and fed through the past, relative to max(1, max |logit|):
# float32 graphs differ only by the order of their sums; float16 ones round; dynamically quantised ones quantise each
# step's activations with a scale of their own. Measured on a tiny random GPT-2 (tests/test_onnx_folders.py): 3e-7
# float32, 5e-4 float16, 8e-3 for transformers.js's model_quantized.onnx; the bounds leave room for real weights.
CHECK_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "quantised": 0.1}


def import_onnx_folder(
    folder: str | Path,
    output: str | Path,
    onnx_file: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Import the GPT-2 ONNX export in `folder` (its graph chosen by onnx_file, as gpt2onnx.load chooses it) into a
    bundle at `output`; InvalidInputError naming the flag for a bad folder or output, BundleError for a graph that
    is not a GPT-2 decoder with past, ExportError when the check run fails."""
    folder, output = Path(folder), Path(output)
    progress = progress or Progress(enabled=False)
    if not folder.is_dir():
        raise InvalidInputError(f"--from-onnx {folder} is not a folder")
    if not is_onnx_folder(folder):
        raise InvalidInputError(
            f"--from-onnx {folder} is not an optimum or transformers.js export: it needs {CONFIG_FILE} and a graph "
            "(model.onnx, or onnx/*.onnx)"
        )
    if output.resolve() == folder.resolve() or folder.resolve() in output.resolve().parents:
        raise InvalidInputError(f"--output {output} is the --from-onnx folder or inside it: write the bundle elsewhere")
    check_output(output, force)
    with progress.step(f"reading {folder}"):
        manifest = read_onnx_folder(folder, onnx_file)
        # The graph's refusals name the user's file, before anything is written; the check run below opens the copy.
        DecoderSession(manifest, provider="cpu")
    staging = _make_staging(output)
    try:
        with progress.step("copying the graph and tokenizer"):
            graph = manifest.model_path
            data_files = sorted(path for path in graph.parent.iterdir() if _is_external_data(path, graph))
            for path in [graph, *data_files]:
                shutil.copy2(path, staging / path.name)
            if manifest.tokenizer_path is not None:
                shutil.copy2(manifest.tokenizer_path, staging / bundle.TOKENIZER_FILE)
        with progress.step("check run on the sample text"):
            # on the copy: a weights file that was not copied fails here, not in the bundle's first user
            staged_graph = {**manifest.data["graph"], "file": graph.name}
            staged = dataclasses.replace(manifest, folder=staging, data={**manifest.data, "graph": staged_graph})
            session = DecoderSession(staged, provider="cpu")
            check = check_run(session, staging / bundle.TOKENIZER_FILE if manifest.tokenizer_path else None)
        data = _manifest(manifest, session, [path.name for path in data_files], check)
        data["files"] = bundle.describe_files(staging)
        bundle.write_manifest(staging, data)
        bundle.read_manifest(staging)  # what the runtime will read, hashes included
        _place(staging, output, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _is_external_data(path: Path, graph: Path) -> bool:
    """Whether a file beside the graph holds its weights (model.onnx_data, model.onnx.data, model.onnx_data_1...)."""
    return path.is_file() and path.name != graph.name and path.name.startswith(graph.name)


def check_run(session: DecoderSession, tokenizer: Path | None) -> dict[str, Any]:
    """Feed the sample text once whole and once through the past; ExportError if the logits are not finite."""
    arch = session.architecture
    ids = sample_ids(tokenizer, arch.vocab_size, seed=0)[: min(CHECK_TOKENS, arch.n_positions - CHECK_GREEDY)]
    length = len(ids)

    def run(tokens: np.ndarray, past: Any, total: int, keep: int) -> tuple[np.ndarray, Any]:
        mask = np.ones((1, total), dtype=np.int64)
        positions = np.arange(total - len(tokens), total, dtype=np.int64)[None]
        return session.forward(tokens[None], mask, positions, past, logits_to_keep=keep)

    whole, _ = run(ids, session.empty_cache(1), length, 0)
    half = length // 2
    first, past = run(ids[:half], session.empty_cache(1), half, 0)
    stepped = [first[0]]
    for index in range(half, length):
        logits, past = run(ids[index : index + 1], past, index + 1, 1)
        stepped.append(logits[0])
    stepped_logits = np.concatenate(stepped)
    name = session.manifest.model_path.name
    if not (np.isfinite(whole).all() and np.isfinite(stepped_logits).all()):
        raise ExportError(f"{name}: the check run gave logits that are not finite")
    difference = float(np.abs(whole[0] - stepped_logits).max())
    tolerance = check_tolerance(session) * max(1.0, float(np.abs(whole).max()))
    if difference > tolerance:
        raise ExportError(
            f"{name}: the logits through the past differ from those of the whole text by {difference:.3g} (tolerance "
            f"{tolerance:.3g}): the graph's past key/values do not give what it computes without them"
        )
    greedy, total, token = [], length, int(np.argmax(stepped_logits[-1]))
    for _ in range(CHECK_GREEDY):
        greedy.append(token)
        logits, past = run(np.array([token]), past, total + 1, 1)
        total, token = total + 1, int(np.argmax(logits[0, -1]))
    return {
        "tokens": length,
        "max_abs_diff_past_vs_whole": difference,
        "tolerance": tolerance,
        "greedy_after": greedy,
    }


def check_tolerance(session: DecoderSession) -> float:
    """The check run's relative tolerance for this graph (CHECK_TOLERANCE)."""
    if session.manifest.quantized:
        return CHECK_TOLERANCE["quantised"]
    return CHECK_TOLERANCE[session.interface.past_dtype]


def _manifest(manifest: Any, session: DecoderSession, data_files: list[str], check: dict[str, Any]) -> dict[str, Any]:
    source = manifest.data["source"]
    graph = Path(manifest.model_path).name
    interface = session.interface
    data = bundle.new_manifest(
        source={"imported_from": str(manifest.folder.resolve()), **source},
        architecture=dataclasses.asdict(manifest.architecture),
        special_tokens=manifest.data["special_tokens"],
        generation_defaults=manifest.data["generation_defaults"],
        external_data=data_files[0] if len(data_files) == 1 else None,
        dtype=interface.past_dtype,
        opset=None,
        kv_cache="growing",
        ragged_rows=False,
        tied_embeddings=None,
        optimizations=[],
        quantization=manifest.data["graph"]["quantization"],
        tokenizer=bundle.TOKENIZER_FILE if manifest.tokenizer_path is not None else None,
        tools={"gpt2onnx": __version__, "onnxruntime": ort.__version__},
    )
    names, outputs = bundle.io_names(manifest.architecture.n_layer)
    data["graph"].update(
        file=graph,
        inputs=interface.input_names() + names[4:],
        outputs=outputs,
        logits="every new position" if not interface.logits_to_keep else data["graph"]["logits"],
        interface=interface.to_json(),
    )
    data["import_check"] = check
    return data
