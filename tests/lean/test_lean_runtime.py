"""Runtime-only checks that also run in the lean environment (gpt2-onnx[cpu] alone: no torch, no transformers).

In the lean environment (.ci/run sets GPT2ONNX_LEAN=1) the bundle and the expected output come from the full
environment through GPT2ONNX_LEAN_BUNDLE and GPT2ONNX_LEAN_EXPECTED; elsewhere the tiny test bundle is used.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gpt2onnx

LEAN = os.environ.get("GPT2ONNX_LEAN") == "1"
PROMPTS = ["Artificial intelligence", "naïve café 🤖"]


@pytest.fixture(scope="module")
def lean_bundle(request: pytest.FixtureRequest) -> Path:
    given = os.environ.get("GPT2ONNX_LEAN_BUNDLE")
    if given:
        return Path(given)
    if LEAN:
        pytest.fail("GPT2ONNX_LEAN_BUNDLE must name a bundle exported in the full environment")
    return request.getfixturevalue("tiny_gpt2").bundle


def test_heavy_packages_are_absent_in_the_lean_environment() -> None:
    if not LEAN:
        pytest.skip("only meaningful in the lean environment (GPT2ONNX_LEAN=1, as .ci/run sets)")
    for name in ("torch", "transformers", "optimum"):
        assert importlib.util.find_spec(name) is None, f"{name} is installed in the lean environment"
    with pytest.raises(ImportError):
        import torch  # noqa: F401


def test_generate_and_stream_without_torch(lean_bundle: Path) -> None:
    model = gpt2onnx.load(lean_bundle)
    output = model.generate(PROMPTS, max_new_tokens=12)
    assert all(len(result.sequences[0].generated_token_ids) == 12 for result in output.results)
    assert "".join(model.stream(PROMPTS[1], max_new_tokens=12)) == output.results[1].sequences[0].generated_text
    if LEAN:
        assert not {"torch", "transformers"} & set(sys.modules)


def test_lean_output_equals_the_full_environment(lean_bundle: Path) -> None:
    expected_path = os.environ.get("GPT2ONNX_LEAN_EXPECTED")
    if not expected_path:
        message = "GPT2ONNX_LEAN_EXPECTED (the full environment's gpt2-generate --json) is set only by .ci/run"
        pytest.fail(message) if LEAN else pytest.skip(message)
    expected = json.loads(Path(expected_path).read_text())
    script = shutil.which("gpt2-generate", path=str(Path(sys.executable).parent))
    assert script, "gpt2-generate is not installed beside this Python"
    result = subprocess.run(
        [script, *PROMPTS, "--model", str(lean_bundle), "--json", "--max-new-tokens", "12", "--provider", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"] == expected["results"]
