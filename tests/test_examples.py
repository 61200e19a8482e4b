"""Every program in examples/ runs to the end against a tiny bundle and prints what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BLOCKER, RandomGPT2

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# example -> lines its output must contain (with the tiny random-weight bundle and the real GPT-2 tokenizer)
EXPECTED = {
    "tokens.py": ("  |Art| -> 8001", "  |ence| -> 594", "decoded back: 'ArtificCial intElliGence'"),
    "next_tokens.py": ("after 'Artificial intelligence' the model expects:", " 10  "),
    "one_token_steps.py": ("same as generate(): True", "after rewind_to, the same again: True"),
    "custom_processor.py": ("greedy:", "with the rules:", "tokens repeated at once: 0"),
    "greedy.py": ("(50 tokens",),
    "sampling.py": ("--- sample 3 ---", "same seed, same samples: True"),
    "beam_sampling.py": ("beam search, the 3 best of 5 beams:", "beam sampling (num_beams=5, do_sample=True):"),
}


def test_every_example_is_tested() -> None:
    assert sorted(path.name for path in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, tiny_gpt2: RandomGPT2) -> None:
    """Each example runs with the runtime alone: torch, transformers and the like cannot be imported."""
    command = [sys.executable, "-c", BLOCKER, str(EXAMPLES / name)]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "bundle" in result.stdout
    result = subprocess.run([*command, str(tiny_gpt2.bundle)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1]) == {"loaded": []}
    lines = result.stdout.splitlines()
    for expected in EXPECTED[name]:
        assert any(line.startswith(expected) for line in lines), f"{expected!r} not in:\n{result.stdout}"
