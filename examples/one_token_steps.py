"""Step 3 of the course notebook: generate one token at a time by hand, always taking the most likely one.

A Generator keeps the model's key/value cache between steps, so each step runs only the new token through the
model; the loop is yours: look at the logits, pick, go on, go back (rewind_to). The result is greedy generate()'s.

    python examples/one_token_steps.py models/gpt2 ["a prompt"] [--steps 10]
"""

import argparse

import numpy as np

import gpt2onnx

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("bundle", help="bundle folder written by export-gpt2")
parser.add_argument("prompt", nargs="?", default="Artificial intelligence")
parser.add_argument("--steps", type=int, default=10)
args = parser.parse_args()

model = gpt2onnx.load(args.bundle)
generator = model.generator(max_new_tokens=args.steps)
generator.append_tokens(args.prompt)
step = 0
while not generator.is_done():
    logits = generator.get_logits()[0]  # the raw logits at the last position
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    generator.generate_next_token()  # greedy: the most likely token
    token = int(generator.get_next_tokens()[0])
    step += 1
    text = model.tokenizer.decode(generator.get_sequence(0).tolist())
    print(f"step {step:>2}: +|{model.tokenizer.token_strings([token])[0]}| ({probabilities[token]:.2%})  {text!r}")

ids = generator.get_sequence(0).tolist()
greedy = model.generate(args.prompt, max_new_tokens=args.steps).sequences[0]
print("same as generate():", greedy.token_ids == ids)

generator.rewind_to(len(ids) - 3)  # take back the last three tokens, and let the model choose them again
while not generator.is_done():
    generator.generate_next_token()
print("after rewind_to, the same again:", generator.get_sequence(0).tolist() == ids)
