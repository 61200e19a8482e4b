"""Builds the GPT-2 decoder as one ONNX graph with past key/values, straight from the weights.

One graph serves the prompt (empty past) and every decode step. Inputs: input_ids [batch, seq],
attention_mask [batch, past+seq], position_ids [batch, seq], logits_to_keep (scalar: how many last positions
get logits; 0 = all), past_key_values.{i}.key|value [batch, n_head, past, head_dim]. Outputs: logits
[batch, kept, vocab] (float32) and present.{i}.key|value [batch, n_head, past+seq, head_dim].
The tied token embedding is stored once (an untied lm_head gets its own weight): Gather reads it for
the input, Gemm(transB) for the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gpt2onnx.runtime import bundle
from gpt2onnx.runtime.errors import ExportError

OPSET = 17
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish", "quick_gelu")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass(frozen=True)
class GPT2Spec:
    """The hyper-parameters of a GPT-2 checkpoint that shape its graph."""

    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    n_positions: int
    activation: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tied_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def attention_scale(self, layer: int) -> float:
        scale = 1.0 / math.sqrt(self.head_dim) if self.scale_attn_weights else 1.0
        return scale / (layer + 1) if self.scale_attn_by_inverse_layer_idx else scale


class _Builder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, dtype: str) -> None:
        from onnx import TensorProto, helper, numpy_helper

        self.helper, self.numpy_helper, self.TensorProto = helper, numpy_helper, TensorProto
        self.np_dtype = NUMPY_DTYPES[dtype]
        self.onnx_dtype = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype=None) -> str:
        array = np.asarray(value, dtype=dtype or self.np_dtype)
        return self.weight(self.fresh("const"), array)

    def op(self, op_type: str, *inputs: str, outputs: list[str] | None = None, **attrs) -> str:
        outputs = outputs or [self.fresh(op_type.lower())]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outputs, name=self.fresh(op_type), **attrs))
        return outputs[0]

    def linear(self, x: str, weight: str, bias: str) -> str:
        return self.op("Add", self.op("MatMul", x, weight), bias)


def _activation(b: _Builder, x: str, name: str) -> str:
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        cube = b.op("Pow", x, b.const(3.0))
        inner = b.op("Mul", b.op("Add", x, b.op("Mul", cube, b.const(0.044715))), b.const(math.sqrt(2.0 / math.pi)))
        return b.op("Mul", b.op("Mul", x, b.const(0.5)), b.op("Add", b.op("Tanh", inner), b.const(1.0)))
    if name == "gelu":
        erf = b.op("Erf", b.op("Div", x, b.const(math.sqrt(2.0))))
        return b.op("Mul", b.op("Mul", x, b.op("Add", erf, b.const(1.0))), b.const(0.5))
    if name == "relu":
        return b.op("Relu", x)
    if name in ("silu", "swish"):
        return b.op("Mul", x, b.op("Sigmoid", x))
    if name == "quick_gelu":
        return b.op("Mul", x, b.op("Sigmoid", b.op("Mul", x, b.const(1.702))))
    raise ExportError(f"unsupported activation function {name!r}; supported: {', '.join(ACTIVATIONS)}")


def build_graph(spec: GPT2Spec, weights: dict[str, np.ndarray], dtype: str = "float32"):
    """Return the onnx.ModelProto of a GPT-2 with the given transformers-style state dict (numpy arrays)."""
    from onnx import TensorProto, helper

    if dtype not in NUMPY_DTYPES:
        raise ExportError(f"unsupported dtype {dtype!r}; choose float32 or float16")
    if spec.activation not in ACTIVATIONS:
        raise ExportError(f"unsupported activation function {spec.activation!r}; supported: {', '.join(ACTIVATIONS)}")
    b = _Builder(dtype)
    H, D, E = spec.n_head, spec.head_dim, spec.n_embd

    def w(name: str) -> str:
        return b.weight(name, weights[name].astype(b.np_dtype))

    int64 = np.int64
    # Lengths: S new tokens, P past tokens, T = P + S keys.
    past_len = b.op("Shape", bundle.past_key_name(0), start=2, end=3)
    seq_len = b.op("Shape", bundle.INPUT_IDS, start=1, end=2)
    total_len = b.op("Shape", bundle.ATTENTION_MASK, start=1, end=2)
    zero, one = b.const(0, int64), b.const(1, int64)
    scalar_axes = b.const([0], int64)
    past_scalar = b.op("Squeeze", past_len, scalar_axes)
    query_pos = b.op("Range", past_scalar, b.op("Add", past_scalar, b.op("Squeeze", seq_len, scalar_axes)), one)
    key_pos = b.op("Range", zero, b.op("Squeeze", total_len, scalar_axes), one)
    causal = b.op(
        "LessOrEqual",
        b.op("Unsqueeze", key_pos, b.const([0], int64)),
        b.op("Unsqueeze", query_pos, b.const([1], int64)),
    )
    padding = b.op("Unsqueeze", b.op("Cast", bundle.ATTENTION_MASK, to=TensorProto.BOOL), b.const([1, 2], int64))
    allowed = b.op("And", padding, causal)  # [batch, 1, S, T]
    masked_value = b.const(np.finfo(b.np_dtype).min)

    wte = w("transformer.wte.weight")
    hidden = b.op(
        "Add", b.op("Gather", wte, bundle.INPUT_IDS), b.op("Gather", w("transformer.wpe.weight"), bundle.POSITION_IDS)
    )
    heads_shape = b.const([0, 0, H, D], int64)
    merged_shape = b.const([0, 0, E], int64)
    split_sizes = b.const([E, E, E], int64)
    for layer in range(spec.n_layer):
        p = f"transformer.h.{layer}."
        eps = spec.layer_norm_epsilon
        normed = b.op("LayerNormalization", hidden, w(p + "ln_1.weight"), w(p + "ln_1.bias"), axis=-1, epsilon=eps)
        qkv = b.linear(normed, w(p + "attn.c_attn.weight"), w(p + "attn.c_attn.bias"))
        q, k, v = (b.fresh(n) for n in "qkv")
        b.op("Split", qkv, split_sizes, outputs=[q, k, v], axis=2)
        q, k, v = (b.op("Transpose", b.op("Reshape", t, heads_shape), perm=[0, 2, 1, 3]) for t in (q, k, v))
        key = b.op("Concat", bundle.past_key_name(layer), k, outputs=[bundle.present_key_name(layer)], axis=2)
        value = b.op("Concat", bundle.past_value_name(layer), v, outputs=[bundle.present_value_name(layer)], axis=2)
        scores = b.op(
            "Mul", b.op("MatMul", q, b.op("Transpose", key, perm=[0, 1, 3, 2])), b.const(spec.attention_scale(layer))
        )
        probs = b.op("Softmax", b.op("Where", allowed, scores, masked_value), axis=-1)
        context = b.op("Reshape", b.op("Transpose", b.op("MatMul", probs, value), perm=[0, 2, 1, 3]), merged_shape)
        hidden = b.op("Add", hidden, b.linear(context, w(p + "attn.c_proj.weight"), w(p + "attn.c_proj.bias")))
        normed = b.op("LayerNormalization", hidden, w(p + "ln_2.weight"), w(p + "ln_2.bias"), axis=-1, epsilon=eps)
        inner = _activation(b, b.linear(normed, w(p + "mlp.c_fc.weight"), w(p + "mlp.c_fc.bias")), spec.activation)
        hidden = b.op("Add", hidden, b.linear(inner, w(p + "mlp.c_proj.weight"), w(p + "mlp.c_proj.bias")))
    hidden = b.op(
        "LayerNormalization",
        hidden,
        w("transformer.ln_f.weight"),
        w("transformer.ln_f.bias"),
        axis=-1,
        epsilon=spec.layer_norm_epsilon,
    )
    # Keep only the last `logits_to_keep` positions (0 keeps all) before the vocabulary projection.
    start = b.op("Unsqueeze", b.op("Neg", bundle.LOGITS_TO_KEEP), scalar_axes)
    kept = b.op("Slice", hidden, start, b.const([np.iinfo(np.int64).max], int64), b.const([1], int64))
    lm_head = wte if spec.tied_embeddings else w("lm_head.weight")
    flat_logits = b.op("Gemm", b.op("Reshape", kept, b.const([-1, E], int64)), lm_head, transB=1)
    logits_shape = b.op("Concat", b.op("Shape", kept, start=0, end=2), b.const([spec.vocab_size], int64), axis=0)
    logits = b.op("Reshape", flat_logits, logits_shape)
    if dtype == "float32":
        b.op("Identity", logits, outputs=[bundle.LOGITS])
    else:
        b.op("Cast", logits, outputs=[bundle.LOGITS], to=TensorProto.FLOAT)

    kv_shape = ["batch", H, "past_sequence", D]
    present_shape = ["batch", H, "total_sequence", D]
    inputs = [
        helper.make_tensor_value_info(bundle.INPUT_IDS, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(bundle.ATTENTION_MASK, TensorProto.INT64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info(bundle.POSITION_IDS, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(bundle.LOGITS_TO_KEEP, TensorProto.INT64, []),
    ]
    outputs = [helper.make_tensor_value_info(bundle.LOGITS, TensorProto.FLOAT, ["batch", "kept", spec.vocab_size])]
    for layer in range(spec.n_layer):
        for name in (bundle.past_key_name(layer), bundle.past_value_name(layer)):
            inputs.append(helper.make_tensor_value_info(name, b.onnx_dtype, kv_shape))
        for name in (bundle.present_key_name(layer), bundle.present_value_name(layer)):
            outputs.append(helper.make_tensor_value_info(name, b.onnx_dtype, present_shape))
    graph = helper.make_graph(b.nodes, "gpt2_decoder_with_past", inputs, outputs, b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gpt2onnx")
    model.ir_version = 8
    return model
