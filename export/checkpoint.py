"""Loading a GPT-2 checkpoint (hub id, local folder, or seeded random weights) with transformers."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gpt2onnx.runtime.errors import ExportError, InvalidInputError
from gpt2onnx.runtime.options import GENERATION_DEFAULT_KEYS

from .graph import ACTIVATIONS, GPT2Spec
from .hub import hub_endpoint, hub_offline_by_choice, hub_reachable

VOCAB_SIZE = 50257
CONTEXT = 1024
RANDOM_SHAPES = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64},
    "small": {"n_layer": 12, "n_head": 12, "n_embd": 768},
    "medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},
}


@dataclass
class Checkpoint:
    """A loaded PyTorch GPT-2 with what the bundle records about it."""

    model: Any  # transformers.GPT2LMHeadModel, in eval mode, float32
    spec: GPT2Spec
    source: dict[str, Any]
    special_tokens: dict[str, int | None]
    generation_defaults: dict[str, Any] = field(default_factory=dict)

    def weights(self) -> dict[str, np.ndarray]:
        """The state dict as float32 numpy arrays (the tied lm_head is left out when it is the embedding)."""
        state = self.model.state_dict()
        arrays = {name: tensor.detach().float().cpu().numpy() for name, tensor in state.items()}
        if self.spec.tied_embeddings:
            arrays.pop("lm_head.weight", None)
        return arrays


def spec_from_config(config: Any) -> GPT2Spec:
    if getattr(config, "model_type", None) != "gpt2":
        kind = getattr(config, "model_type", None) or "unknown"
        names = ", ".join(getattr(config, "architectures", None) or []) or kind
        raise InvalidInputError(
            f"not a GPT-2 checkpoint: model type {kind!r} ({names}); export-gpt2 converts GPT-2 only"
        )
    activation = config.activation_function
    if activation not in ACTIVATIONS:
        raise InvalidInputError(f"unsupported activation function {activation!r}; supported: {', '.join(ACTIVATIONS)}")
    return GPT2Spec(
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        n_inner=config.n_inner if config.n_inner is not None else 4 * config.n_embd,  # transformers' default
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        activation=activation,
        layer_norm_epsilon=config.layer_norm_epsilon,
        scale_attn_weights=config.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        tied_embeddings=getattr(config, "tie_word_embeddings", True),
    )


def _special_tokens(config: Any, generation_config: Any) -> dict[str, int | None]:
    def first(value: Any) -> int | None:
        return value[0] if isinstance(value, (list, tuple)) and value else value if isinstance(value, int) else None

    sources = [generation_config, config] if generation_config is not None else [config]

    def pick(name: str) -> int | None:
        for source in sources:
            value = first(getattr(source, name, None))
            if value is not None:
                return value
        return None

    return {
        "bos_token_id": pick("bos_token_id"),
        "eos_token_id": pick("eos_token_id"),
        "pad_token_id": pick("pad_token_id"),
    }


def _generation_defaults(generation_config: Any) -> dict[str, Any]:
    if generation_config is None:
        return {}
    diff = generation_config.to_diff_dict()
    return {key: diff[key] for key in GENERATION_DEFAULT_KEYS if key in diff and diff[key] is not None}


@contextmanager
def _loading_bars(downloads: bool) -> Iterator[None]:
    """transformers' 'Loading weights' bar off (the export prints its own steps); the hub's download bars on only
    when `downloads` (not --quiet). Both are restored afterwards."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    weights_bar, hub_bars = transformers_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # turns the hub's off too
    if downloads:
        enable_progress_bars()
    try:
        yield
    finally:
        if weights_bar:
            transformers_logging.enable_progress_bar()
        (enable_progress_bars if hub_bars else disable_progress_bars)()


def load_pretrained(model_id: str, revision: str | None = None, show_downloads: bool = True) -> Checkpoint:
    """Load a GPT2LMHeadModel from a hub id or local folder; never runs code shipped with the checkpoint.

    A hub id is downloaded when the hub can be reached (with the hub's progress bars when show_downloads), else taken
    from the local Hugging Face cache; with neither, ExportError says so at once (instead of transformers' half a
    minute of retries) and names --random-init.
    """
    with _loading_bars(show_downloads):
        return _load_pretrained(model_id, revision)


def _load_pretrained(model_id: str, revision: str | None) -> Checkpoint:
    import torch
    from transformers import AutoConfig, GenerationConfig, GPT2LMHeadModel

    local = Path(model_id).expanduser()
    offline = not local.is_dir() and not hub_reachable()
    try:
        config = AutoConfig.from_pretrained(
            model_id, revision=revision, trust_remote_code=False, local_files_only=offline
        )
    except ValueError as error:
        raise ExportError(f"cannot read the config of {model_id}: {str(error).splitlines()[0]}") from None
    except OSError as error:
        if offline:
            why = (
                "HF_HUB_OFFLINE is set" if hub_offline_by_choice() else f"the hub ({hub_endpoint()}) cannot be reached"
            )
            raise ExportError(
                f"cannot download {model_id}: {why} and it is not in the local cache; without the hub, export a "
                "random-weight GPT-2 with --random-init small, or give a checkpoint folder with --model DIR"
            ) from None
        raise ExportError(f"cannot load {model_id}: {str(error).splitlines()[0]}") from None
    spec = spec_from_config(config)
    try:
        generation_config = GenerationConfig.from_pretrained(model_id, revision=revision, local_files_only=offline)
    except OSError:
        generation_config = None
    try:
        model = GPT2LMHeadModel.from_pretrained(
            model_id, revision=revision, dtype=torch.float32, trust_remote_code=False, local_files_only=offline
        )
    except OSError as error:
        raise ExportError(f"cannot load the weights of {model_id}: {str(error).splitlines()[0]}") from None
    model.eval()
    commit = getattr(config, "_commit_hash", None)
    source = {
        "model": model_id if not local.is_dir() else str(local.resolve()),
        "revision": revision or commit,
        "random_init": None,
    }
    return Checkpoint(
        model, spec, source, _special_tokens(config, generation_config), _generation_defaults(generation_config)
    )


def random_checkpoint(shape: str, seed: int = 0, outliers: bool = False) -> Checkpoint:
    """A GPT-2 of a named shape with seeded random weights (transformers' own initialisation); outliers: with trained
    GPT-2's massive activations, outlier channels and peaked logits written in (export/outliers.py)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if shape not in RANDOM_SHAPES:
        raise InvalidInputError(f"unknown --random-init shape {shape!r}; choose one of {', '.join(RANDOM_SHAPES)}")
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=CONTEXT, **RANDOM_SHAPES[shape])
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    random_init: dict[str, Any] = {"shape": shape, "seed": seed}
    if outliers:
        from .outliers import add_outliers

        random_init["outliers"] = add_outliers(model)
    name = f"random-init:{shape}" + ("+outliers" if outliers else "")
    source = {"model": name, "revision": None, "random_init": random_init}
    specials = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": None}
    return Checkpoint(model, spec_from_config(config), source, specials)


def tokenizer_json(source: str, revision: str | None, work_dir: Path) -> Path | None:
    """A tokenizer.json for a tokenizer.json file, a checkpoint or tokenizer folder, or a hub id: copied if there is
    one, else converted (vocab.json + merges.txt, or the hub's files). None when the source has no tokenizer."""
    path = Path(source).expanduser()
    found = path if path.is_file() else path / "tokenizer.json"
    target = work_dir / "tokenizer.source.json"
    if found.is_file():
        shutil.copyfile(found, target)
        return target
    from transformers import AutoTokenizer

    offline = not path.is_dir() and not hub_reachable()
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=revision, use_fast=True, trust_remote_code=False, local_files_only=offline
        )
    except (OSError, ValueError, TypeError):
        return None
    if not getattr(tokenizer, "is_fast", False):
        raise ExportError(f"the tokenizer of {source} has no fast (tokenizers) form to save as tokenizer.json")
    with tempfile.TemporaryDirectory(dir=work_dir) as temp:
        tokenizer.save_pretrained(temp)
        shutil.copyfile(Path(temp) / "tokenizer.json", target)
    return target
