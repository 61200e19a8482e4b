"""gpt2-serve: an OpenAI-compatible HTTP server for a gpt2onnx bundle (needs the `serve` extra).

from gpt2onnx.serve.app import create_app
app = create_app(gpt2onnx.load("models/gpt2"), max_batch=16, queue_size=8)   # any ASGI server can run it
"""

# Rows decoded together by default: on 2 cores, GPT-2-small int8 gains throughput up to about 16 rows a step and
# none beyond (docs/SERVER.md has the measurement).
DEFAULT_MAX_BATCH = 16
