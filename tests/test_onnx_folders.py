"""GPT-2 ONNX exports made elsewhere (optimum-cli, transformers.js's layouts), run as they are and imported into
verified bundles: parity with transformers on left-padded batches, the interface found in each graph, one-line
refusals of graphs that are not GPT-2 decoders with past. The exports are made in the test run
(tests/_onnx_layouts.py)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import gpt2onnx
from _onnx_layouts import copy_side_files, optimum_export, optimum_python, transformers_js, without_position_ids
from _server import running_server
from conftest import BLOCKER, SHAPES, random_gpt2
from gpt2onnx.cli import export_command
from gpt2onnx.runtime.errors import BundleError, InvalidInputError
from reference import reference_generate

PROMPTS = [[464, 2068, 7586, 21831, 18045, 625], [15496, 11], [40, 716, 257]]  # left-padded as a batch
EOS = 50256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("onnx-folders") / "checkpoint"
    random_gpt2(21, **{**SHAPES["tiny"], "initializer_range": 0.2, "n_positions": 256}).save_pretrained(folder)
    shutil.copyfile(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def torch_model(checkpoint: Path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(checkpoint).eval()


@pytest.fixture(scope="module")
def optimum_folder(checkpoint: Path) -> Path:
    if optimum_python() is None:
        if os.environ.get("CI"):
            pytest.fail("GPT2ONNX_OPTIMUM_PYTHON must name optimum-onnx's python in CI (.ci/run builds .venv-optimum)")
        pytest.skip("GPT2ONNX_OPTIMUM_PYTHON does not name an environment with optimum-onnx")
    return optimum_export(checkpoint, checkpoint.parent / "optimum")


@pytest.fixture(scope="module")
def folders(optimum_folder: Path) -> dict[str, tuple[Path, str | None]]:
    """Every layout: the folder and the graph to pick in it."""
    root = optimum_folder.parent
    tjs = transformers_js(optimum_folder, root / "transformers-js")
    legacy = root / "legacy"
    copy_side_files(optimum_folder, legacy)
    without_position_ids(optimum_folder / "model.onnx", legacy / "model.onnx")
    return {
        "optimum": (optimum_folder, None),
        "transformers.js": (tjs, None),
        "fp16": (tjs, "model_fp16.onnx"),
        "merged-without-positions": (tjs, "decoder_model_merged.onnx"),
        "without-positions": (legacy, None),
    }


INTERFACES = {
    "optimum": {"position_ids": True, "use_cache_branch": False},
    "transformers.js": {"position_ids": True, "use_cache_branch": False},
    "fp16": {"position_ids": True, "use_cache_branch": False, "past_dtype": "float16"},
    "merged-without-positions": {"position_ids": False, "use_cache_branch": True},
    "without-positions": {"position_ids": False, "use_cache_branch": False},
}


@pytest.mark.parametrize("layout", list(INTERFACES))
def test_interface_found_in_the_graph(folders, layout: str) -> None:
    folder, onnx_file = folders[layout]
    interface = gpt2onnx.load(folder, onnx_file=onnx_file).session.interface
    expected = {"logits_to_keep": False, "past_dtype": "float32", **INTERFACES[layout]}
    assert {key: getattr(interface, key) for key in expected} == expected


FLOAT32_LAYOUTS = [layout for layout in INTERFACES if layout != "fp16"]


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("layout", FLOAT32_LAYOUTS)
def test_left_padded_batches_match_transformers(folders, torch_model, layout: str, num_beams: int) -> None:
    folder, onnx_file = folders[layout]
    model = gpt2onnx.load(folder, onnx_file=onnx_file)
    options = {"max_new_tokens": 10, "num_beams": num_beams}
    output = model.generate(input_ids=PROMPTS, **options)
    expected = reference_generate(torch_model, PROMPTS, EOS, [EOS], do_sample=False, **options)
    assert [result.sequences[0].generated_token_ids for result in output.results] == expected


def test_sampling_and_streaming_equal_our_own_export(folders, checkpoint: Path) -> None:
    """The same runtime decodes the graph: seeded sampling gives our own bundle's tokens, a stream its text."""
    from gpt2onnx.export.exporter import export_bundle

    ours = gpt2onnx.load(export_bundle(str(checkpoint), checkpoint.parent / "ours", kv_cache="growing"))
    for layout in FLOAT32_LAYOUTS:
        folder, onnx_file = folders[layout]
        model = gpt2onnx.load(folder, onnx_file=onnx_file)
        sampled = model.generate("The weather", max_new_tokens=12, do_sample=True, top_k=20, seed=7)
        expected = ours.generate("The weather", max_new_tokens=12, do_sample=True, top_k=20, seed=7)
        assert sampled.results[0].sequences[0].token_ids == expected.results[0].sequences[0].token_ids
        streamed = "".join(model.stream("The weather", max_new_tokens=12))
        assert streamed == model.generate("The weather", max_new_tokens=12).results[0].sequences[0].generated_text


def test_float16_graph_is_within_float16_rounding_of_transformers(folders, torch_model) -> None:
    """A float16 past and float16 logits: the logits of a left-padded batch within the fp16 export tolerance (2e-2
    relative), and every decoding mode runs on it."""
    from reference import reference_padded_logits

    folder, onnx_file = folders["fp16"]
    model = gpt2onnx.load(folder, onnx_file=onnx_file)
    assert model.manifest.dtype == "float16"
    generator = model.generator(max_new_tokens=1)
    generator.append_tokens(PROMPTS)
    expected = reference_padded_logits(torch_model, PROMPTS, EOS)[:, -1]
    difference = np.abs(generator.get_logits() - expected).max()
    assert difference <= 2e-2 * max(1.0, np.abs(expected).max()), difference
    for options in ({}, {"num_beams": 3}, {"do_sample": True, "seed": 1}):
        assert all(r.sequences[0].generated_token_ids for r in model.generate(input_ids=PROMPTS, **options).results)


@pytest.mark.parametrize("layout", ["optimum", "merged-without-positions"])
def test_perplexity_command_on_a_folder_equals_transformers(folders, checkpoint, layout: str, tmp_path: Path, capsys):
    """gpt2-perplexity --model FOLDER --onnx-file NAME: a text longer than the context, by sliding windows, as
    transformers' guide computes it."""
    from gpt2onnx.cli import perplexity_command
    from test_perplexity import guide_perplexity

    folder, onnx_file = folders[layout]
    tokenizer = gpt2onnx.load(folder, onnx_file=onnx_file).tokenizer
    text = tokenizer.decode(list(range(300, 700)))  # about 400 tokens: longer than the checkpoint's context of 256
    ids = tokenizer.encode(text)
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    argv = [str(tmp_path / "text.txt"), "--model", str(folder), "--stride", "128", "--json"]
    assert perplexity_command.main(argv + (["--onnx-file", onnx_file] if onnx_file else [])) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["perplexity"] == pytest.approx(guide_perplexity(checkpoint, ids, 128), rel=1e-4)


def test_a_graph_without_position_ids_refuses_padded_rows_in_one_step(folders) -> None:
    folder, _ = folders["without-positions"]
    generator = gpt2onnx.load(folder).generator(max_new_tokens=4)
    generator.append_tokens(PROMPTS[:2])
    with pytest.raises(InvalidInputError, match="takes no position_ids, so rows of different lengths"):
        generator.generate_next_token()


def test_quantised_graph_runs_and_is_reported_against_fp32(folders) -> None:
    folder, _ = folders["transformers.js"]
    quantised = gpt2onnx.load(folder, onnx_file="model_quantized.onnx")
    assert quantised.manifest.quantized
    text = (Path(gpt2onnx.__file__).parent / "export" / "data" / "sample_text.txt").read_text(encoding="utf-8")
    report = quantised.perplexity(text[:1500], compare=gpt2onnx.load(folder))
    assert 0 < report.kl_divergence < 0.5 and 0.5 < report.top1_agreement < 1.0, report


def test_import_makes_a_verified_bundle(folders, tmp_path: Path, capsys) -> None:
    folder, onnx_file = folders["merged-without-positions"]
    output = tmp_path / "imported"
    argv = ["--from-onnx", str(folder), "--onnx-file", onnx_file, "--output", str(output), "--quiet"]
    assert export_command.main(argv) == 0
    data = json.loads((output / "bundle.json").read_text())
    assert data["graph"]["interface"]["use_cache_branch"] and not data["graph"]["interface"]["position_ids"]
    assert data["import_check"]["max_abs_diff_past_vs_whole"] < 1e-4
    assert set(data["files"]) == {"decoder_model_merged.onnx", "tokenizer.json"}
    imported, original = gpt2onnx.load(output), gpt2onnx.load(folder, onnx_file=onnx_file)
    assert imported.generate(input_ids=PROMPTS).results == original.generate(input_ids=PROMPTS).results
    graph = output / "decoder_model_merged.onnx"
    damaged = bytearray(graph.read_bytes())
    damaged[-1] ^= 1
    graph.write_bytes(bytes(damaged))
    with pytest.raises(BundleError, match="does not match its sha256"):
        gpt2onnx.load(output)


def test_import_runs_without_torch(folders, tmp_path: Path) -> None:
    """export-gpt2 --from-onnx with torch, transformers and optimum unimportable."""
    folder, _ = folders["optimum"]
    command = [sys.executable, "-c", BLOCKER, "gpt2onnx.cli.export_command", "--from-onnx", str(folder)]
    done = subprocess.run([*command, "--output", str(tmp_path / "b"), "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.strip().splitlines()[-1]) == {"loaded": []}
    assert gpt2onnx.load(tmp_path / "b").generate(input_ids=PROMPTS[:1]).results


def test_import_refuses_checkpoint_flags_and_a_folder_without_graph(folders, checkpoint: Path, tmp_path: Path, capsys):
    folder, _ = folders["optimum"]
    with pytest.raises(SystemExit) as exit_:
        export_command.main(["--from-onnx", str(folder), "--quantize", "int8", "--output", str(tmp_path / "x")])
    assert exit_.value.code == 2
    assert "--quantize is for checkpoints; --from-onnx imports a graph as it is" in capsys.readouterr().err
    assert export_command.main(["--from-onnx", str(checkpoint), "--output", str(tmp_path / "y")]) == 2
    assert "is not an optimum or transformers.js export" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_onnx_file_choice_in_the_cli(folders, tmp_path: Path) -> None:
    from conftest import run_generate

    folder, _ = folders["transformers.js"]
    code, out, _ = run_generate(["hi", "--model", str(folder), "--onnx-file", "onnx/model_quantized.onnx", "--json"])
    assert code == 0 and json.loads(out)["results"][0]["sequences"][0]["generated_token_ids"]
    code, _, err = run_generate(["hi", "--model", str(folder), "--onnx-file", "model_q4.onnx"])
    assert code == 2 and "has no graph 'model_q4.onnx' (it has onnx/decoder_model_merged.onnx" in err
    bundle = tmp_path / "bundle"
    assert export_command.main(["--from-onnx", str(folder), "--output", str(bundle), "--quiet"]) == 0
    code, _, err = run_generate(["hi", "--model", str(bundle), "--onnx-file", "model.onnx"])
    assert code == 2 and err.strip().endswith("--onnx-file picks a graph of those only")


def test_import_leaves_nothing_when_the_check_run_fails(folders, tmp_path: Path, monkeypatch, capsys) -> None:
    """A check run that fails (here: a tolerance no graph meets) after the copy began leaves no folder behind."""
    from gpt2onnx.export import onnx_import

    monkeypatch.setitem(onnx_import.CHECK_TOLERANCE, "float32", 0.0)
    folder, _ = folders["optimum"]
    assert export_command.main(["--from-onnx", str(folder), "--output", str(tmp_path / "out"), "--quiet"]) == 1
    assert "the logits through the past differ from those of the whole text by" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_import_refuses_an_output_inside_the_folder_and_names_the_flag(folders, tmp_path: Path, capsys) -> None:
    folder, _ = folders["transformers.js"]
    assert export_command.main(["--from-onnx", str(folder), "--output", str(folder / "bundle"), "--quiet"]) == 2
    assert "is the --from-onnx folder or inside it" in capsys.readouterr().err
    several = tmp_path / "several"
    copy_side_files(folder, several)
    (several / "onnx").mkdir()
    for name in ("model_quantized.onnx", "model_fp16.onnx"):
        shutil.copy2(folder / "onnx" / name, several / "onnx" / name)
    assert export_command.main(["--from-onnx", str(several), "--output", str(tmp_path / "b"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip().endswith("pick one with --onnx-file")


def _graph(path: Path, inputs: list, outputs: list[str], past_shape: list | None = None) -> None:
    """A stand-in graph: every output is input_ids cast to float (enough for the interface checks)."""
    values = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
    shape = past_shape or ["b", 2, "p", 16]
    values += [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name in inputs]
    nodes = [helper.make_node("Cast", ["input_ids"], [name], to=TensorProto.FLOAT) for name in outputs]
    declared = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs]
    graph = helper.make_graph(nodes, "stand-in", values, declared)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _past(layers: int = 2) -> list[str]:
    return [f"past_key_values.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]


def _present(layers: int = 2) -> list[str]:
    return [f"present.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]


REFUSALS = {
    "encoder": (["attention_mask"], ["last_hidden_state"], None, "no logits output"),
    "no-present": (["attention_mask"], ["logits"], None, "has no present.* outputs"),
    "stacked-past": (["attention_mask", "past_key_values"], ["logits", *_present()], None, "a past this runtime"),
    "wrong-heads": (["attention_mask", *_past()], ["logits", *_present()], ["b", 7, "p", 16], "has shape ['b', 7"),
}


@pytest.mark.parametrize("kind", [*REFUSALS, "not-gpt2"])
def test_refusals_are_one_line_exit_2(optimum_folder: Path, tmp_path: Path, kind: str, capsys) -> None:
    from conftest import run_generate

    folder = tmp_path / kind
    copy_side_files(optimum_folder, folder)
    if kind == "not-gpt2":
        shutil.copy2(optimum_folder / "model.onnx", folder / "model.onnx")
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
        expected = "is the config of a 'llama' model; this runtime runs GPT-2 (gpt2) only"
    else:
        inputs, outputs, shape, expected = REFUSALS[kind]
        _graph(folder / "model.onnx", inputs, outputs, shape)
    code, _, err = run_generate(["hi", "--model", str(folder)])
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert export_command.main(["--from-onnx", str(folder), "--output", str(tmp_path / "out"), "--quiet"]) == 2
    assert expected in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout", ["optimum", "without-positions"])
def test_server_runs_the_folder_with_the_same_answers(folders, tmp_path: Path, layout: str) -> None:
    """Concurrent greedy requests of different lengths (one at a time for a graph without position_ids)."""
    folder, onnx_file = folders[layout]
    model = gpt2onnx.load(folder, onnx_file=onnx_file)
    prompts = ["The quick brown fox jumps", "Hi", "Once upon a time there was"]
    expected = [model.generate(p, max_new_tokens=8).results[0].sequences[0].generated_text for p in prompts]
    arguments = ["--max-batch", "4"] + (["--onnx-file", onnx_file] if onnx_file else [])
    with running_server(folder, tmp_path / "serve.log", "imported", arguments) as server:

        def complete(prompt: str) -> str:
            response = server.complete(prompt=prompt, max_tokens=8, temperature=0)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            assert list(pool.map(complete, prompts)) == expected
        response = server.complete(prompt=prompts[:2], max_tokens=4)  # one request, prompts of two lengths
        if layout == "without-positions":
            assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
            assert "takes no position_ids" in response.json()["error"]["message"]
        else:
            assert response.status_code == 200, response.text
