"""Shared fixtures: the GPT-2 tokenizer shipped with the package, the checkpoints under tests/fixtures/, and
random-weight GPT-2 checkpoints exported to bundles. Nothing here reads anything outside the checkout.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpt2onnx.runtime.tokenizer import GPT2_TOKENIZER

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# hf-internal-testing/tiny-random-gpt2: 5 layers, vocabulary of 1000, bos = eos = pad = 98 (fixtures/README.md).
REFERENCE_CHECKPOINT = FIXTURES / "tiny-random-gpt2"


FORBIDDEN = ("torch", "transformers", "optimum", "accelerate")

# Run a module or script with an import hook that makes every forbidden package unimportable, then list what got loaded.
BLOCKER = f"""
import importlib.abc, json, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {FORBIDDEN!r}:
            raise ImportError("blocked for this test: " + name)
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
try:
    if sys.argv[0].endswith(".py"):
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        runpy.run_module(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    code = exit.code
else:
    code = 0
loaded = sorted({{name.split(".")[0] for name in sys.modules}} & set({FORBIDDEN!r}))
print(json.dumps({{"loaded": loaded}}), file=sys.stderr)
sys.exit(code)
"""


@dataclass(frozen=True)
class RandomGPT2:
    """A random-weight GPT-2 saved as a transformers checkpoint folder, and its exported bundle."""

    checkpoint: Path
    bundle: Path

    def torch_model(self):
        from transformers import GPT2LMHeadModel

        return GPT2LMHeadModel.from_pretrained(self.checkpoint).eval()


SHAPES = {
    # Small vocabularies keep tiny models fast; initializer_range 0.2 gives peaked, varied outputs.
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 50257, "n_positions": 1024},
    "tiny-wide": {"n_layer": 3, "n_head": 4, "n_embd": 64, "vocab_size": 1000, "n_positions": 128},
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "n_positions": 1024},
}


def random_gpt2(seed: int, **config):
    """A seeded random GPT2LMHeadModel (eval mode) of this GPT2Config; BOS and EOS default to GPT-2's 50256, or to
    the last token of a smaller vocabulary."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    last_token = config.get("vocab_size", 50257) - 1
    config.setdefault("bos_token_id", min(50256, last_token))
    config.setdefault("eos_token_id", min(50256, last_token))
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**config)).eval()


def build_random_gpt2(root: Path, shape: str, seed: int, tokenizer_dir: Path | None = None, **config) -> RandomGPT2:
    """Save a seeded random GPT2LMHeadModel of a named shape and export it with export_bundle."""
    from gpt2onnx.export.exporter import export_bundle

    checkpoint = root / f"{shape}-{seed}-checkpoint"
    random_gpt2(seed, **{"initializer_range": 0.2, **SHAPES[shape], **config}).save_pretrained(checkpoint)
    if tokenizer_dir is not None:
        shutil.copyfile(tokenizer_dir / "tokenizer.json", checkpoint / "tokenizer.json")
    bundle = export_bundle(str(checkpoint), root / f"{shape}-{seed}-bundle", seed=seed)
    return RandomGPT2(checkpoint, bundle)


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The folder of the GPT-2 tokenizer.json that ships with the package."""
    return GPT2_TOKENIZER.parent


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> RandomGPT2:
    """A tiny random GPT-2 with the full GPT-2 vocabulary and the real tokenizer."""
    return build_random_gpt2(tmp_path_factory.mktemp("tiny"), "tiny", seed=1, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def small_gpt2(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> RandomGPT2:
    """A random GPT-2 of GPT-2-small's shape (12 layers, 12 heads, 768 wide, 50257 tokens)."""
    return build_random_gpt2(
        tmp_path_factory.mktemp("small"), "gpt2-small", seed=3, tokenizer_dir=tokenizer_dir, initializer_range=0.05
    )


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    """The real GPT-2 tokenizer, as the runtime loads it."""
    from gpt2onnx.runtime.tokenizer import Tokenizer

    return Tokenizer(tokenizer_dir / "tokenizer.json")


def run_generate(argv: list[str]) -> tuple[int, str, str]:
    """gpt2-generate's main(argv) in this process: exit code, stdout, stderr (argparse's own exits included)."""
    from gpt2onnx.cli import generate_command

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = generate_command.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, stdout.getvalue(), stderr.getvalue()


def middle_piece(text: str, length: int = 3) -> str:
    """A substring of text, from the middle if it can, that does not occur earlier in it nor end near its end."""
    last = len(text) - length - 8
    for start in [*range(len(text) // 2, last), *range(1, len(text) // 2)]:
        piece = text[start : start + length]
        if text.find(piece) == start and "\ufffd" not in piece:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")
