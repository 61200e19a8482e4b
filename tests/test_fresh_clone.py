"""A fresh clone works offline: the shipped GPT-2 tokenizer, defaults that agree between export-gpt2 and
gpt2-generate, and export inputs refused before any slow work (checked with torch made unimportable)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import gpt2onnx
from conftest import BLOCKER, REPO, random_gpt2
from gpt2onnx.export.exporter import export_bundle
from gpt2onnx.runtime import bundle
from gpt2onnx.runtime.bundle import sha256_of
from gpt2onnx.runtime.tokenizer import GPT2_TOKENIZER, Tokenizer

SHIPPED_SHA256 = "8414cab924d8b9b33013f0d221c5862f365ee9be39c5c2bfae8a5a9e970478a6"  # GPT-2's published tokenizer


def run(module: str, *args: str, cwd: Path | None = None, blocked: bool = False) -> subprocess.CompletedProcess:
    """A console script's module in a subprocess (optionally with torch and transformers unimportable)."""
    prefix = [sys.executable, "-c", BLOCKER] if blocked else [sys.executable, "-m"]
    return subprocess.run([*prefix, module, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_the_gpt2_tokenizer_ships_with_the_package() -> None:
    assert GPT2_TOKENIZER.is_file() and sha256_of(GPT2_TOKENIZER) == SHIPPED_SHA256
    tokenizer = Tokenizer(GPT2_TOKENIZER)
    assert tokenizer.vocab_size == 50257
    assert tokenizer.encode("Artificial intelligence") == [8001, 9542, 4430]


def test_random_init_bundles_get_the_shipped_tokenizer(tmp_path: Path) -> None:
    folder = export_bundle(output=tmp_path / "bundle", random_init="tiny")
    manifest = json.loads((folder / bundle.MANIFEST_FILE).read_text())
    assert manifest["tokenizer"] == bundle.TOKENIZER_FILE
    assert manifest["source"]["tokenizer"] == "gpt2onnx's GPT-2 tokenizer"
    assert sha256_of(folder / bundle.TOKENIZER_FILE) == SHIPPED_SHA256
    model = gpt2onnx.load(folder)
    assert model.generate("Artificial intelligence", max_new_tokens=2).results[0].prompt_token_ids == [8001, 9542, 4430]


def checkpoint_without_tokenizer(root: Path, vocab_size: int) -> Path:
    folder = root / f"vocab-{vocab_size}"
    random_gpt2(0, n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=vocab_size).save_pretrained(folder)
    return folder


def test_a_gpt2_vocabulary_without_tokenizer_files_gets_the_shipped_one_with_a_notice(tmp_path: Path) -> None:
    checkpoint = checkpoint_without_tokenizer(tmp_path, 50257)
    result = run("gpt2onnx.cli.export_command", "--model", str(checkpoint), "--output", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if "note:" in line]
    assert notes == [
        f"export-gpt2: note: checkpoint folder {checkpoint} has no tokenizer files; its vocabulary is GPT-2's 50257 "
        "tokens, so the bundle gets gpt2onnx's GPT-2 tokenizer"
    ]
    assert sha256_of(tmp_path / "out" / bundle.TOKENIZER_FILE) == SHIPPED_SHA256


def test_another_vocabulary_without_tokenizer_files_is_exported_with_a_warning(tmp_path: Path) -> None:
    checkpoint = checkpoint_without_tokenizer(tmp_path, 300)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder = export_bundle(str(checkpoint), tmp_path / "out")
    assert [str(w.message) for w in caught] == [
        f"checkpoint folder {checkpoint} has no tokenizer files and its vocabulary (300 tokens) is not GPT-2's: the "
        "bundle takes token ids only (give a tokenizer with --tokenizer DIR)"
    ]
    manifest = json.loads((folder / bundle.MANIFEST_FILE).read_text())
    assert manifest["tokenizer"] is None and manifest["source"]["tokenizer"] is None
    model = gpt2onnx.load(folder)
    with pytest.raises(
        gpt2onnx.InvalidInputError, match="has no tokenizer: pass input_ids, or export with --tokenizer"
    ):
        model.generate("text")
    assert model.generate(input_ids=[1, 2, 3], max_new_tokens=2).results[0].sequences[0].token_ids[:3] == [1, 2, 3]
    quiet = run("gpt2onnx.cli.export_command", "--model", str(checkpoint), "--output", str(tmp_path / "q"), "--quiet")
    assert quiet.returncode == 0 and quiet.stderr.startswith("export-gpt2: warning: checkpoint folder"), quiet.stderr
    assert quiet.stderr.count("\n") == 1, "the warning is one line, --quiet or not"


def test_generate_finds_what_export_wrote_by_default(tmp_path: Path) -> None:
    exported = run("gpt2onnx.cli.export_command", "--random-init", "tiny", "--quiet", cwd=tmp_path)
    assert exported.returncode == 0 and exported.stdout.strip() == str(Path("models") / "random-tiny")
    generated = run("gpt2onnx.cli.generate_command", "Artificial intelligence", "--max-new-tokens", "2", cwd=tmp_path)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("Artificial intelligence")
    assert generated.stderr == "gpt2-generate: using models/random-tiny, the only bundle under models/\n"


def test_models_gpt2_wins_and_several_bundles_need_a_choice(tmp_path: Path) -> None:
    export_bundle(output=tmp_path / "models" / "random-tiny", random_init="tiny")
    export_bundle(output=tmp_path / "models" / "other", random_init="tiny", seed=1)
    several = run("gpt2onnx.cli.generate_command", "x", cwd=tmp_path)
    assert several.returncode == 2
    assert several.stderr == (
        "gpt2-generate: error: 2 bundles under models/ (models/other, models/random-tiny) and none is models/gpt2: "
        "pick one with --model\n"
    )
    (tmp_path / "models" / "other").rename(tmp_path / "models" / "gpt2")
    chosen = run("gpt2onnx.cli.generate_command", "x", "--max-new-tokens", "1", cwd=tmp_path)
    assert chosen.returncode == 0 and chosen.stderr == "", "models/gpt2 is the default, used without a message"


def test_no_bundle_at_all_says_how_to_make_one(tmp_path: Path) -> None:
    result = run("gpt2onnx.cli.generate_command", "x", cwd=tmp_path)
    assert result.returncode == 2
    assert "no bundle in models/gpt2 or elsewhere under models/" in result.stderr
    assert "export-gpt2 --random-init small" in result.stderr


def not_a_checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    return folder


def a_bert_config(tmp_path: Path) -> Path:
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    return folder


def no_weights(tmp_path: Path) -> Path:
    folder = tmp_path / "no-weights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return folder


def a_file(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("x")
    return tmp_path / "file"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            lambda t: ["--random-init", "tiny", "--model", "gpt2"],
            "give --model or --random-init, not both: --random-init builds its own weights",
        ),
        (lambda t: ["--model", str(t / "nowhere")], "checkpoint folder not found: --model {t}/nowhere"),
        (
            lambda t: ["--model", str(not_a_checkpoint(t))],
            "--model {t}/not-a-checkpoint is not a checkpoint folder: it has no config.json",
        ),
        (
            lambda t: ["--model", str(a_bert_config(t))],
            "--model {t}/bert is not a GPT-2 checkpoint (model_type 'bert': BertModel); export-gpt2 converts "
            "GPT-2 only",
        ),
        (
            lambda t: ["--model", str(no_weights(t))],
            "--model {t}/no-weights has no weights (model.safetensors or pytorch_model.bin)",
        ),
        (
            lambda t: ["--random-init", "tiny", "--tokenizer", str(t / "none")],
            "tokenizer folder not found: --tokenizer {t}/none",
        ),
        (
            lambda t: ["--random-init", "tiny", "--tokenizer", str(not_a_checkpoint(t))],
            "--tokenizer {t}/not-a-checkpoint holds no tokenizer (expected tokenizer.json, or vocab.json and "
            "merges.txt)",
        ),
        (
            lambda t: [
                "--model",
                str(REPO / "tests" / "fixtures" / "tiny-random-gpt2"),
                "--tokenizer",
                str(GPT2_TOKENIZER),
            ],
            f"the tokenizer of {GPT2_TOKENIZER} has 50257 tokens, more than the model's vocabulary of 1000; "
            "give a matching one with --tokenizer DIR",
        ),
        (
            lambda t: ["--random-init", "tiny", "--output", str(a_file(t) / "bundle")],
            "cannot write --output {t}/file/bundle: {t}/file is a file, not a folder",
        ),
    ],
    ids=[
        "both",
        "missing",
        "not-a-checkpoint",
        "not-gpt2",
        "no-weights",
        "tokenizer-missing",
        "tokenizer-empty",
        "tokenizer-too-big",
        "unwritable-output",
    ],
)
def test_export_input_errors_come_before_any_slow_work(tmp_path: Path, arguments, message: str) -> None:
    """Each is refused with exit 2 in one line, with torch and transformers unimportable (so before loading)."""
    output = ["--output", str(tmp_path / "out")]
    args = arguments(tmp_path)
    result = run("gpt2onnx.cli.export_command", *args, *([] if "--output" in args else output), blocked=True)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith('{"loaded"')]
    assert lines == [f"export-gpt2: error: {message.format(t=tmp_path)}"]
    assert json.loads(result.stderr.splitlines()[-1]) == {"loaded": []}
    assert not (tmp_path / "out").exists()


def test_offline_hub_failure_names_random_init(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpt2onnx.cli.export_command", "--model", "gpt2", "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")},
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "export-gpt2: error: cannot download gpt2: HF_HUB_OFFLINE is set and it is not in the local cache; without "
        "the hub, export a random-weight GPT-2 with --random-init small, or give a checkpoint folder with --model DIR"
    )
    assert not (tmp_path / "out").exists()


def test_serve_on_a_busy_port_exits_2_before_loading(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The bundle does not exist: an error about it would mean the model was looked at before the port.
        result = run("gpt2onnx.serve.command", "--model", str(tmp_path / "nowhere"), "--port", str(port))
    assert result.returncode == 2
    assert result.stderr == (
        f"gpt2-serve: error: cannot listen on 127.0.0.1 port {port}: it is in use (choose another with --port)\n"
    )


def test_nothing_in_the_project_reads_beside_the_checkout() -> None:
    """The project and its tests need nothing outside the clone: no tracked file points into the team's folder beside
    the checkout (build output under benchmarks/work, which git ignores, is not the project's)."""
    team_folder = re.compile(r"\.\./s[h]ared\b|\bs[h]ared/(notes|gpt2-tokenizer|reference-models)\b")
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    code = [REPO / name for name in listed.splitlines() if name.endswith((".py", ".sh", ".md", ".toml", ".ci/run"))]
    assert len(code) > 50, "git ls-files lists the project's files"
    offenders = [str(path.relative_to(REPO)) for path in code if team_folder.search(path.read_text(encoding="utf-8"))]
    assert offenders == []
