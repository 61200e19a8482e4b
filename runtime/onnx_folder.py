"""GPT-2 ONNX exports made elsewhere, read as they are: optimum-cli's folders and transformers.js's repositories.

optimum (`optimum-cli export onnx --task text-generation-with-past`): model.onnx (or decoder_model_merged.onnx) beside
config.json, generation_config.json and tokenizer.json. transformers.js: the same files with the graphs under onnx/
(model.onnx, model_fp16.onnx, model_quantized.onnx, ...; older repositories decoder_model_merged.onnx). A folder
becomes a Manifest like a bundle's (no files to verify: nothing recorded their hashes; export-gpt2 --from-onnx
makes a verified bundle of one), and the session finds the graph's interface from the graph (runtime/interface.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import bundle
from .bundle import Architecture, Manifest
from .errors import BundleError, InvalidInputError
from .options import GENERATION_DEFAULT_KEYS

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
GRAPH_FOLDER = "onnx"  # transformers.js
# The graph taken when onnx_file does not name one: the full-precision decoder with past of each layout.
PREFERRED_GRAPHS = (
    "model.onnx",
    "decoder_model_merged.onnx",
    f"{GRAPH_FOLDER}/model.onnx",
    f"{GRAPH_FOLDER}/decoder_model_merged.onnx",
)
QUANTISED_MARKS = ("quantized", "int8", "uint8", "q4", "bnb4", "int4")


def is_onnx_folder(folder: Path) -> bool:
    """Whether a folder is an ONNX export made elsewhere: no bundle.json, a config.json, and a graph."""
    return (
        folder.is_dir()
        and not (folder / bundle.MANIFEST_FILE).is_file()
        and (folder / CONFIG_FILE).is_file()
        and bool(graph_files(folder))
    )


def graph_files(folder: Path) -> list[str]:
    """The .onnx files of the folder and of its onnx/ subfolder, as paths relative to the folder."""
    found = [path.name for path in folder.glob("*.onnx")]
    found += [f"{GRAPH_FOLDER}/{path.name}" for path in (folder / GRAPH_FOLDER).glob("*.onnx")]
    return sorted(found)


def choose_graph(folder: Path, onnx_file: str | None) -> str:
    """The graph to run: onnx_file (a name among graph_files, with or without onnx/), else the preferred one."""
    graphs = graph_files(folder)
    if onnx_file is not None:
        for candidate in (onnx_file, f"{GRAPH_FOLDER}/{onnx_file}"):
            if candidate in graphs:
                return candidate
        raise InvalidInputError(f"{folder} has no graph {onnx_file!r} (it has {', '.join(graphs)})", option="onnx_file")
    for name in PREFERRED_GRAPHS:
        if name in graphs:
            return name
    if len(graphs) == 1:
        return graphs[0]
    raise InvalidInputError(
        f"{folder} holds {len(graphs)} graphs ({', '.join(graphs)}): pick one with onnx_file", option="onnx_file"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path} is not a JSON object")
    return data


def read_architecture(config: dict[str, Any], path: Path) -> Architecture:
    """GPT-2's shape numbers from a transformers config.json; BundleError for another model type."""
    kind = config.get("model_type")
    if kind != "gpt2":
        raise BundleError(f"{path} is the config of a {kind or 'unknown'!r} model; this runtime runs GPT-2 (gpt2) only")
    values = {"n_positions": config.get("n_positions", config.get("n_ctx"))}
    values |= {key: config.get(key) for key in ("n_layer", "n_head", "n_embd", "vocab_size")}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BundleError(f"{path} has no usable {key}: {value!r}")
    if values["n_embd"] % values["n_head"]:
        raise BundleError(f"{path}: n_embd is not a multiple of n_head")
    return Architecture(**values)


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_onnx_folder(folder: str | Path, onnx_file: str | None = None) -> Manifest:
    """The Manifest of an optimum or transformers.js folder, its graph chosen by choose_graph."""
    folder = Path(folder)
    graph = choose_graph(folder, onnx_file)
    config = _read_json(folder / CONFIG_FILE)
    architecture = read_architecture(config, folder / CONFIG_FILE)
    generation = _read_json(folder / GENERATION_CONFIG_FILE) if (folder / GENERATION_CONFIG_FILE).is_file() else {}
    tokens = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = _first_id(generation.get(key, config.get(key)))
        tokens[key] = value if value is not None and 0 <= value < architecture.vocab_size else None
    quantised = any(mark in Path(graph).stem.lower() for mark in QUANTISED_MARKS)
    data = {
        "format": bundle.FORMAT_NAME,
        "source": {
            "model": folder.name,
            "layout": "transformers.js" if graph.startswith(f"{GRAPH_FOLDER}/") else "optimum",
            "onnx_file": graph,
        },
        "architecture": asdict(architecture),
        "special_tokens": tokens,
        "generation_defaults": {key: generation[key] for key in GENERATION_DEFAULT_KEYS if key in generation},
        "graph": {"file": graph, "kv_cache": "growing", "quantization": {"graph": graph} if quantised else None},
        "tokenizer": bundle.TOKENIZER_FILE if (folder / bundle.TOKENIZER_FILE).is_file() else None,
        "files": {},
    }
    return Manifest(
        folder=folder,
        data=data,
        architecture=architecture,
        bos_token_id=tokens["bos_token_id"],
        eos_token_id=tokens["eos_token_id"],
        pad_token_id=tokens["pad_token_id"],
        dtype="float32",  # until the session has read the graph's past (model.load)
    )
