"""Damaged bundles, each made by the test from a good one, are refused with their own clear error."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import gpt2onnx
from conftest import RandomGPT2
from gpt2onnx.runtime import bundle

Damage = Callable[[Path], None]


def edit_manifest(folder: Path, change: Callable[[dict], None], rehash: bool = False) -> None:
    path = folder / bundle.MANIFEST_FILE
    data = json.loads(path.read_text())
    if rehash:
        for name in data["files"]:
            data["files"][name] = bundle.describe_file(folder / name)
    change(data)
    path.write_text(json.dumps(data))


def truncate_model(folder: Path) -> None:
    path = folder / "model.onnx"
    path.write_bytes(path.read_bytes()[:-100])


def flip_a_weight_byte(folder: Path) -> None:
    path = folder / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the weights: still a valid graph
    path.write_bytes(bytes(data))


def remove_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


def point_outside(folder: Path) -> None:
    edit_manifest(folder, lambda data: data["graph"].update(file="../outside.onnx"))


def newer_schema(folder: Path) -> None:
    edit_manifest(folder, lambda data: data.update(schema_version=bundle.SCHEMA_VERSION + 1))


def unknown_kv_cache(folder: Path) -> None:
    edit_manifest(folder, lambda data: data["graph"].update(kv_cache="paged"))


def garbage_manifest(folder: Path) -> None:
    (folder / bundle.MANIFEST_FILE).write_text("{not json")


def remove_manifest(folder: Path) -> None:
    (folder / bundle.MANIFEST_FILE).unlink()


def drop_architecture_field(folder: Path) -> None:
    edit_manifest(folder, lambda data: data["architecture"].pop("n_head"))


def unlisted_model_file(folder: Path) -> None:
    edit_manifest(folder, lambda data: data["files"].pop("model.onnx"))


def eos_outside_vocabulary(folder: Path) -> None:
    edit_manifest(folder, lambda data: data["special_tokens"].update(eos_token_id=10**6))


def rename_a_graph_input(folder: Path) -> None:
    import onnx

    model = onnx.load(str(folder / "model.onnx"))
    old = model.graph.input[0].name
    model.graph.input[0].name = "renamed_ids"
    for node in model.graph.node:
        node.input[:] = ["renamed_ids" if name == old else name for name in node.input]
    onnx.save(model, str(folder / "model.onnx"))
    edit_manifest(folder, lambda data: None, rehash=True)


def model_file_not_onnx(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"this is not a protobuf" * 10)
    edit_manifest(folder, lambda data: None, rehash=True)


def model_file_replaced(folder: Path) -> None:
    """Garbage of the same size: onnxruntime fails to load it while the hashes are checked beside it."""
    path = folder / "model.onnx"
    path.write_bytes(b"\0" * path.stat().st_size)


def oversized_tokenizer(folder: Path) -> None:
    def shrink_vocabulary(data: dict) -> None:
        data["architecture"]["vocab_size"] = 1000
        data["special_tokens"] = {"bos_token_id": 5, "eos_token_id": 5, "pad_token_id": None}

    edit_manifest(folder, shrink_vocabulary)


CASES: list[tuple[Damage, str]] = [
    (truncate_model, "file model.onnx has .* bytes, the manifest says"),
    (flip_a_weight_byte, "file model.onnx does not match its sha256"),
    (remove_tokenizer, "file tokenizer.json is missing"),
    (point_outside, "names a file outside the bundle folder: '../outside.onnx'"),
    (newer_schema, f"schema version {bundle.SCHEMA_VERSION + 1} is newer than this gpt2onnx supports"),
    (unknown_kv_cache, "unsupported graph kv_cache 'paged' \\(this gpt2onnx knows growing, preallocated\\)"),
    (garbage_manifest, "bundle.json is not valid JSON"),
    (remove_manifest, "bundle.json is missing"),
    (drop_architecture_field, "lacks 'architecture.n_head'"),
    (unlisted_model_file, "does not list the file model.onnx"),
    (eos_outside_vocabulary, "special_tokens.eos_token_id is not a token id of this model"),
    (rename_a_graph_input, "model.onnx is not a GPT-2 decoder: it has no input_ids input"),
    (model_file_not_onnx, "onnxruntime cannot load model.onnx"),
    (model_file_replaced, "file model.onnx does not match its sha256"),  # the cause, not the loader's complaint
    (oversized_tokenizer, "the tokenizer has 50257 tokens, more than the model's vocabulary of 1000"),
]


@pytest.mark.parametrize(("damage", "message"), CASES, ids=[case[0].__name__ for case in CASES])
def test_damaged_bundle_is_refused(tiny_gpt2: RandomGPT2, tmp_path: Path, damage: Damage, message: str) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_gpt2.bundle, folder)
    gpt2onnx.load(folder)  # the copy is good before the damage
    damage(folder)
    with pytest.raises(gpt2onnx.BundleError, match=message) as caught:
        gpt2onnx.load(folder)
    assert "\n" not in str(caught.value)


def test_hash_check_is_skipped_only_when_asked(tiny_gpt2: RandomGPT2, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_gpt2.bundle, folder)
    flip_a_weight_byte(folder)  # same size, other content
    with pytest.raises(gpt2onnx.BundleError, match=r"model\.onnx does not match its sha256"):
        gpt2onnx.load(folder)
    model = gpt2onnx.load(folder, verify_hashes=False)
    assert model.generate("a", max_new_tokens=2).results[0].sequences[0].generated_token_ids


def test_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(gpt2onnx.BundleError, match=f"bundle folder not found: {tmp_path / 'absent'}"):
        gpt2onnx.load(tmp_path / "absent")
