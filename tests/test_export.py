"""export-gpt2 on real checkpoint folders: the tiny reference model (tests/fixtures), bundle contents, cleanup."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gpt2onnx
from conftest import REFERENCE_CHECKPOINT, random_gpt2
from gpt2onnx.export.exporter import export_bundle
from gpt2onnx.runtime import bundle
from gpt2onnx.runtime.errors import ExportError, InvalidInputError
from reference import reference_generate


@pytest.fixture(scope="module")
def reference_model_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    checkpoint = REFERENCE_CHECKPOINT
    return checkpoint, export_bundle(str(checkpoint), tmp_path_factory.mktemp("ref") / "tiny-random-gpt2")


def test_reference_checkpoint_bundle_records_what_it_is(reference_model_bundle: tuple[Path, Path]) -> None:
    checkpoint, folder = reference_model_bundle
    manifest = json.loads((folder / bundle.MANIFEST_FILE).read_text())
    assert manifest["architecture"] == {
        "n_layer": 5,
        "n_head": 4,
        "head_dim": 8,
        "n_embd": 32,
        "n_inner": 128,
        "vocab_size": 1000,
        "n_positions": 512,
        "activation": "gelu_new",
        "layer_norm_epsilon": 1e-05,
    }
    assert manifest["special_tokens"] == {"bos_token_id": 98, "eos_token_id": 98, "pad_token_id": 98}
    assert manifest["source"]["model"] == str(checkpoint.resolve())
    assert set(manifest["files"]) == {"model.onnx", "tokenizer.json"}
    for name, entry in manifest["files"].items():
        assert entry == bundle.describe_file(folder / name)
    assert manifest["validation"]["passed"] and manifest["validation"]["max_abs_logits_diff"] < 1e-4
    assert {"torch", "transformers", "onnx"} <= set(manifest["tools"])
    inputs, outputs = bundle.io_names(5)
    assert manifest["graph"]["inputs"] == inputs and manifest["graph"]["outputs"] == outputs


def test_tied_embedding_is_stored_once(reference_model_bundle: tuple[Path, Path]) -> None:
    import onnx

    graph = onnx.load(str(reference_model_bundle[1] / "model.onnx")).graph
    embedding_sized = [init.name for init in graph.initializer if sorted(init.dims) == [32, 1000]]
    assert len(embedding_sized) == 1, embedding_sized


def test_reference_checkpoint_greedy_matches_transformers(reference_model_bundle: tuple[Path, Path]) -> None:
    from transformers import GPT2LMHeadModel

    checkpoint, folder = reference_model_bundle
    model = gpt2onnx.load(folder, provider="cpu")
    torch_model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    rows = [model.tokenizer.encode(text) for text in ("Hello, my dog is cute and", "I enjoy walking with")]
    ours = [r.sequences[0].generated_token_ids for r in model.generate(input_ids=rows, max_new_tokens=20).results]
    assert ours == reference_generate(torch_model, rows, 98, [98], max_new_tokens=20, do_sample=False)


def test_random_init_export_needs_no_checkpoint(tmp_path: Path, tokenizer_dir: Path) -> None:
    folder = export_bundle(output=tmp_path / "random", random_init="tiny", seed=4, tokenizer=str(tokenizer_dir))
    manifest = json.loads((folder / bundle.MANIFEST_FILE).read_text())
    assert manifest["source"]["random_init"] == {"shape": "tiny", "seed": 4}
    model = gpt2onnx.load(folder)
    assert model.tokenizer.encode("Artificial intelligence") == [8001, 9542, 4430]
    again = export_bundle(output=tmp_path / "random-again", random_init="tiny", seed=4)
    assert (again / "model.onnx").read_bytes() == (folder / "model.onnx").read_bytes(), "same seed, same weights"
    assert (again / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes(), "the shipped one"


def test_failed_export_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpt2onnx.export import exporter

    def broken_validation(*args, **kwargs):
        raise ExportError("validation failed on purpose")

    monkeypatch.setattr(exporter, "validate_bundle", broken_validation)
    with pytest.raises(ExportError, match="on purpose"):
        export_bundle(output=tmp_path / "out", random_init="tiny")
    assert list(tmp_path.iterdir()) == []


def test_validation_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpt2onnx.export import exporter, validate

    monkeypatch.setattr(validate, "TOLERANCE", {"float32": 0.0, "float16": 0.0})
    real = validate.validate_bundle

    def strict(model, manifest, dtype, sample_ids, seed=0, tolerance=None):
        report = real(model, manifest, dtype, sample_ids, seed, tolerance)
        report.max_abs_diff = 1.0  # as if the graph were wrong
        return report

    monkeypatch.setattr(exporter, "validate_bundle", strict)
    with pytest.raises(ExportError, match="validation failed: max \\|logits diff\\| 1"):
        export_bundle(output=tmp_path / "out", random_init="tiny")
    assert list(tmp_path.iterdir()) == []


def test_non_gpt2_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(InvalidInputError, match="is not a GPT-2 checkpoint \\(model_type 'bert': BertModel\\)"):
        export_bundle(str(tmp_path / "bert"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_untied_lm_head_is_exported(tmp_path: Path) -> None:
    import torch

    model = random_gpt2(0, n_layer=1, n_head=2, n_embd=16, vocab_size=300, n_positions=64, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.normal_()
    model.save_pretrained(tmp_path / "untied")
    folder = export_bundle(str(tmp_path / "untied"), tmp_path / "bundle")
    ids = np.array([[5, 6, 7]])
    session = gpt2onnx.load(folder).session
    logits, _ = session.forward(ids, np.ones_like(ids), np.arange(3)[None], session.empty_cache(1), 0)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    assert np.max(np.abs(logits - expected)) < 1e-4
