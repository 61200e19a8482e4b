"""Step 6 of the course notebook: beam search, then beam sampling (num_beams=5 with do_sample=True).

python examples/beam_sampling.py models/gpt2 ["a prompt"] [--seed 0]
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
beams = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, num_beams=5, num_return_sequences=3)
print("beam search, the 3 best of 5 beams:")
for sequence in beams.sequences:
    print(f"  score {sequence.score:.3f}: {sequence.text!r}")

sampled = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, num_beams=5, do_sample=True, seed=args.seed)
print("beam sampling (num_beams=5, do_sample=True):")
print(sampled.sequences[0].text)
