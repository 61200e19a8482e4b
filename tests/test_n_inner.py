"""A GPT-2 whose MLP is not 4 * n_embd wide (config.n_inner) exports in every graph variant and matches transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpt2onnx
from conftest import random_gpt2
from gpt2onnx.export.checkpoint import spec_from_config
from gpt2onnx.export.exporter import export_bundle
from reference import reference_generate

N_INNER = 48  # not 4 * n_embd (128), and not a multiple of the int8 block size (128): MatMulNBits gets K = 48
# Tiny random weights have flat logits, so their top-1 agreement misses the quantised floors by chance; the floors'
# warning is tested on its own (test_quantisation_quality.py, test_int4.py).
pytestmark = pytest.mark.filterwarnings("ignore:int[48] weights fall below the quality floors:UserWarning")
CONFIG = {
    "n_layer": 2,
    "n_head": 2,
    "n_embd": 32,
    "n_inner": N_INNER,
    "vocab_size": 1000,
    "n_positions": 128,
    "initializer_range": 0.2,
}
SEED = 5
NEW_TOKENS = 12
FLOAT_VARIANTS: dict[str, dict[str, Any]] = {
    "fused": {},
    "fused-growing": {"kv_cache": "growing"},
    "plain": {"optimize": False},
}
INT8_VARIANTS: dict[str, dict[str, Any]] = {
    "int8": {"quantize": "int8"},
    "int8-fast-prefill": {"quantize": "int8", "fast_prefill": True},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("n-inner") / "checkpoint"
    random_gpt2(SEED, **CONFIG).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def torch_model(checkpoint: Path) -> Any:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (CONFIG["n_embd"], N_INNER)
    return model


def _export(checkpoint: Path, name: str, options: dict[str, Any]) -> Path:
    return export_bundle(str(checkpoint), checkpoint.parent / name, seed=SEED, **options)


def _manifest_data(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "bundle.json").read_text())


def _rows(vocab: int) -> list[list[int]]:
    """Prompts of different lengths (the runtime and the reference left-pad them), without the EOS token."""
    rng = np.random.default_rng(SEED)
    return [rng.integers(0, vocab - 1, size=length).tolist() for length in (9, 3, 6)]


def _generated(model: Any, rows: list[list[int]], **options: Any) -> list[list[int]]:
    output = model.generate(input_ids=rows, max_new_tokens=NEW_TOKENS, **options)
    return [result.sequences[0].generated_token_ids for result in output.results]


@pytest.mark.parametrize("variant", list(FLOAT_VARIANTS))
def test_float_graphs_match_transformers_greedy_and_beam(checkpoint: Path, torch_model: Any, variant: str) -> None:
    bundle = _export(checkpoint, variant, FLOAT_VARIANTS[variant])
    data = _manifest_data(bundle)
    assert data["validation"]["passed"] and data["validation"]["teacher_forced_top1_agreement"] == 1.0
    model = gpt2onnx.load(bundle, provider="cpu", threads=1)
    vocab = CONFIG["vocab_size"]
    rows, eos = _rows(vocab), [model.manifest.eos_token_id]
    pad = eos[0]

    greedy = _generated(model, rows)
    assert greedy == reference_generate(torch_model, rows, pad, eos, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert len(set(greedy[0])) > 1, "the test model should not just repeat one token"

    beams = _generated(model, rows, num_beams=4)
    expected = reference_generate(torch_model, rows, pad, eos, max_new_tokens=NEW_TOKENS, num_beams=4, do_sample=False)
    assert beams == expected
    assert beams != greedy, "beam search should find something greedy search does not"


@pytest.mark.parametrize("variant", list(INT8_VARIANTS))
def test_int8_graphs_export_validate_and_generate(checkpoint: Path, variant: str) -> None:
    import onnx

    bundle = _export(checkpoint, variant, INT8_VARIANTS[variant])
    data = _manifest_data(bundle)
    assert data["validation"]["passed"] and data["validation"]["variant"] == "int8"
    # The MLP's second projection takes N_INNER inputs: one MatMulNBits block of 128, zero-padded past 48.
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    ks = {
        attribute.i
        for node in graph.node
        for branch in [node, *(n for a in node.attribute if a.HasField("g") for n in a.g.node)]
        if branch.op_type == "MatMulNBits"
        for attribute in branch.attribute
        if attribute.name == "K"
    }
    assert ks == {CONFIG["n_embd"], N_INNER}

    model = gpt2onnx.load(bundle, provider="cpu", threads=1)
    rows = _rows(CONFIG["vocab_size"])
    for options in ({}, {"num_beams": 4}):
        for tokens in _generated(model, rows, **options):
            assert 0 < len(tokens) <= NEW_TOKENS and all(0 <= token < CONFIG["vocab_size"] for token in tokens)


def test_bundle_records_n_inner(checkpoint: Path) -> None:
    bundle = _export(checkpoint, "record", {})
    architecture = _manifest_data(bundle)["architecture"]
    assert architecture["n_inner"] == N_INNER
    assert architecture["n_embd"] == CONFIG["n_embd"] and architecture["head_dim"] == CONFIG["n_embd"] // 2
    assert gpt2onnx.load(bundle, provider="cpu").manifest.architecture.n_embd == CONFIG["n_embd"]


@pytest.mark.parametrize("n_inner", [None, 4 * CONFIG["n_embd"], N_INNER])
def test_spec_n_inner_defaults_to_four_times_n_embd(n_inner: int | None) -> None:
    from transformers import GPT2Config

    spec = spec_from_config(GPT2Config(**{**CONFIG, "n_inner": n_inner}))
    assert spec.n_inner == (n_inner or 4 * CONFIG["n_embd"])
    if n_inner is None:
        model = random_gpt2(SEED, **{**CONFIG, "n_inner": None})
        assert model.transformer.h[0].mlp.c_fc.weight.shape == (CONFIG["n_embd"], spec.n_inner)
