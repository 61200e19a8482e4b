"""Step 3 of the course notebook: generate one token at a time by hand, always taking the most likely one.

Each step runs the whole text through the model again (simple, not fast: generate() keeps a cache instead),
and the result is the same as greedy generate().

    python examples/one_token_steps.py models/gpt2 ["a prompt"] [--steps 10]
"""

import argparse

import gpt2onnx

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("bundle", help="bundle folder written by export-gpt2")
parser.add_argument("prompt", nargs="?", default="Artificial intelligence")
parser.add_argument("--steps", type=int, default=10)
args = parser.parse_args()

model = gpt2onnx.load(args.bundle)
ids = model.tokenizer.encode(args.prompt)
for step in range(1, args.steps + 1):
    [best] = model.next_token_probs(input_ids=ids, top=1)
    ids.append(best.token_id)
    print(f"step {step:>2}: +|{best.token}| ({best.probability:.2%})  {model.tokenizer.decode(ids)!r}")

greedy = model.generate(args.prompt, max_new_tokens=args.steps).sequences[0]
print("same as generate():", greedy.token_ids == ids[: len(greedy.token_ids)])
