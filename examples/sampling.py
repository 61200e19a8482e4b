"""Step 5 of the course notebook: sampling (do_sample=True) with top-k, top-p and temperature; a seed repeats it.

python examples/sampling.py models/gpt2 ["a prompt"] [--seed 0]
"""

import argparse

import gpt2onnx

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("bundle", help="bundle folder written by export-gpt2")
parser.add_argument("prompt", nargs="?", default="Artificial intelligence")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--max-new-tokens", type=int, default=50)
args = parser.parse_args()

model = gpt2onnx.load(args.bundle)
options = {"max_new_tokens": args.max_new_tokens, "do_sample": True, "top_k": 50, "top_p": 0.95, "temperature": 0.8}
output = model.generate(args.prompt, num_return_sequences=3, seed=args.seed, **options)
for number, text in enumerate(output.texts, 1):
    print(f"--- sample {number} ---")
    print(args.prompt + text)

again = model.generate(args.prompt, num_return_sequences=3, seed=args.seed, **options)
print("same seed, same samples:", again.texts == output.texts)
