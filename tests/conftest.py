"""Shared fixtures: a tiny random-weight bundle with the real GPT-2 tokenizer, exported once per test session."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "shared" / "gpt2-tokenizer"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of the `tiny` random GPT-2 shape (2 layers, 64 wide, GPT-2's vocabulary and tokenizer)."""
    from gpt2onnx.cli.export_command import main as export

    output = tmp_path_factory.mktemp("bundles") / "tiny"
    argv = ["--random-init", "tiny", "--tokenizer", str(TOKENIZER_DIR), "--output", str(output), "--quiet"]
    assert export(argv) == 0
    return output


@pytest.fixture(scope="session")
def without_torch() -> Callable[[str], list[str]]:
    """A command running Python code in a fresh interpreter where importing torch or transformers fails."""

    def command(code: str) -> list[str]:
        return [sys.executable, "-c", f"import sys; sys.modules.update(torch=None, transformers=None); {code}"]

    return command
