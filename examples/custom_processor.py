"""Your own decoding rule: a logits processor and a stopping criterion, as transformers takes them.

A logits processor is any callable f(input_ids, scores) -> scores (input_ids: int64 [rows, length], the prompt
included; scores: float32 [rows, vocab]); it runs after the built-in processors. A stopping criterion is any callable
g(input_ids, scores) -> bool [rows] (True: that row is done). Here: no token may repeat the one just before it, and
a row ends at its first full stop.

    python examples/custom_processor.py models/gpt2 ["a prompt"] [--max-new-tokens 40]
"""

import argparse
import itertools

import numpy as np

import gpt2onnx

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("bundle", help="bundle folder written by export-gpt2")
parser.add_argument("prompt", nargs="?", default="Artificial intelligence")
parser.add_argument("--max-new-tokens", type=int, default=40)
args = parser.parse_args()

model = gpt2onnx.load(args.bundle)
full_stop = model.tokenizer.encode(".")[0]


def no_immediate_repeat(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Forbid, in every row, the token that row ends with."""
    scores = scores.copy()
    scores[np.arange(len(scores)), input_ids[:, -1]] = -np.inf
    return scores


def stop_at_full_stop(input_ids: np.ndarray, scores: np.ndarray | None) -> np.ndarray:
    return input_ids[:, -1] == full_stop


plain = model.generate(args.prompt, max_new_tokens=args.max_new_tokens)
ruled = model.generate(
    args.prompt,
    max_new_tokens=args.max_new_tokens,
    logits_processor=[no_immediate_repeat],
    stopping_criteria=[stop_at_full_stop],
)
print("greedy:           ", repr(plain.text))
print("with the rules:   ", repr(ruled.text))
ids = ruled.sequences[0].generated_token_ids
repeats = sum(a == b for a, b in itertools.pairwise(ids))
print(f"tokens repeated at once: {repeats}; finish reason: {ruled.sequences[0].finish_reason}")
