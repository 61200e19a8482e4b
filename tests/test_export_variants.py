"""Export variants (fused, plain, int8, int4, fp16) on a tiny random GPT-2: they export, load, record their choices, and
match PyTorch; and the session's device-cache (IO binding + OrtValue) path, exercised on CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import gpt2onnx
from conftest import random_gpt2
from gpt2onnx.cli.export_command import main as export_main
from gpt2onnx.export.checkpoint import random_checkpoint
from gpt2onnx.export.exporter import export_bundle
from gpt2onnx.runtime.bundle import read_manifest
from gpt2onnx.runtime.cache import HostCache, PreallocatedCache
from gpt2onnx.runtime.errors import InvalidInputError, ProviderError
from gpt2onnx.runtime.padding import PaddedBatch, position_ids_from_mask
from gpt2onnx.runtime.session import DecoderSession
from reference import reference_generate, reference_padded_logits

# Tiny random weights have flat logits, so their top-1 agreement misses the quantised floors by chance; the floors'
# warning is tested on its own (test_quantisation_quality.py, test_int4.py).
pytestmark = pytest.mark.filterwarnings("ignore:int[48] weights fall below the quality floors:UserWarning")
SEED = 0
VARIANTS: dict[str, dict[str, Any]] = {
    "fused": {},
    "fused-growing": {"kv_cache": "growing"},
    "plain": {"optimize": False},
    "int8": {"quantize": "int8"},
    "int8-fast-prefill": {"quantize": "int8", "fast_prefill": True},
    "int8-block256": {"quantize": "int8", "block_size": 256},
    "int4": {"quantize": "int4"},
    "int4-head4": {"quantize": "int4", "head_bits": 4, "block_size": 64},
    "fp16": {"dtype": "fp16"},
    "fp16-preallocated": {"dtype": "fp16", "kv_cache": "preallocated"},
}
FUSED_OPS = ["FastGelu", "GroupQueryAttention"]  # preallocated cache (the default for fp32 and int8)
GROWING_OPS = ["FastGelu", "MultiHeadAttention"]
ROWS = [[8001, 811, 34, 498, 493, 36, 15516, 38, 594], [464, 2068, 7586]]


@pytest.fixture(scope="module")
def torch_model() -> Any:
    return random_checkpoint("tiny", SEED).model


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {
        name: export_bundle(output=root / name, random_init="tiny", seed=SEED, **options)
        for name, options in VARIANTS.items()
    }


def _manifest_data(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "bundle.json").read_text())


def _bundle_logits(session: DecoderSession, batch: PaddedBatch) -> np.ndarray:
    positions = position_ids_from_mask(batch.attention_mask)
    empty = session.empty_cache(len(batch.input_ids))
    logits, _ = session.forward(batch.input_ids, batch.attention_mask, positions, empty, logits_to_keep=0)
    return logits


def test_manifest_records_graph_choices(bundles: dict[str, Path]) -> None:
    graphs = {name: _manifest_data(folder)["graph"] for name, folder in bundles.items()}
    assert graphs["fused"]["optimizations"] == FUSED_OPS
    assert graphs["fused-growing"]["optimizations"] == GROWING_OPS
    assert graphs["plain"]["optimizations"] == []
    assert graphs["fp16"]["optimizations"] == GROWING_OPS
    kv_caches = {name: graph["kv_cache"] for name, graph in graphs.items()}
    assert kv_caches == {
        "fused": "preallocated",
        "fused-growing": "growing",
        "plain": "growing",
        "int8": "preallocated",
        "int8-fast-prefill": "preallocated",
        "int8-block256": "preallocated",
        "int4": "preallocated",
        "int4-head4": "preallocated",
        "fp16": "growing",
        "fp16-preallocated": "preallocated",
    }
    assert graphs["fused"]["quantization"] is None
    quantization = graphs["int8"]["quantization"]
    assert (quantization["weights"], quantization["op"]) == ("int8", "com.microsoft.MatMulNBits")
    assert quantization["projections"] == 2 * 4 + 1  # 4 projections per block + the lm_head
    assert graphs["int8"]["optimizations"] == sorted([*FUSED_OPS, "MatMulNBits"])
    assert "prompt_steps" not in quantization
    assert (quantization["block_size"], graphs["int8-block256"]["quantization"]["block_size"]) == (128, 256)
    assert graphs["int8-block256"]["quantization"]["scheme"].startswith("int8, symmetric blocks of 256 inputs")
    assert quantization["head"] == {"bits": 8, "block_size": 128, "scheme": quantization["scheme"]}
    int4, int4_head4 = graphs["int4"]["quantization"], graphs["int4-head4"]["quantization"]
    assert (int4["weights"], int4["block_size"], int4["projections"]) == ("int4", 128, 2 * 4 + 1)
    assert int4["scheme"].startswith("int4, asymmetric blocks of 128 inputs per output, one float32 scale and one")
    assert (int4["head"]["bits"], int4["head"]["block_size"]) == (8, 128)  # the defaults: an int8 lm_head
    assert (int4_head4["head"]["bits"], int4_head4["head"]["block_size"]) == (4, 64)
    fast = graphs["int8-fast-prefill"]["quantization"]
    assert fast["projections"] == 2 * 4 + 1 and fast["prompt_steps"]["projections"] == 2 * 4
    assert fast["prompt_steps"]["op"] == "com.microsoft.DynamicQuantizeMatMul"
    assert graphs["int8-fast-prefill"]["optimizations"] == sorted([*FUSED_OPS, "DynamicQuantizeMatMul", "MatMulNBits"])
    assert [graphs[name]["dtype"] for name in ("fused", "int8", "fp16")] == ["float32", "float32", "float16"]


def test_validation_records_variant_tolerance_and_agreement(bundles: dict[str, Path]) -> None:
    expected = {
        "fused": ("float32", 1e-4),
        "fused-growing": ("float32", 1e-4),
        "plain": ("float32", 1e-4),
        "int8": ("int8", 0.15),
        "int8-fast-prefill": ("int8", 0.15),
        "int8-block256": ("int8", 0.15),
        "int4": ("int4", 0.4),
        "int4-head4": ("int4", 0.4),
        "fp16": ("float16", 2e-2),
        "fp16-preallocated": ("float16", 2e-2),
    }
    for name, folder in bundles.items():
        validation = _manifest_data(folder)["validation"]
        assert (validation["variant"], validation["tolerance"]) == expected[name]
        assert validation["passed"] and validation["relative_diff"] <= validation["tolerance"]
        assert 0.0 <= validation["teacher_forced_top1_agreement"] <= 1.0
    assert _manifest_data(bundles["fused"])["validation"]["teacher_forced_top1_agreement"] == 1.0
    # int8 is reported honestly, not hidden: on this tiny random model it still picks PyTorch's token nearly always.
    assert _manifest_data(bundles["int8"])["validation"]["teacher_forced_top1_agreement"] >= 0.8


def test_fused_fp32_logits_match_pytorch(bundles: dict[str, Path], torch_model: Any) -> None:
    batch = PaddedBatch.from_rows(ROWS, pad_token_id=0)
    session = DecoderSession(read_manifest(bundles["fused"]), provider="cpu")
    logits, reference = _bundle_logits(session, batch), reference_padded_logits(torch_model, ROWS, 0)
    real = batch.attention_mask.astype(bool)
    assert np.max(np.abs(logits[real] - reference[real])) <= 1e-4 * max(1.0, np.max(np.abs(reference[real])))


@pytest.mark.parametrize("activation", ["gelu", "relu", "quick_gelu"])
def test_other_activations_in_fused_and_int8_graphs(tmp_path: Path, activation: str) -> None:
    """Activations other than GPT-2's tanh GELU: the fused graph matches PyTorch; the int8 one passes validation."""
    model = random_gpt2(
        SEED, n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=64, activation_function=activation
    )
    model.save_pretrained(tmp_path / "checkpoint")
    fused = export_bundle(str(tmp_path / "checkpoint"), tmp_path / "fused")
    int8 = export_bundle(str(tmp_path / "checkpoint"), tmp_path / "int8", quantize="int8")
    batch = PaddedBatch.from_rows([[5, 17, 299, 3], [42, 7]], pad_token_id=0)
    logits = _bundle_logits(DecoderSession(read_manifest(fused), provider="cpu"), batch)
    reference = reference_padded_logits(model, [[5, 17, 299, 3], [42, 7]], 0)
    real = batch.attention_mask.astype(bool)
    assert np.max(np.abs(logits[real] - reference[real])) <= 1e-4 * max(1.0, np.max(np.abs(reference[real])))
    assert _manifest_data(int8)["validation"]["passed"] is True


@pytest.mark.parametrize("variant", ["fused", "fused-growing"])
def test_fused_attention_masks_match_plain_graph_with_past(bundles: dict[str, Path], variant: str) -> None:
    """Padding and causal masking inside the fused attention: a left-padded prompt, one step, then (batch 1 only with
    a preallocated cache, as GroupQueryAttention requires) a 3-token chunk on the past; all against the plain graph."""
    sessions = [DecoderSession(read_manifest(bundles[name]), provider="cpu") for name in (variant, "plain")]
    batch = PaddedBatch.from_rows(ROWS, pad_token_id=0)
    positions = position_ids_from_mask(batch.attention_mask)
    step = np.array([[11], [21]])
    mask = np.concatenate([batch.attention_mask, np.ones_like(step)], axis=1)
    chunk = np.array([[12, 13, 14]])
    results = []
    for session in sessions:
        prompt, past = session.forward(batch.input_ids, batch.attention_mask, positions, session.empty_cache(2), 0)
        stepped, past = session.forward(step, mask, positions[:, -1:] + 1, past, logits_to_keep=0)
        _, first = session.forward(batch.input_ids[:1], batch.attention_mask[:1], positions[:1], session.empty_cache(1))
        chunked, _ = session.forward(chunk, np.ones((1, 12), np.int64), np.arange(9, 12)[None], first, 0)
        results.append((prompt[batch.attention_mask.astype(bool)], stepped, chunked))
    for fused, plain in zip(*results, strict=True):
        np.testing.assert_allclose(fused, plain, atol=1e-5)


@pytest.mark.parametrize("variant", ["fused", "plain"])
def test_fp32_greedy_equals_transformers(bundles: dict[str, Path], torch_model: Any, variant: str) -> None:
    model = gpt2onnx.load(bundles[variant], provider="cpu")
    expected = reference_generate(torch_model, ROWS, 50256, [50256], max_new_tokens=12, do_sample=False)
    output = model.generate(input_ids=ROWS, max_new_tokens=12)
    got = [result.sequences[0].generated_token_ids for result in output.results]
    assert got == expected


@pytest.mark.parametrize(
    "variant", ["int8", "int8-fast-prefill", "int8-block256", "int4", "int4-head4", "fp16", "fp16-preallocated"]
)
def test_reduced_precision_bundles_load_and_generate(bundles: dict[str, Path], torch_model: Any, variant: str) -> None:
    model = gpt2onnx.load(bundles[variant], provider="cpu")
    output = model.generate(input_ids=ROWS, max_new_tokens=5)
    assert [len(result.sequences[0].generated_token_ids) for result in output.results] == [5, 5]
    batch = PaddedBatch.from_rows(ROWS, pad_token_id=0)
    logits, reference = _bundle_logits(model.session, batch), reference_padded_logits(torch_model, ROWS, 0)
    real = batch.attention_mask.astype(bool)
    tolerance = _manifest_data(bundles[variant])["validation"]["tolerance"]
    assert np.max(np.abs(logits[real] - reference[real])) <= tolerance * max(1.0, np.max(np.abs(reference[real])))


def test_fast_prefill_decodes_exactly_as_the_int8_graph(bundles: dict[str, Path]) -> None:
    """Single-token steps take the MatMulNBits branch: given the same past, the same logits as the int8 bundle;
    the prompt takes the DynamicQuantizeMatMul branch: close to, not equal to, the int8 bundle's prompt."""
    plain = DecoderSession(read_manifest(bundles["int8"]), provider="cpu")
    fast = DecoderSession(read_manifest(bundles["int8-fast-prefill"]), provider="cpu")
    batch = PaddedBatch.from_rows(ROWS, pad_token_id=0)
    positions = position_ids_from_mask(batch.attention_mask)
    prompt_plain, past = plain.forward(batch.input_ids, batch.attention_mask, positions, plain.empty_cache(2), 0)
    prompt_fast, _ = fast.forward(batch.input_ids, batch.attention_mask, positions, fast.empty_cache(2), 0)
    real = batch.attention_mask.astype(bool)
    assert not np.array_equal(prompt_fast[real], prompt_plain[real]), "the prompt ran the DynamicQuantizeMatMul blocks"
    np.testing.assert_allclose(prompt_fast[real], prompt_plain[real], atol=0.15 * np.abs(prompt_plain).max())
    step = (np.array([[5], [7]]), np.concatenate([batch.attention_mask, np.ones((2, 1), np.int64)], axis=1))
    same_past = PreallocatedCache([k.copy() for k in past.keys], [v.copy() for v in past.values], past.length)
    step_plain, after_plain = plain.forward(*step, positions[:, -1:] + 1, past)
    step_fast, after_fast = fast.forward(*step, positions[:, -1:] + 1, same_past)
    np.testing.assert_array_equal(step_fast, step_plain)
    np.testing.assert_array_equal(after_fast.keys[1], after_plain.keys[1])


def test_device_cache_path_matches_host_path(bundles: dict[str, Path]) -> None:
    """The CUDA code path (KV cache as OrtValues bound as the next past, rows reordered by a Gather session) on CPU."""
    manifest = read_manifest(bundles["fused-growing"])
    host = DecoderSession(manifest, provider="cpu")
    device = DecoderSession(manifest, provider="cpu", device_cache=True)
    batch = PaddedBatch.from_rows(ROWS, pad_token_id=0)
    positions = position_ids_from_mask(batch.attention_mask)
    results = []
    for session in (host, device):
        logits, past = session.forward(
            batch.input_ids, batch.attention_mask, positions, session.empty_cache(2), logits_to_keep=1
        )
        reordered = past.reorder(np.array([1, 0]))
        tokens = np.array([[5], [7]])
        mask = np.concatenate([batch.attention_mask[::-1], np.ones((2, 1), np.int64)], axis=1)
        step, after = session.forward(tokens, mask, positions[::-1, -1:] + 1, reordered)
        results.append((logits, step, after))
    (host_logits, host_step, host_after), (device_logits, device_step, device_after) = results
    assert isinstance(device_after.keys[0], gpt2onnx.runtime.session.ort.OrtValue)
    assert device_after.keys[0].shape()[2] == host_after.keys[0].shape[2] == batch.input_ids.shape[1] + 1
    np.testing.assert_array_equal(device_logits, host_logits)
    np.testing.assert_array_equal(device_step, host_step)
    np.testing.assert_array_equal(device_after.values[1].numpy(), host_after.values[1])


def test_device_cache_generation_equals_host_generation(bundles: dict[str, Path]) -> None:
    model = gpt2onnx.load(bundles["fused-growing"], provider="cpu")
    expected = model.generate(input_ids=ROWS, max_new_tokens=8)
    model.session = DecoderSession(model.manifest, provider="cpu", device_cache=True)
    got = model.generate(input_ids=ROWS, max_new_tokens=8)
    assert [r.sequences[0].token_ids for r in got.results] == [r.sequences[0].token_ids for r in expected.results]


def test_select_copies_rows_and_reorder_keeps_an_unmoved_cache(bundles: dict[str, Path]) -> None:
    session = DecoderSession(read_manifest(bundles["fused"]), provider="cpu")
    batch = PaddedBatch.from_rows(ROWS, pad_token_id=0)
    _, past = session.forward(
        batch.input_ids, batch.attention_mask, position_ids_from_mask(batch.attention_mask), session.empty_cache(2)
    )
    before = past.keys[0].copy()
    assert past.reorder(np.arange(2)) is past
    np.testing.assert_array_equal(past.keys[0], before)
    picked = past.select(np.array([1, 1, 0]))
    assert isinstance(picked, PreallocatedCache) and picked.keys[0].shape[0] == 3
    np.testing.assert_array_equal(picked.keys[0][2], past.keys[0][0])


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [0, 0, 1, 2], [3, 3, 3, 3], [1, 0, 3, 2], [2, 0, 0, 1]])
def test_reorder_in_place_equals_select(rows: list[int]) -> None:
    """Beams following parents whose rows are themselves overwritten (chains, swaps) still read the old rows."""
    rng = np.random.default_rng(0)
    keys = [rng.random((4, 2, 3, 5), dtype=np.float32) for _ in range(2)]
    values = [rng.random((4, 2, 3, 5), dtype=np.float32) for _ in range(2)]
    expected = HostCache([k.copy() for k in keys], [v.copy() for v in values]).select(np.array(rows))
    reordered = HostCache(keys, values).reorder(np.array(rows))
    assert reordered.keys[0] is keys[0]  # overwritten in place, not copied
    for got, want in zip(reordered.keys + reordered.values, expected.keys + expected.values, strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("axis", [0, 2])
def test_gather_model_is_valid_onnx(axis: int) -> None:
    import onnx

    from gpt2onnx.runtime._proto import gather_model

    model = onnx.load_from_string(gather_model(3, np.float16, axis))
    onnx.checker.check_model(model, full_check=True)
    assert [node.op_type for node in model.graph.node] == ["Gather"] * 3
    assert {attribute.i for node in model.graph.node for attribute in node.attribute} == {axis}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--quantize", "int8", "--dtype", "fp16"], "--quantize int8 applies to fp32 weights; drop --dtype fp16"),
        (["--quantize", "int8", "--no-optimize"], "--quantize int8 builds on the fused graph; drop --no-optimize"),
        (["--fast-prefill"], "--fast-prefill adds int8 prompt kernels to an int8 graph; add --quantize int8"),
        (["--block-size", "64"], "--block-size sets the quantised weights' blocks; add --quantize int8 or int4"),
        (["--head-bits", "4"], "--head-bits sets the lm_head's bits in an int4 graph; add --quantize int4"),
        (
            ["--quantize", "int8", "--head-bits", "4"],
            "--head-bits sets the lm_head's bits in an int4 graph; add --quantize int4",
        ),
        (["--int8-layers", "0"], "--int8-layers keeps blocks of an int4 graph at 8 bits; add --quantize int4"),
        (
            ["--quantize", "int8", "--int8-layers", "none"],
            "--int8-layers keeps blocks of an int4 graph at 8 bits; add --quantize int4",
        ),
        (
            ["--quantize", "int4", "--fast-prefill"],
            "--fast-prefill adds int8 prompt kernels to an int8 graph; add --quantize int8",
        ),
        (
            ["--kv-cache", "preallocated", "--no-optimize"],
            "--kv-cache preallocated needs the fused graph (GroupQueryAttention); drop --no-optimize",
        ),
    ],
)
def test_cli_refuses_impossible_graph_variants(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert export_main(["--random-init", "tiny", *flags, "--output", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == f"export-gpt2: error: {message}\n"
    assert not (tmp_path / "b").exists() and not list(tmp_path.iterdir())
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        export_bundle(output=tmp_path / "c", random_init="tiny", **_export_options(flags))


def _export_options(flags: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {"fast_prefill": "--fast-prefill" in flags, "optimize": "--no-optimize" not in flags}
    if "--quantize" in flags:
        options["quantize"] = flags[flags.index("--quantize") + 1]
    if "--dtype" in flags:
        options["dtype"] = flags[flags.index("--dtype") + 1]
    if "--kv-cache" in flags:
        options["kv_cache"] = flags[flags.index("--kv-cache") + 1]
    if "--block-size" in flags:
        options["block_size"] = int(flags[flags.index("--block-size") + 1])
    if "--head-bits" in flags:
        options["head_bits"] = int(flags[flags.index("--head-bits") + 1])
    if "--int8-layers" in flags:
        value = flags[flags.index("--int8-layers") + 1]
        options["int8_layers"] = [] if value == "none" else [int(part) for part in value.split(",")]
    return options


def test_dtype_aliases_are_accepted_with_int8(tmp_path: Path) -> None:
    folder = export_bundle(output=tmp_path / "b", random_init="tiny", dtype="float32", quantize="int8")
    assert _manifest_data(folder)["graph"]["kv_cache"] == "preallocated"


def test_unsupported_block_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=re.escape("unsupported block size 100; choose 32, 64, 128, 256")):
        export_bundle(output=tmp_path / "b", random_init="tiny", quantize="int8", block_size=100)
    assert not list(tmp_path.iterdir())


def test_preallocated_cache_runs_on_cpu_only(bundles: dict[str, Path]) -> None:
    """'auto' picks the CPU for a preallocated cache; the device-cache (CUDA) path refuses it in one line."""
    assert gpt2onnx.load(bundles["fused"], provider="auto").provider == "cpu"
    with pytest.raises(ProviderError) as caught:
        DecoderSession(read_manifest(bundles["int8"]), provider="cpu", device_cache=True)
    assert str(caught.value) == (
        f"bundle {bundles['int8']} keeps a preallocated key/value cache (GroupQueryAttention), which runs on the CPU "
        "provider only; export it with --kv-cache growing to run on CUDA"
    )


def test_preallocated_cache_is_written_in_place_up_to_its_fill(bundles: dict[str, Path]) -> None:
    """The graph writes each step's keys into the buffer it was given (no copy), and nothing past the filled length;
    select() copies the filled positions into fresh buffers of the same capacity; a step past the capacity grows
    the buffers (the past copied in)."""
    session = DecoderSession(read_manifest(bundles["fused"]), provider="cpu")
    batch = PaddedBatch.from_rows(ROWS, pad_token_id=0)
    cache = session.empty_cache(2, capacity=16)
    buffer = cache.keys[0]
    positions = position_ids_from_mask(batch.attention_mask)
    _, past = session.forward(batch.input_ids, batch.attention_mask, positions, cache)
    mask = np.concatenate([batch.attention_mask, np.ones((2, 1), np.int64)], axis=1)
    _, past = session.forward(np.array([[5], [7]]), mask, positions[:, -1:] + 1, past)
    assert past is cache and past.keys[0] is buffer and past.length == 10
    assert np.abs(buffer[:, :, :10]).max() > 0 and not buffer[:, :, 10:].any()
    picked = past.select(np.array([1, 1, 0]))
    assert picked.keys[0].shape == (3, *buffer.shape[1:]) and picked.length == 10
    np.testing.assert_array_equal(picked.keys[0][2], buffer[0])
    small = session.empty_cache(2, capacity=10)
    _, small = session.forward(batch.input_ids, batch.attention_mask, positions, small)
    mask11 = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    _, grown = session.forward(np.array([[5], [7]]), mask, positions[:, -1:] + 1, small)
    assert grown.capacity == 10 and grown.length == 10
    _, grown = session.forward(np.array([[1], [2]]), mask11, positions[:, -1:] + 2, grown)
    assert grown.capacity == 20 and grown.length == 11, "the buffers doubled, keeping the past"
    np.testing.assert_array_equal(grown.keys[0][:, :, :10], past.keys[0][:, :, :10])
    growing = HostCache(list(picked.keys), list(picked.values))
    with pytest.raises(ValueError, match=re.escape("keeps a preallocated cache: start from its empty_cache()")):
        session.forward(np.array([[5], [7], [9]]), np.ones((3, 11), np.int64), np.full((3, 1), 10), growing)
