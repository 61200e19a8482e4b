"""One quality run: a system's next-token logits at every position of a text, written as one float32 array.

Runs under the interpreter of the system it measures (the main venv, or a peer's venv), like worker.py: standard
library and numpy at module level, each system imported when used.

    python benchmarks/quality_worker.py SPEC.json
    (spec: adapter, model, threads, pieces [[ids...]...], greedy {prompt, new_tokens}, result: the .npy to write)

Each piece is run from an empty cache; the array holds, piece after piece, the logits of its positions 0 .. n-2
(each predicting the next token of the piece): [sum of (len(piece) - 1), vocab]. Beside it (.json): the greedy
tokens after the prompt, for systems with a decoding loop (null for a bare graph).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from worker import open_llama


def gpt2onnx_greedy(spec: dict[str, Any]) -> list[int]:
    import gpt2onnx

    greedy = spec["greedy"]
    model = gpt2onnx.load(spec["model"], provider="cpu")
    count = greedy["new_tokens"]
    output = model.generate(input_ids=greedy["prompt"], max_new_tokens=count, min_new_tokens=count)
    return list(output.results[0].sequences[0].generated_token_ids)


def gpt2onnx_logits(spec: dict[str, Any]) -> Iterator[np.ndarray]:
    """A gpt2-onnx bundle, teacher-forced by the runtime's scoring code (chunks over one cache)."""
    from gpt2onnx.runtime import bundle
    from gpt2onnx.runtime.scoring import position_logits
    from gpt2onnx.runtime.session import DecoderSession

    session = DecoderSession(bundle.read_manifest(spec["model"]), provider="cpu")
    for piece in spec["pieces"]:
        yield np.concatenate([logits for _, logits in position_logits(session, np.asarray(piece, np.int64))])


def onnx_graph_logits(spec: dict[str, Any]) -> Iterator[np.ndarray]:
    """An optimum-layout graph (model.onnx in the folder: input_ids, attention_mask, position_ids, an empty
    past_key_values.{i}.key/value) under plain onnxruntime, the whole piece in one run."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    session = onnxruntime.InferenceSession(
        str(Path(spec["model"]) / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    inputs = {item.name: item for item in session.get_inputs()}
    for piece in spec["pieces"]:
        ids = np.asarray(piece[:-1], np.int64)[None]
        feed: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
        for name, item in inputs.items():
            if name.startswith("past_key_values"):
                _, heads, _, head_dim = item.shape
                feed[name] = np.zeros((1, heads, 0, head_dim), np.float32)
        yield session.run(["logits"], feed)[0][0]


def _llama(spec: dict[str, Any], logits_all: bool) -> Any:
    return open_llama(spec["model"], spec["threads"], logits_all)


def llama_cpp_greedy(spec: dict[str, Any]) -> list[int]:
    llm, greedy = _llama(spec, logits_all=False), spec["greedy"]
    tokens = []
    for token in llm.generate(greedy["prompt"], temp=0.0, repeat_penalty=1.0):  # endless: EOS does not stop it
        tokens.append(int(token))
        if len(tokens) == greedy["new_tokens"]:
            return tokens
    return tokens


def llama_cpp_logits(spec: dict[str, Any]) -> Iterator[np.ndarray]:
    """A GGUF under llama-cpp-python, with the logits of every position kept (logits_all)."""
    llm = _llama(spec, logits_all=True)
    for piece in spec["pieces"]:
        llm.reset()
        llm.eval(piece[:-1])
        yield np.array(llm.scores[: len(piece) - 1], np.float32)


ADAPTERS: dict[str, tuple[Callable[[dict[str, Any]], Iterator[np.ndarray]], Callable[[dict[str, Any]], Any]]] = {
    "gpt2onnx": (gpt2onnx_logits, gpt2onnx_greedy),
    "genai": (onnx_graph_logits, lambda spec: None),
    "llamacpp": (llama_cpp_logits, llama_cpp_greedy),
}


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text("utf-8"))
    logits_of, greedy_of = ADAPTERS[spec["adapter"]]
    result = Path(spec["result"])
    np.save(result, np.concatenate(list(logits_of(spec))).astype(np.float32))
    result.with_suffix(".json").write_text(json.dumps({"greedy": greedy_of(spec)}) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
