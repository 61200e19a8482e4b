"""Step 1 of the course notebook: how GPT-2 cuts text into tokens, and back.

python examples/tokens.py models/gpt2 ["some text"]
"""

import argparse

import gpt2onnx

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("bundle", help="bundle folder written by export-gpt2")
parser.add_argument("text", nargs="?", default="ArtificCial intElliGence")
args = parser.parse_args()

model = gpt2onnx.load(args.bundle)
ids = model.tokenizer.encode(args.text)
print(f"{args.text!r} is {len(ids)} tokens:")
for token_id, token in zip(ids, model.tokenizer.token_strings(ids), strict=True):
    print(f"  |{token}| -> {token_id}")
print("decoded back:", repr(model.tokenizer.decode(ids)))
