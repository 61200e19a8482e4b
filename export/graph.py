"""Builds the GPT-2 decoder as one ONNX graph with past key/values, straight from the weights.

One graph serves the prompt (empty past) and every decode step. Inputs: input_ids [batch, seq],
attention_mask [batch, past+seq], position_ids [batch, seq], logits_to_keep (scalar: how many last positions
get logits; 0 = all), past_key_values.{i}.key|value. Outputs: logits [batch, kept, vocab] (float32) and
present.{i}.key|value. The key/value cache is either growing (past [batch, n_head, past, head_dim] in, present
[batch, n_head, past+seq, head_dim] out) or preallocated (past and present are one buffer [batch, n_head, capacity,
head_dim] that the runtime binds as both, and the graph writes the new positions into it in place: no step copies
the cache).

Blocks come in two forms: standard ONNX ops (plain; growing cache, Concat), or onnxruntime's contrib ops (fused:
FastGelu with the MLP bias; MultiHeadAttention for a growing cache, GroupQueryAttention over the packed QKV for a
preallocated one, the attention mask turned into an additive bias beside the op's own causal mask). The QKV
projection adds its own bias. The fused form can carry quantised weights: every projection becomes MatMulNBits (8
bits in symmetric blocks, or 4 bits in asymmetric blocks with a zero point each, of block_size inputs along the
input dimension; int8 activations at run time) with its bias folded in. Residual sums are Add + LayerNormalization:
on onnxruntime's CPU provider that pair is faster than its SkipLayerNormalization (measured 0.19 vs 1.03 ms for 512
tokens). The tied token embedding is stored once: as [n_embd, vocab] for float graphs (MatMul reads it for the
logits, a Gather along axis 1 for the input), or as the lm_head's MatMulNBits blocks for quantised graphs (the input
Gather dequantises its rows; the head may keep 8 bits in a 4-bit graph). An untied lm_head gets its own weight.

An int8 graph with fast prefill holds the blocks twice, chosen per run by an If on the step's length: steps of one
token (decoding) run the MatMulNBits blocks; longer steps (prompts) run the same blocks over int8 matrices with one
scale per output column (DynamicQuantizeMatMul: onnxruntime's int8 GEMM, about twice as fast for hundreds of rows;
activations quantised per tensor at run time). Embedding, positions and lm_head sit outside the If, shared.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from gpt2onnx.runtime import bundle
from gpt2onnx.runtime.errors import ExportError

from .rounding import ZERO_8BIT, BlockLevels, round_to_nearest

OPSET = 17
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish", "quick_gelu")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
CONTRIB = "com.microsoft"
# int8 weights: by default one scale per QUANT_BLOCK inputs of each output. On the stress checkpoint blocks of 32
# meet int8's floors (top-1 97.2% against 96.7% at 128, KL 0.0019 against 0.0028) but decode at 1.25x the time
# (Intel Xeon, `benchmarks/run.py --outliers --rounds 3`: 6.3 against 5.0 ms/token).
QUANT_BLOCK = 128
# int4's default. With block 0 at 8 bits (DEFAULT_INT8_LAYERS) blocks of 128 meet the int4 floors on the stress
# checkpoint (top-1 91.6%, KL 0.010; blocks of 32: 94.5%, 0.0068) and decode at 0.68x int8's time against 0.85x
# (Intel Xeon, `benchmarks/run.py --outliers --rounds 3`: 3.4 and 4.3 against 5.0 ms/token); with every block at 4
# bits only blocks of 32 came near them. benchmarks/quality_results.md has each variant's figures.
QUANT_BLOCK_INT4 = 128
QUANT_BITS = {"int8": 8, "int4": 4}  # export-gpt2 --quantize: the projections' bits
HEAD_BITS = (4, 8)  # int4 graphs: the lm_head's and token embedding's bits (--head-bits)
DEFAULT_HEAD_BITS = 8  # as llama.cpp keeps q4_0's output matrix at 6 bits; measured in benchmarks/quality_results.md
# int4 graphs: the blocks whose projections stay at 8 bits (--int8-layers), as llama.cpp's k-quant mixes give the
# first layers more bits. Measured on the stress checkpoint's sample text (GPT-2 small, GPTQ, blocks of 32), top-1
# agreement with fp32 / KL: every block at 4 bits 85.5% / 0.038; block 0 at 8 bits 94.5% / 0.0068 (its MLP alone
# 90.1%, its attention alone 88.7%); block 1 86.9%, block 11 85.8%; every block's c_attn at 8 bits 88.7%.
DEFAULT_INT8_LAYERS = (0,)
QUANT_BLOCKS = (32, 64, 128, 256)  # the block sizes export offers (MatMulNBits takes powers of two from 16)
# DynamicQuantizeMatMul's weights (--fast-prefill) in 7 bits, onnxruntime's "reduce_range": its uint8 x int8 kernel on
# AVX2 without VNNI adds pairs of products in 16 bits, which 255 * 127 * 2 overflows and 255 * 63 * 2 does not.
COLUMN_LEVELS = 63


def projection_bits(name: str, bits: int, int8_layers: Collection[int]) -> int:
    """The bits of a weight named as in the checkpoint: 8 for the projections of the blocks in int8_layers, else
    `bits`."""
    found = re.match(r"transformer\.h\.(\d+)\.", name)
    return 8 if found and int(found.group(1)) in int8_layers else bits


@dataclass(frozen=True)
class QuantizedWeight:
    """A matrix's MatMulNBits initializers: blocks, one scale per block, and (4 bits) one zero point per block."""

    data: str
    scales: str
    bits: int
    block_size: int
    zero_points: str | None = None


@dataclass(frozen=True)
class GPT2Spec:
    """The hyper-parameters of a GPT-2 checkpoint that shape its graph."""

    n_layer: int
    n_head: int
    n_embd: int
    n_inner: int  # the MLP's hidden width (4 * n_embd in OpenAI's GPT-2s); the projections take it from the weights
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


def head_block_size(bits: int, head_bits: int, block_size: int) -> int:
    """The block size of the lm_head and token embedding: the projections' when they have the same bits; an 8-bit
    head in a 4-bit graph takes int8's default blocks (finer ones cost time and add no precision there)."""
    return block_size if head_bits == bits else QUANT_BLOCK


class _Builder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(
        self,
        dtype: str,
        bits: int | None = None,
        block_size: int = QUANT_BLOCK,
        outliers: dict[str, list[int]] | None = None,
        head_bits: int | None = None,
        rounded: dict[str, BlockLevels] | None = None,
        int8_layers: Collection[int] = (),
    ) -> None:
        from onnx import TensorProto, helper, numpy_helper

        self.helper, self.numpy_helper, self.TensorProto = helper, numpy_helper, TensorProto
        self.bits = bits  # weights of the projections: None (float), 8 or 4 bits (MatMulNBits)
        self.head_bits = head_bits or bits  # the lm_head's and token embedding's
        self.head_block = head_block_size(bits, self.head_bits, block_size) if bits else block_size
        self.block_size = block_size
        self.outliers = outliers or {}  # weight name -> input channels multiplied in float (export/calibrate.py)
        self.rounded = rounded or {}  # weight name -> its levels, rounded by GPTQ (export/rounding.py)
        self.int8_layers = frozenset(int8_layers)  # blocks whose projections take 8 bits in a 4-bit graph
        self.int8_columns = False  # int8 projections as DynamicQuantizeMatMul (inside the prefill branch)
        self.np_dtype = NUMPY_DTYPES[dtype]
        self.onnx_dtype = TensorProto.FLOAT if dtype == "float32" else TensorProto.FLOAT16
        self.nodes: list = []
        self.initializers: list = []
        self._names: set[str] = set()
        self._count = 0

    def fresh(self, stem: str) -> str:
        self._count += 1
        return f"{stem}_{self._count}"

    def weight(self, name: str, array: np.ndarray) -> str:
        """An initializer of the main graph, registered once per name (If branches read it from there)."""
        if name not in self._names:
            self._names.add(name)
            self.initializers.append(self.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype=None) -> str:
        array = np.asarray(value, dtype=dtype or self.np_dtype)
        return self.weight(self.fresh("const"), array)

    def op(self, op_type: str, *inputs: str, outputs: list[str] | None = None, **attrs) -> str:
        outputs = outputs or [self.fresh(op_type.lower())]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outputs, name=self.fresh(op_type), **attrs))
        return outputs[0]

    @contextmanager
    def subgraph(self, int8_columns: bool) -> Iterator[list]:
        """Collect the nodes built inside the block into a list of their own (an If branch's body); initializers
        stay in the main graph (measured: onnxruntime keeps less memory than with weights inside the branches)."""
        outer, columns = self.nodes, self.int8_columns
        self.nodes, self.int8_columns = [], int8_columns
        try:
            yield self.nodes
        finally:
            self.nodes, self.int8_columns = outer, columns

    def quantized(self, name: str, matrix: np.ndarray, bits: int, block_size: int | None = None) -> QuantizedWeight:
        """matrix [out, in] as MatMulNBits initializers: blocks of block_size inputs (default the graph's), bits 8
        or 4 (export/rounding.py gives the grid); the levels given for this name (GPTQ's) if any, else every weight
        rounded to nearest. 4 bits take two values a byte, the first in the low nibble, and two zero points a byte."""
        grid = self.rounded.get(name) or round_to_nearest(matrix, bits, block_size or self.block_size)
        if grid.bits != bits:
            raise ExportError(f"{name}: its levels were rounded to {grid.bits} bits, and the graph stores {bits}")
        size = grid.block_size
        if bits == 8:
            return QuantizedWeight(
                self.weight(name + ".int8", grid.levels), self.weight(name + ".scales", grid.scales), bits, size
            )
        packed = grid.levels[:, :, 0::2] | (grid.levels[:, :, 1::2] << 4)
        zeros = np.pad(grid.zeros, ((0, 0), (0, grid.zeros.shape[1] % 2)))
        return QuantizedWeight(
            self.weight(name + ".int4", packed),
            self.weight(name + ".scales", grid.scales),
            bits,
            size,
            self.weight(name + ".zero_points", zeros[:, 0::2] | (zeros[:, 1::2] << 4)),
        )

    def project(self, x: str, name: str, weight: np.ndarray, bias: str | None = None) -> str:
        """x @ weight (+ bias) (weight [in, out]): MatMul (then Add), or MatMulNBits over quantised blocks with the
        bias inside it when building a quantised graph. A quantised projection with outlier input channels multiplies
        those in float, beside the int8 product of the others (LLM.int8()'s decomposition): they no longer set the
        scale of the activations around them."""
        if not self.bits:
            product = self.op("MatMul", x, self.weight(name, weight.astype(self.np_dtype)))
            return product if bias is None else self.op("Add", product, bias)
        channels = self.outliers.get(name)
        if channels:
            keep = np.ones(weight.shape[0], np.float32)
            keep[channels] = 0.0
            outlier_part = self.op(
                "MatMul",
                self.op("Gather", x, self.weight(name + ".outlier_channels", np.array(channels, np.int64)), axis=2),
                self.weight(name + ".outlier_rows", weight[channels].astype(np.float32)),
            )
            x, weight = self.op("Mul", x, self.weight(name + ".keep", keep)), weight * keep[:, None]
        if self.int8_columns:
            product = self.project_columns(x, name, weight, bias)
        else:
            bits = projection_bits(name, self.bits, self.int8_layers)
            product = self.project_blocks(x, self.quantized(name, weight.T, bits), *weight.shape, bias=bias)
        return self.op("Add", product, outlier_part) if channels else product

    def project_columns(self, x: str, name: str, weight: np.ndarray, bias: str | None) -> str:
        """DynamicQuantizeMatMul over weight [in, out] as int8 with one scale per output column (max|w| / 127).

        Measured against per-row activation scales on the stress checkpoint, with 8-bit weights (prompt steps, top-1
        agreement with fp32 on the sample text / first token after 512 tokens): this 92.4% / 0.62 s; MatMulInteger
        over int8 rows scaled per token 94.5% / 2.8 s (no fast int8 x int8 kernel); the same over uint8 rows 92.9% /
        0.74 s. The weights take 7 bits (COLUMN_LEVELS): with 8, a tiny model's prompt was off by 33% of its largest
        logit on an AVX2 CPU without VNNI; the stress checkpoint is unchanged by it (92.4%)."""
        scales = np.abs(weight).max(axis=0) / COLUMN_LEVELS
        scales[scales == 0] = 1.0
        data = np.clip(np.round(weight / scales), -COLUMN_LEVELS, COLUMN_LEVELS).astype(np.int8)
        return self.op(
            "DynamicQuantizeMatMul",
            x,
            self.weight(name + ".int8_columns", data),
            self.weight(name + ".column_scales", scales.astype(np.float32)),
            *(("", bias) if bias is not None else ()),
            domain=CONTRIB,
        )

    def project_blocks(
        self, x: str, weight: QuantizedWeight, inputs: int, outputs: int, bias: str | None = None
    ) -> str:
        zero_points = (weight.zero_points,) if weight.zero_points else ("",) if bias is not None else ()
        bias_inputs = ("", bias) if bias is not None else ()  # after the zero points and the g_idx it does not use
        return self.op(
            "MatMulNBits",
            x,
            weight.data,
            weight.scales,
            *zero_points,
            *bias_inputs,
            domain=CONTRIB,
            K=inputs,
            N=outputs,
            bits=weight.bits,
            block_size=weight.block_size,
            # int8 activations (quantised per block at run time): the fast VNNI/AVX2 kernels. Float activations
            # (level 0), one token, here: 4 bits in blocks of 32 about 4x slower (lm_head 7.3 vs 1.9 ms, c_fc 0.35
            # vs 0.09 ms), 8 bits 50-70x slower.
            accuracy_level=4,
        )


def _activation(b: _Builder, x: str, name: str) -> str:
    if name in TANH_GELUS:
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


def _layer_norm(b: _Builder, x: str, weight: str, bias: str, eps: float) -> str:
    return b.op("LayerNormalization", x, weight, bias, axis=-1, epsilon=eps)


def _attention_allowed(b: _Builder) -> str:
    """[batch, 1, S, T] bool: query i (at position P + i) may attend key j when j <= P + i and j is not padding."""
    from onnx import TensorProto

    int64 = np.int64
    # Lengths: S new tokens, P past tokens, T = P + S keys.
    past_len = b.op("Shape", bundle.past_key_name(0), start=2, end=3)
    seq_len = b.op("Shape", bundle.INPUT_IDS, start=1, end=2)
    total_len = b.op("Shape", bundle.ATTENTION_MASK, start=1, end=2)
    zero, one, scalar_axes = b.const(0, int64), b.const(1, int64), b.const([0], int64)
    past_scalar = b.op("Squeeze", past_len, scalar_axes)
    query_pos = b.op("Range", past_scalar, b.op("Add", past_scalar, b.op("Squeeze", seq_len, scalar_axes)), one)
    key_pos = b.op("Range", zero, b.op("Squeeze", total_len, scalar_axes), one)
    causal = b.op(
        "LessOrEqual",
        b.op("Unsqueeze", key_pos, b.const([0], int64)),
        b.op("Unsqueeze", query_pos, b.const([1], int64)),
    )
    padding = b.op("Unsqueeze", b.op("Cast", bundle.ATTENTION_MASK, to=TensorProto.BOOL), b.const([1, 2], int64))
    return b.op("And", padding, causal)


Attend = Callable[[str, int, list[str]], str]  # (packed QKV with its bias, layer, present names) -> context


def _plain_attention(b: _Builder, spec: GPT2Spec) -> Attend:
    """Attention in standard ONNX ops: Concat for past + new, and a boolean causal + padding mask before Softmax."""
    allowed = _attention_allowed(b)
    int64 = np.int64
    H, D, E = spec.n_head, spec.head_dim, spec.n_embd
    masked_value = b.const(np.finfo(b.np_dtype).min)
    heads_shape = b.const([0, 0, H, D], int64)
    merged_shape = b.const([0, 0, E], int64)
    split_sizes = b.const([E, E, E], int64)

    def attend(qkv: str, layer: int, presents: list[str]) -> str:
        q, k, v = (b.fresh(n) for n in "qkv")
        b.op("Split", qkv, split_sizes, outputs=[q, k, v], axis=2)
        q, k, v = (b.op("Transpose", b.op("Reshape", t, heads_shape), perm=[0, 2, 1, 3]) for t in (q, k, v))
        key = b.op("Concat", bundle.past_key_name(layer), k, outputs=[presents[0]], axis=2)
        value = b.op("Concat", bundle.past_value_name(layer), v, outputs=[presents[1]], axis=2)
        scores = b.op(
            "Mul", b.op("MatMul", q, b.op("Transpose", key, perm=[0, 1, 3, 2])), b.const(spec.attention_scale(layer))
        )
        probs = b.op("Softmax", b.op("Where", allowed, scores, masked_value), axis=-1)
        return b.op("Reshape", b.op("Transpose", b.op("MatMul", probs, value), perm=[0, 2, 1, 3]), merged_shape)

    return attend


def _fused_activation(b: _Builder, x: str, bias: str | None, name: str) -> str:
    """The MLP activation, with its preceding bias folded in (FastGelu / BiasGelu) unless already added (None)."""
    if name in TANH_GELUS:
        return b.op("FastGelu", x, *([bias] if bias else []), domain=CONTRIB)
    if name == "gelu":
        return b.op("BiasGelu", x, bias, domain=CONTRIB) if bias else b.op("Gelu", x, domain=CONTRIB)
    return _activation(b, b.op("Add", x, bias) if bias else x, name)


def _growing_attention(b: _Builder, spec: GPT2Spec) -> Attend:
    """MultiHeadAttention with past in, past + new out; masking inside the op: causal (unidirectional, past
    included) and padding keys from the [batch, T] mask, faster on CPU than an additive [batch, 1, S, T] bias."""
    E = spec.n_embd
    key_padding_mask = b.op("Cast", bundle.ATTENTION_MASK, to=b.TensorProto.INT32)
    split_sizes = b.const([E, E, E], np.int64)

    def attend(qkv: str, layer: int, presents: list[str]) -> str:
        q, k, v = (b.fresh(n) for n in "qkv")
        b.op("Split", qkv, split_sizes, outputs=[q, k, v], axis=2)
        context = b.fresh("context")
        b.op(
            "MultiHeadAttention",
            q,
            k,
            v,
            "",
            key_padding_mask,
            "",
            bundle.past_key_name(layer),
            bundle.past_value_name(layer),
            outputs=[context, *presents],
            domain=CONTRIB,
            num_heads=spec.n_head,
            scale=spec.attention_scale(layer),
            unidirectional=1,
        )
        return context

    return attend


def _preallocated_attention(b: _Builder, spec: GPT2Spec) -> Attend:
    """GroupQueryAttention over the packed QKV (GPT-2's [q | k | v] layout is the op's), writing the new key/values
    into the past buffer in place. A row holds its keys up to its attention mask's last 1 (seqlens_k, per row): T - 1
    for left-padded rows, fewer for a row whose mask ends in zeros (rows of different lengths in one decode batch,
    each written at its own next position, as if alone). Padding keys get the dtype's lowest value as an additive
    bias (finite, so that a padding query, which sees only padding, averages them instead of producing NaN)."""
    from onnx import TensorProto

    int64 = np.int64
    total = b.op("Shape", bundle.ATTENTION_MASK, start=1, end=2)
    total_length = b.op("Cast", b.op("Squeeze", total, b.const([0], int64)), to=TensorProto.INT32)
    batch = b.op("Shape", bundle.ATTENTION_MASK, start=0, end=1)
    columns = b.op("Range", b.const(0, int64), b.op("Squeeze", total, b.const([0], int64)), b.const(1, int64))
    last_one = b.op("ReduceMax", b.op("Mul", bundle.ATTENTION_MASK, columns), axes=[1], keepdims=0)
    seqlens_k = b.op("Cast", last_one, to=TensorProto.INT32)
    padding = b.op("Sub", b.const(1.0), b.op("Cast", bundle.ATTENTION_MASK, to=b.onnx_dtype))
    key_bias = b.op("Mul", padding, b.const(np.finfo(b.np_dtype).min))
    queries = b.op("Shape", bundle.INPUT_IDS, start=1, end=2)
    bias_shape = b.op("Concat", batch, b.const([1], int64), queries, total, axis=0)
    attention_bias = b.op("Expand", b.op("Unsqueeze", key_bias, b.const([1, 2], int64)), bias_shape)

    def attend(qkv: str, layer: int, presents: list[str]) -> str:
        context = b.fresh("context")
        b.op(
            "GroupQueryAttention",
            qkv,
            "",
            "",
            bundle.past_key_name(layer),
            bundle.past_value_name(layer),
            seqlens_k,
            total_length,
            "",
            "",
            "",
            attention_bias,
            outputs=[context, *presents],
            domain=CONTRIB,
            num_heads=spec.n_head,
            kv_num_heads=spec.n_head,
            scale=spec.attention_scale(layer),
        )
        return context

    return attend


def _residual_layer_norm(b: _Builder, x: str, residual: str, weight: str, bias: str, eps: float) -> tuple[str, str]:
    """LayerNorm(x + residual): returns (normed, the new residual sum)."""
    total = b.op("Add", x, residual)
    return _layer_norm(b, total, weight, bias, eps), total


def _blocks(
    b: _Builder,
    spec: GPT2Spec,
    weights: dict[str, np.ndarray],
    w: Callable[[str], str],
    hidden: str,
    attend: Attend,
    fused: bool,
    present_suffix: str = "",
) -> str:
    """The transformer blocks, attention by `attend`; projections through b.project (float, or int8 with every bias
    inside MatMulNBits). fused: the MLP activation is onnxruntime's FastGelu / BiasGelu, which takes the fc bias
    unless the int8 projection holds it. Returns the final layer norm's output; the present key/values get the
    graph outputs' names plus present_suffix (inside an If branch, whose outputs the If renames)."""
    eps = spec.layer_norm_epsilon
    bias_in_activation = fused and not b.bits
    normed = _layer_norm(b, hidden, w("transformer.h.0.ln_1.weight"), w("transformer.h.0.ln_1.bias"), eps)
    residual = hidden
    for layer in range(spec.n_layer):
        p = f"transformer.h.{layer}."
        qkv = b.project(normed, p + "attn.c_attn.weight", weights[p + "attn.c_attn.weight"], w(p + "attn.c_attn.bias"))
        presents = [bundle.present_key_name(layer) + present_suffix, bundle.present_value_name(layer) + present_suffix]
        context = attend(qkv, layer, presents)
        attention = b.project(
            context, p + "attn.c_proj.weight", weights[p + "attn.c_proj.weight"], w(p + "attn.c_proj.bias")
        )
        normed, residual = _residual_layer_norm(b, attention, residual, w(p + "ln_2.weight"), w(p + "ln_2.bias"), eps)
        fc_bias = w(p + "mlp.c_fc.bias")
        fc = b.project(
            normed, p + "mlp.c_fc.weight", weights[p + "mlp.c_fc.weight"], None if bias_in_activation else fc_bias
        )
        if fused:
            inner = _fused_activation(b, fc, fc_bias if bias_in_activation else None, spec.activation)
        else:
            inner = _activation(b, fc, spec.activation)
        mlp = b.project(inner, p + "mlp.c_proj.weight", weights[p + "mlp.c_proj.weight"], w(p + "mlp.c_proj.bias"))
        following = f"transformer.h.{layer + 1}.ln_1." if layer + 1 < spec.n_layer else "transformer.ln_f."
        normed, residual = _residual_layer_norm(b, mlp, residual, w(following + "weight"), w(following + "bias"), eps)
    return normed


def _blocks_by_step_length(b: _Builder, spec: GPT2Spec, blocks: Callable[[str], str]) -> str:
    """If the step has more than one new token (a prompt): the blocks over DynamicQuantizeMatMul; else (decoding)
    over MatMulNBits. blocks(present_suffix) builds them (see _blocks). Returns the final layer norm's output; the If
    writes the present key/values."""
    seq_len = b.op("Squeeze", b.op("Shape", bundle.INPUT_IDS, start=1, end=2), b.const([0], np.int64))
    is_prompt = b.op("Greater", seq_len, b.const(1, np.int64))
    presents = bundle.io_names(spec.n_layer)[1][1:]  # present.{i}.key, present.{i}.value, ...
    branches = {}
    for label, columns in (("prompt", True), ("step", False)):
        suffix = f".{label}"
        with b.subgraph(int8_columns=columns) as nodes:
            normed = blocks(suffix)
        outputs = [normed, *(name + suffix for name in presents)]
        value_infos = [b.helper.make_tensor_value_info(name, b.onnx_dtype, None) for name in outputs]
        branches[label] = b.helper.make_graph(nodes, f"blocks_{label}", [], value_infos)
    normed = b.fresh("normed")
    b.op("If", is_prompt, outputs=[normed, *presents], then_branch=branches["prompt"], else_branch=branches["step"])
    return normed


def _nibbles(b: _Builder, packed: str) -> str:
    """uint8 [..., n] -> float [..., n, 2]: each byte's low four bits, then its high four (opset 17 has no bitwise
    and: integer Mod and Div by 16)."""
    as_int = b.op("Cast", packed, to=b.TensorProto.INT32)
    sixteen, last = b.const(16, np.int32), b.const([-1], np.int64)
    low = b.op("Unsqueeze", b.op("Mod", as_int, sixteen), last)
    high = b.op("Unsqueeze", b.op("Div", as_int, sixteen), last)
    return b.op("Cast", b.op("Concat", low, high, axis=-1), to=b.onnx_dtype)


def _dequantized_rows(b: _Builder, table: QuantizedWeight, ids: str, width: int) -> str:
    """Rows `ids` of a quantised table, in float: (level - zero point) * the scale of each block, blocks laid end to
    end, the padding cut off. 4-bit levels are unpacked from their nibbles (low first)."""
    int64 = np.int64
    rows = b.op("Gather", table.data, ids)  # [batch, seq, blocks, bytes per block]
    scales = b.op("Unsqueeze", b.op("Gather", table.scales, ids), b.const([-1], int64))
    if table.bits == 8:
        levels = b.op("Sub", b.op("Cast", rows, to=b.onnx_dtype), b.const(float(ZERO_8BIT)))
    else:
        unpacked = b.op("Reshape", _nibbles(b, rows), b.const([0, 0, 0, -1], int64))  # [batch, seq, blocks, size]
        zeros = b.op("Reshape", _nibbles(b, b.op("Gather", table.zero_points, ids)), b.const([0, 0, -1], int64))
        blocks = b.op("Shape", scales, start=2, end=3)
        zeros = b.op("Slice", zeros, b.const([0], int64), blocks, b.const([2], int64))  # an odd count's padding off
        levels = b.op("Sub", unpacked, b.op("Unsqueeze", zeros, b.const([-1], int64)))
    flat = b.op("Reshape", b.op("Mul", levels, scales), b.const([0, 0, -1], int64))
    return b.op("Slice", flat, b.const([0], int64), b.const([width], int64), b.const([2], int64))


def _embedding_and_head(
    b: _Builder, spec: GPT2Spec, weights: dict[str, np.ndarray]
) -> tuple[str, Callable[[str], str]]:
    """The token embeddings of input_ids, and a function from hidden states to logits (before the float32 cast)."""
    wte = weights["transformer.wte.weight"]
    head = wte if spec.tied_embeddings else weights["lm_head.weight"]
    V, E = head.shape
    if b.bits:
        head_name = "lm_head" if not spec.tied_embeddings else "transformer.wte"
        head_weight = b.quantized(head_name, head, b.head_bits, b.head_block)
        table = head_weight if spec.tied_embeddings else b.quantized("transformer.wte", wte, b.head_bits, b.head_block)
        embedded = _dequantized_rows(b, table, bundle.INPUT_IDS, E)
        return embedded, lambda hidden: b.project_blocks(hidden, head_weight, E, V)
    head_t = b.weight(
        "lm_head.weight.T" if not spec.tied_embeddings else "transformer.wte.weight.T", head.T.astype(b.np_dtype)
    )
    if spec.tied_embeddings:
        # [n_embd, vocab] serves both: MatMul (fast, prepacked) for the logits, Gather along axis 1 for the input.
        embedded = b.op("Transpose", b.op("Gather", head_t, bundle.INPUT_IDS, axis=1), perm=[1, 2, 0])
    else:
        embedded = b.op("Gather", b.weight("transformer.wte.weight", wte.astype(b.np_dtype)), bundle.INPUT_IDS)
    return embedded, lambda hidden: b.op("MatMul", hidden, head_t)


def build_graph(
    spec: GPT2Spec,
    weights: dict[str, np.ndarray],
    dtype: str = "float32",
    *,
    fused: bool = False,
    bits: int | None = None,
    head_bits: int | None = None,
    fast_prefill: bool = False,
    kv_cache: str = "growing",
    block_size: int = QUANT_BLOCK,
    outliers: dict[str, list[int]] | None = None,
    rounded: dict[str, BlockLevels] | None = None,
    int8_layers: Collection[int] = (),
):
    """Return the onnx.ModelProto of a GPT-2 with the given transformers-style state dict (numpy arrays).

    fused: build the blocks from onnxruntime contrib ops (faster; needs onnxruntime) instead of standard ONNX ops.
    kv_cache: "growing" (present = past + the new positions) or "preallocated" (fused only: past and present are one
    buffer of fixed capacity, updated in place by GroupQueryAttention).
    bits: 8 or 4-bit weights (MatMulNBits) for every projection and the embedding, one scale per block_size inputs;
    needs fused and float32. head_bits: the lm_head's and embedding's, when not `bits`.
    fast_prefill: with 8 bits, the blocks a second time over DynamicQuantizeMatMul for steps of several tokens.
    outliers: with bits, weight name -> input channels that the projection multiplies in float (export/calibrate.py).
    rounded: with bits, weight name -> the levels of its matrix [out, in] (outlier channels zeroed), rounded by GPTQ
    (export/rounding.py); the other weights are rounded to nearest. int8_layers: with 4 bits, the blocks whose
    projections take 8 bits.
    The exporter checks these combinations (exporter.check_graph_options) and the activation (checkpoint loading).
    """
    from onnx import TensorProto, helper

    b = _Builder(
        dtype,
        bits=bits,
        block_size=block_size,
        outliers=outliers,
        head_bits=head_bits,
        rounded=rounded,
        int8_layers=int8_layers,
    )
    H, D = spec.n_head, spec.head_dim

    def w(name: str) -> str:
        return b.weight(name, weights[name].astype(b.np_dtype))

    int64 = np.int64
    embedded, project_to_vocabulary = _embedding_and_head(b, spec, weights)
    hidden = b.op("Add", embedded, b.op("Gather", w("transformer.wpe.weight"), bundle.POSITION_IDS))
    preallocated = kv_cache == "preallocated"
    # The attention's mask inputs are built here, once, outside any If branch.
    if not fused:
        attend = _plain_attention(b, spec)
    else:
        attend = _preallocated_attention(b, spec) if preallocated else _growing_attention(b, spec)

    def blocks(present_suffix: str = "") -> str:
        return _blocks(b, spec, weights, w, hidden, attend, fused, present_suffix)

    hidden = _blocks_by_step_length(b, spec, blocks) if fast_prefill else blocks()
    # Keep only the last `logits_to_keep` positions (0 keeps all) before the vocabulary projection.
    start = b.op("Unsqueeze", b.op("Neg", bundle.LOGITS_TO_KEEP), b.const([0], int64))
    kept = b.op("Slice", hidden, start, b.const([np.iinfo(np.int64).max], int64), b.const([1], int64))
    logits = project_to_vocabulary(kept)
    if dtype == "float32":
        b.op("Identity", logits, outputs=[bundle.LOGITS])
    else:
        b.op("Cast", logits, outputs=[bundle.LOGITS], to=TensorProto.FLOAT)

    kv_shape = ["batch", H, "capacity" if preallocated else "past_sequence", D]
    present_shape = ["batch", H, "capacity" if preallocated else "total_sequence", D]
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
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(CONTRIB, 1)] if fused else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="gpt2onnx")
    model.ir_version = 8
    return model
