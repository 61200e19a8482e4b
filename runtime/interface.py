"""What a decoder graph takes and gives, found from the graph itself, so one runtime feeds every GPT-2 export.

gpt2-onnx's bundles: input_ids, attention_mask, position_ids, logits_to_keep and past_key_values.{i}.key/value in;
logits (the last `logits_to_keep` positions) and present.{i}.key/value out. optimum's text-generation-with-past
exports and transformers.js's graphs use the same names for the past and present, [batch, n_head, past, head_dim],
but give the logits of every position, take position_ids only since optimum 1.14, and a merged decoder adds a bool
use_cache_branch [1] that picks the branch without past. fp16 graphs take and return a float16 past.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from . import bundle
from .bundle import Architecture
from .errors import BundleError

USE_CACHE_BRANCH = "use_cache_branch"
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}


@dataclass(frozen=True)
class GraphInterface:
    """The optional inputs a graph takes and the dtype of its past; the session feeds exactly these."""

    position_ids: bool = True  # without it the graph numbers positions by column (rows cannot be left-padded)
    logits_to_keep: bool = True  # without it the graph returns the logits of every new position
    use_cache_branch: bool = False  # a merged decoder's branch flag: True once there is a past
    past_dtype: str = "float32"

    def input_names(self) -> list[str]:
        """The inputs before the past, in the order the session feeds them."""
        names = [bundle.INPUT_IDS, bundle.ATTENTION_MASK]
        names += [bundle.POSITION_IDS] if self.position_ids else []
        names += [bundle.LOGITS_TO_KEEP] if self.logits_to_keep else []
        return names + ([USE_CACHE_BRANCH] if self.use_cache_branch else [])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def inspect_graph(inputs: list[Any], outputs: list[Any], arch: Architecture, where: str) -> GraphInterface:
    """The interface of a graph from onnxruntime's input and output descriptions (name, shape, type); BundleError
    in one line when it is not a GPT-2 decoder with a past this runtime can feed."""
    inputs_by_name = {node.name: node for node in inputs}
    output_names = {node.name for node in outputs}
    if bundle.INPUT_IDS not in inputs_by_name:
        raise BundleError(f"{where} is not a GPT-2 decoder: it has no input_ids input")
    if bundle.LOGITS not in output_names:
        found = ", ".join(sorted(output_names)[:3])
        raise BundleError(f"{where} is not a GPT-2 language model: it has no logits output (outputs: {found})")
    past_inputs = sorted(name for name in inputs_by_name if name.startswith("past"))
    if not any(name.startswith("present") for name in output_names):
        raise BundleError(
            f"{where} has no present.* outputs: it is not a decoder with past key/values (with optimum, export "
            "with --task text-generation-with-past)"
        )
    if bundle.ATTENTION_MASK not in inputs_by_name:
        raise BundleError(f"{where} has no attention_mask input, which this runtime needs to batch and to stream")
    _, expected_outputs = bundle.io_names(arch.n_layer)
    expected_past = [name for layer in range(arch.n_layer) for name in _past_names(layer)]
    if past_inputs != sorted(expected_past):
        shown = ", ".join(past_inputs[:2]) or "none"
        raise BundleError(
            f"{where} takes a past this runtime cannot feed ({shown}, ...): it feeds past_key_values.{{i}}.key and "
            f".value for each of config.json's {arch.n_layer} layers, [batch, n_head, past, head_dim]"
        )
    missing = [name for name in expected_outputs if name not in output_names]
    if missing:
        raise BundleError(f"{where} lacks the graph output {missing[0]}")
    dtypes = {inputs_by_name[name].type for name in expected_past}
    for name in expected_past:
        _check_past_shape(inputs_by_name[name], arch, where)
    if len(dtypes) != 1 or next(iter(dtypes)) not in _DTYPES:
        kinds = ", ".join(sorted(dtypes))
        raise BundleError(f"{where} takes a past of type {kinds}; this runtime feeds float or float16")
    known = {bundle.INPUT_IDS, bundle.ATTENTION_MASK, bundle.POSITION_IDS, bundle.LOGITS_TO_KEEP, USE_CACHE_BRANCH}
    unknown = sorted(set(inputs_by_name) - known - set(expected_past))
    if unknown:
        raise BundleError(f"{where} takes an input this runtime does not know: {unknown[0]}")
    return GraphInterface(
        position_ids=bundle.POSITION_IDS in inputs_by_name,
        logits_to_keep=bundle.LOGITS_TO_KEEP in inputs_by_name,
        use_cache_branch=USE_CACHE_BRANCH in inputs_by_name,
        past_dtype=_DTYPES[next(iter(dtypes))],
    )


def _past_names(layer: int) -> tuple[str, str]:
    return bundle.past_key_name(layer), bundle.past_value_name(layer)


def _check_past_shape(node: Any, arch: Architecture, where: str) -> None:
    shape = list(node.shape)
    fixed = {1: arch.n_head, 3: arch.head_dim}
    if len(shape) != 4 or any(isinstance(shape[axis], int) and shape[axis] != size for axis, size in fixed.items()):
        raise BundleError(
            f"{where}: input {node.name} has shape {shape}; this runtime feeds [batch, {arch.n_head} heads, past, "
            f"{arch.head_dim}] (config.json's n_head and n_embd)"
        )
