"""Step 4 of the course notebook: greedy search with generate(), and the same text streamed as it is made.

python examples/greedy.py models/gpt2 ["a prompt"] [--max-new-tokens 50]
"""

import argparse

import gpt2onnx

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("bundle", help="bundle folder written by export-gpt2")
parser.add_argument("prompt", nargs="?", default="Artificial intelligence")
parser.add_argument("--max-new-tokens", type=int, default=50)
args = parser.parse_args()

model = gpt2onnx.load(args.bundle)
output = model.generate(args.prompt, max_new_tokens=args.max_new_tokens)
print(output.results[0].sequences[0].text)
print(f"({output.timing.tokens_generated} tokens, {output.timing.decode_ms_per_token:.1f} ms/token)")

print("streamed:", args.prompt, end="", flush=True)
for piece in model.stream(args.prompt, max_new_tokens=args.max_new_tokens):
    print(piece, end="", flush=True)
print()
