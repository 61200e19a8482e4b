"""gpt2-serve: an OpenAI-compatible HTTP server for a gpt2onnx bundle (needs the `serve` extra).

from gpt2onnx.serve.app import create_app
app = create_app(gpt2onnx.load("models/gpt2"), workers=1, queue_size=8)   # any ASGI server can run it
"""
