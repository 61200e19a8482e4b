"""The runtime and gpt2-generate work where importing torch or transformers fails."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from conftest import BLOCKER, FORBIDDEN, REPO, RandomGPT2


def run_blocked(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER, *args], capture_output=True, text=True, timeout=300)


def test_gpt2_generate_runs_with_torch_unimportable(tiny_gpt2: RandomGPT2) -> None:
    result = run_blocked(
        "gpt2onnx.cli.generate_command",
        "Artificial intelligence",
        "--model",
        str(tiny_gpt2.bundle),
        "--json",
        "--max-new-tokens",
        "4",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["results"][0]["sequences"][0]["generated_token_ids"]
    assert json.loads(result.stderr.strip().splitlines()[-1]) == {"loaded": []}


def test_python_api_runs_with_torch_unimportable(tiny_gpt2: RandomGPT2, tmp_path: Path) -> None:
    program = tmp_path / "use_api.py"
    program.write_text(
        "import gpt2onnx\n"
        f"model = gpt2onnx.load({str(tiny_gpt2.bundle)!r})\n"
        "print(model.generate(['a', 'bc'], max_new_tokens=3).texts)\n"
        "print(''.join(model.stream('a', max_new_tokens=3)))\n"
        "print(model.next_token_probs('a', top=3))\n"
    )
    result = run_blocked(str(program))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1]) == {"loaded": []}


def test_runtime_and_cli_sources_never_import_heavy_packages() -> None:
    for folder in ("runtime", "cli", "serve"):
        for path in (REPO / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for name in names:
                    assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
