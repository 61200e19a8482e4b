"""The bundle format, in one place for both sides: the manifest (bundle.json) that export writes (new_manifest,
describe_files, write_manifest) and the runtime reads and verifies on load (read_manifest). Every field is
described in docs/BUNDLE.md."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT_NAME = "gpt2-onnx-bundle"
SCHEMA_VERSION = 1
MANIFEST_FILE = "bundle.json"
MODEL_FILE = "model.onnx"
MODEL_DATA_FILE = "model.onnx.data"
TOKENIZER_FILE = "tokenizer.json"

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS_TO_KEEP = "logits_to_keep"
LOGITS = "logits"
KV_CACHES = ("growing", "preallocated")


def past_key_name(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value_name(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key_name(layer: int) -> str:
    return f"present.{layer}.key"


def present_value_name(layer: int) -> str:
    return f"present.{layer}.value"


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """The graph's input and output names, in order, for a model of n_layer blocks."""
    inputs = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS_TO_KEEP]
    outputs = [LOGITS]
    for layer in range(n_layer):
        inputs += [past_key_name(layer), past_value_name(layer)]
        outputs += [present_key_name(layer), present_value_name(layer)]
    return inputs, outputs


def new_manifest(
    *,
    source: dict[str, Any],
    architecture: dict[str, Any],
    special_tokens: dict[str, int | None],
    generation_defaults: dict[str, Any],
    external_data: str | None,
    dtype: str,
    opset: int | None,
    kv_cache: str,
    ragged_rows: bool,
    tied_embeddings: bool | None,
    optimizations: list[str],
    quantization: dict[str, Any] | None,
    tokenizer: str | None,
    tools: dict[str, str],
) -> dict[str, Any]:
    """bundle.json's content before its files are hashed (describe_files) and the export's validation is added."""
    inputs, outputs = io_names(architecture["n_layer"])
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "architecture": architecture,
        "special_tokens": special_tokens,
        "generation_defaults": generation_defaults,
        "graph": {
            "file": MODEL_FILE,
            "external_data": external_data,
            "dtype": dtype,
            "opset": opset,
            "inputs": inputs,
            "outputs": outputs,
            "kv_cache": kv_cache,
            "ragged_rows": ragged_rows,
            "logits": "last `logits_to_keep` positions (0 = all), float32",
            "tied_embeddings": tied_embeddings,
            "optimizations": optimizations,
            "quantization": quantization,
        },
        "tokenizer": tokenizer,
        "tools": tools,
    }


def describe_files(folder: Path) -> dict[str, Any]:
    """The manifest's `files`: every file of the folder with its size and sha256."""
    return {name: describe_file(folder / name) for name in sorted(os.listdir(folder))}


def write_manifest(folder: Path, data: dict[str, Any]) -> None:
    (folder / MANIFEST_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def sha256_of(path: Path, chunk_size: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def describe_file(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_of(path)}


@dataclass(frozen=True)
class Architecture:
    """The shape numbers of a GPT-2 model."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked bundle.json."""

    folder: Path
    data: dict[str, Any]
    architecture: Architecture
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    dtype: str
    kv_cache: str = "growing"  # or "preallocated": see runtime/session.py
    ragged_rows: bool = False  # rows of one step may hold different numbers of positions (docs/BUNDLE.md)

    @property
    def model_path(self) -> Path:
        return self.folder / self.data["graph"]["file"]

    @property
    def tokenizer_path(self) -> Path | None:
        name = self.data.get("tokenizer")
        return self.folder / name if name else None

    @property
    def generation_defaults(self) -> dict[str, Any]:
        return dict(self.data.get("generation_defaults") or {})

    @property
    def quantized(self) -> bool:
        """Whether the graph's weights are quantised (graph.quantization)."""
        return bool(self.data["graph"].get("quantization"))

    @property
    def name(self) -> str:
        return str(self.data["source"].get("model") or self.folder.name)


def _fail(folder: Path, what: str) -> BundleError:
    return BundleError(f"bundle {folder}: {what}")


def _require(mapping: dict[str, Any], key: str, kind: type | tuple[type, ...], folder: Path, where: str) -> Any:
    if key not in mapping:
        raise _fail(folder, f"{MANIFEST_FILE} lacks '{where}{key}'")
    value = mapping[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _fail(folder, f"{MANIFEST_FILE} has a bad value for '{where}{key}': {value!r}")
    return value


def _inside(folder: Path, name: str) -> Path:
    """Resolve a file named by the manifest, refusing anything that points outside the bundle folder."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or Path(name).name != name:
        raise _fail(folder, f"{MANIFEST_FILE} names a file outside the bundle folder: {name!r}")
    return folder / name


def read_manifest(folder: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and check a bundle folder's manifest and files; raise BundleError naming what is wrong.

    Sizes are always checked; sha256 hashes too unless verify_hashes is False.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"bundle folder not found: {folder} (create one with export-gpt2)")
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise _fail(folder, f"{MANIFEST_FILE} is missing; is this a folder written by export-gpt2?")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _fail(folder, f"{MANIFEST_FILE} is not valid JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise _fail(folder, f"{MANIFEST_FILE} is not a {FORMAT_NAME} manifest")
    version = _require(data, "schema_version", int, folder, "")
    if version > SCHEMA_VERSION:
        raise _fail(
            folder,
            f"schema version {version} is newer than this gpt2onnx supports ({SCHEMA_VERSION}); upgrade gpt2-onnx",
        )
    if version < 1:
        raise _fail(folder, f"unknown schema version {version}")

    arch = _require(data, "architecture", dict, folder, "")
    architecture = Architecture(
        **{key: _require(arch, key, int, folder, "architecture.") for key in Architecture.__dataclass_fields__}
    )
    if architecture.n_embd % architecture.n_head:
        raise _fail(folder, "architecture.n_embd is not a multiple of n_head")
    graph = _require(data, "graph", dict, folder, "")
    _inside(folder, _require(graph, "file", str, folder, "graph."))
    dtype = _require(graph, "dtype", str, folder, "graph.")
    if dtype not in ("float32", "float16"):
        raise _fail(folder, f"unsupported graph dtype {dtype!r}")
    kv_cache = graph.get("kv_cache", "growing")
    if kv_cache not in KV_CACHES:
        raise _fail(folder, f"unsupported graph kv_cache {kv_cache!r} (this gpt2onnx knows {', '.join(KV_CACHES)})")
    tokens = _require(data, "special_tokens", dict, folder, "")
    _require(data, "source", dict, folder, "")

    files = _require(data, "files", dict, folder, "")
    required = {graph["file"], *filter(None, [graph.get("external_data"), data.get("tokenizer")])}
    for name in sorted(required - set(files)):
        raise _fail(folder, f"{MANIFEST_FILE} does not list the file {name}")
    for name, entry in files.items():
        path = _inside(folder, name)
        if not path.is_file():
            raise _fail(folder, f"file {name} is missing")
        if not isinstance(entry, dict):
            raise _fail(folder, f"{MANIFEST_FILE} has a bad entry for file {name}")
        size = path.stat().st_size
        if size != entry.get("size"):
            raise _fail(folder, f"file {name} has {size} bytes, the manifest says {entry.get('size')} (damaged?)")

    def token(key: str) -> int | None:
        value = tokens.get(key)
        if value is not None and (not isinstance(value, int) or not 0 <= value < architecture.vocab_size):
            raise _fail(folder, f"special_tokens.{key} is not a token id of this model: {value!r}")
        return value

    manifest = Manifest(
        folder=folder,
        data=data,
        architecture=architecture,
        bos_token_id=token("bos_token_id"),
        eos_token_id=token("eos_token_id"),
        pad_token_id=token("pad_token_id"),
        dtype=dtype,
        kv_cache=kv_cache,
        ragged_rows=graph.get("ragged_rows") is True,
    )
    if verify_hashes:
        check_hashes(manifest)
    return manifest


def check_hashes(manifest: Manifest) -> None:
    """Raise BundleError naming the first file whose sha256 differs from the manifest's."""
    for name, entry in manifest.data["files"].items():
        if sha256_of(manifest.folder / name) != entry.get("sha256"):
            raise _fail(manifest.folder, f"file {name} does not match its sha256 in the manifest (damaged or altered)")
