"""Where an export's checkpoint and tokenizer come from, checked before any slow work (no torch, no hub).

A --model that names a folder must be a GPT-2 checkpoint folder (config.json of model_type gpt2, and weights); a
--tokenizer that names a folder must hold tokenizer files. Each problem is one InvalidInputError naming the flag.
The tokenizer a bundle gets is chosen here too: --tokenizer, else the checkpoint's own, else (for a GPT-2
vocabulary) the GPT-2 tokenizer that ships with gpt2onnx.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2onnx.runtime.errors import InvalidInputError
from gpt2onnx.runtime.tokenizer import GPT2_TOKENIZER, GPT2_VOCAB_SIZE, Tokenizer

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
SHIPPED_TOKENIZER = "gpt2onnx's GPT-2 tokenizer"


def is_local_path(name: str) -> bool:
    """Whether --model / --tokenizer names a path rather than a hub id ('gpt2', 'openai-community/gpt2')."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def has_tokenizer_files(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or all(
        (folder / name).is_file() for name in ("vocab.json", "merges.txt")
    )


def check_checkpoint_folder(name: str) -> dict[str, Any]:
    """The config.json of a --model folder, once it is known to be a GPT-2 checkpoint with weights."""
    folder = Path(name).expanduser()
    if not folder.exists():
        raise InvalidInputError(f"checkpoint folder not found: --model {name}")
    if not folder.is_dir():
        raise InvalidInputError(f"--model {name} is a file; give a checkpoint folder or a hub id")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InvalidInputError(f"--model {name} is not a checkpoint folder: it has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"--model {name}: config.json cannot be read ({error})") from None
    if not isinstance(config, dict):
        raise InvalidInputError(f"--model {name}: config.json is not a JSON object")
    kind = config.get("model_type")
    if kind != "gpt2":
        names = ", ".join(config.get("architectures") or []) or str(kind)
        raise InvalidInputError(
            f"--model {name} is not a GPT-2 checkpoint (model_type {kind!r}: {names}); export-gpt2 converts GPT-2 only"
        )
    if not any((folder / weights).is_file() for weights in WEIGHT_FILES):
        raise InvalidInputError(f"--model {name} has no weights ({' or '.join(WEIGHT_FILES[::2])})")
    return config


def check_tokenizer_source(name: str) -> None:
    """A --tokenizer path must be a tokenizer.json file or a folder with tokenizer files (hub ids are not checked)."""
    if not is_local_path(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise InvalidInputError(f"tokenizer folder not found: --tokenizer {name}")
    if path.is_file():
        if path.suffix != ".json":
            raise InvalidInputError(f"--tokenizer {name} is not a tokenizer.json file or a tokenizer folder")
        return
    if not has_tokenizer_files(path):
        raise InvalidInputError(
            f"--tokenizer {name} holds no tokenizer (expected tokenizer.json, or vocab.json and merges.txt)"
        )


def tokenizer_json_file(source: str) -> Path | None:
    """The tokenizer.json a local tokenizer source holds (None: a hub id, or only vocab.json + merges.txt)."""
    if not is_local_path(source):
        return None
    path = Path(source).expanduser()
    path = path if path.is_file() else path / "tokenizer.json"
    return path if path.is_file() else None


def check_tokenizer_fits(path: Path, description: str | None, vocab_size: int) -> None:
    """A tokenizer with more tokens than the model's vocabulary would give ids the model cannot take: refuse it."""
    size = Tokenizer(path).vocab_size
    if size > vocab_size:
        raise InvalidInputError(
            f"the tokenizer of {description} has {size} tokens, more than the model's vocabulary of {vocab_size}; "
            "give a matching one with --tokenizer DIR"
        )


@dataclass(frozen=True)
class TokenizerChoice:
    """Where the bundle's tokenizer comes from: a path or hub id (None: none), and a notice to show about it."""

    source: str | None
    description: str | None  # what bundle.json records (source.tokenizer)
    notice: str | None = None  # said on export (the shipped tokenizer taken, or no tokenizer at all)

    @property
    def shipped(self) -> bool:
        return self.source == str(GPT2_TOKENIZER)


def shipped_tokenizer(notice: str | None = None) -> TokenizerChoice:
    return TokenizerChoice(str(GPT2_TOKENIZER), SHIPPED_TOKENIZER, notice)


def choose_tokenizer(tokenizer: str | None, model: str | None, vocab_size: int | None) -> TokenizerChoice:
    """The tokenizer for a bundle: --tokenizer; else (random init, model None) the shipped GPT-2 one; else the
    checkpoint's own (a folder's files, or the hub id's); a folder without tokenizer files gets the shipped one only
    when its vocabulary is GPT-2's, and none otherwise (with a notice saying so)."""
    if tokenizer is not None:
        return TokenizerChoice(tokenizer, tokenizer)
    if model is None:
        return shipped_tokenizer()
    if not is_local_path(model) or has_tokenizer_files(Path(model).expanduser()):
        return TokenizerChoice(model, model)
    return fallback_tokenizer(f"checkpoint folder {model} has no tokenizer files", vocab_size)


def fallback_tokenizer(why: str, vocab_size: int | None) -> TokenizerChoice:
    """The shipped GPT-2 tokenizer for a GPT-2 vocabulary, else none; the notice says which and why."""
    if vocab_size == GPT2_VOCAB_SIZE:
        return shipped_tokenizer(
            f"{why}; its vocabulary is GPT-2's {GPT2_VOCAB_SIZE} tokens, so the bundle gets {SHIPPED_TOKENIZER}"
        )
    return TokenizerChoice(
        None,
        None,
        f"{why} and its vocabulary ({vocab_size} tokens) is not GPT-2's: the bundle takes token ids only "
        "(give a tokenizer with --tokenizer DIR)",
    )
