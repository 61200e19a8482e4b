"""Step 2 of the course notebook: the ten most likely next tokens after a prompt, with their probabilities.

python examples/next_tokens.py models/gpt2 ["a prompt"]
"""

import argparse

import gpt2onnx

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("bundle", help="bundle folder written by export-gpt2")
parser.add_argument("prompt", nargs="?", default="Artificial intelligence")
args = parser.parse_args()

model = gpt2onnx.load(args.bundle)
print(f"after {args.prompt!r} the model expects:")
for rank, row in enumerate(model.next_token_probs(args.prompt, top=10), 1):
    print(f"{rank:>3}  {row.probability:8.4%}  {row.token_id:>6}  |{row.token}|")
