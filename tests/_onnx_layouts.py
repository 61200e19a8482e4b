"""The GPT-2 ONNX layouts made elsewhere, built in the test run from an optimum export (tests/test_onnx_folders.py).

- optimum_export: optimum-cli's text-generation-with-past export, run in optimum-onnx's own environment (it pins
  transformers < 4.58): GPT2ONNX_OPTIMUM_PYTHON names that environment's python (.ci/run builds .venv-optimum).
- without_position_ids: the graph of optimum's --legacy exports and of older transformers.js repositories, which
  number positions by column (transformers without position_ids): position_ids becomes Range(past, past + new).
- merged: a merged decoder as optimum used to write it, an If on a bool use_cache_branch [1] between the graph with
  past and a copy whose past is cut to length 0 (so feeding the wrong flag changes the answer).
- transformers_js: the repository layout, graphs under onnx/, with model_quantized.onnx quantised by onnxruntime's
  dynamic quantiser as transformers.js's scripts/quantize.py does it, and model_fp16.onnx converted by
  onnxconverter-common's float16 converter (float16 weights, inputs, outputs and past).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import onnx
from onnx import TensorProto, helper

SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json")
SIDE_FILES += ("merges.txt",)


def optimum_python() -> str | None:
    python = os.environ.get("GPT2ONNX_OPTIMUM_PYTHON")
    return python if python and Path(python).is_file() else None


def optimum_export(checkpoint: Path, output: Path) -> Path:
    """optimum-cli export onnx --task text-generation-with-past of a checkpoint folder."""
    cli = Path(optimum_python()).parent / "optimum-cli"
    command = [str(cli), "export", "onnx", "--model", str(checkpoint), "--task", "text-generation-with-past"]
    done = subprocess.run([*command, str(output)], capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"optimum-cli failed: {done.stderr.strip().splitlines()[-1:]}")
    return output


def copy_side_files(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def without_position_ids(graph: Path, output: Path) -> Path:
    """The graph with its position_ids input replaced by Range(past, past + new) over every row."""
    model = onnx.load(str(graph))
    body = model.graph
    kept = [value for value in body.input if value.name != "position_ids"]
    del body.input[:]
    body.input.extend(kept)
    one = helper.make_tensor("positions/one", TensorProto.INT64, [], [1])
    two = helper.make_tensor("positions/axis", TensorProto.INT64, [], [2])
    first = helper.make_tensor("positions/first", TensorProto.INT64, [], [1])
    zero = helper.make_tensor("positions/zero", TensorProto.INT64, [1], [0])
    body.initializer.extend([one, two, first, zero])
    nodes = [
        helper.make_node("Shape", ["past_key_values.0.key"], ["positions/past_shape"]),
        helper.make_node("Gather", ["positions/past_shape", "positions/axis"], ["positions/past"]),
        helper.make_node("Shape", ["input_ids"], ["positions/ids_shape"]),
        helper.make_node("Gather", ["positions/ids_shape", "positions/first"], ["positions/new"]),
        helper.make_node("Add", ["positions/past", "positions/new"], ["positions/end"]),
        helper.make_node("Range", ["positions/past", "positions/end", "positions/one"], ["positions/range"]),
        helper.make_node("Unsqueeze", ["positions/range", "positions/zero"], ["positions/row"]),
        helper.make_node("Expand", ["positions/row", "positions/ids_shape"], ["position_ids"]),
    ]
    for index, node in enumerate(nodes):
        body.node.insert(index, node)
    onnx.save(model, str(output))
    return output


def _renamed_copy(body: onnx.GraphProto, prefix: str, outer: set[str], past_cut: bool) -> onnx.GraphProto:
    """The nodes of `body` as a subgraph: values it makes renamed with `prefix`, outer values read as they are
    (graph inputs and initializers), the past cut to 0 positions when `past_cut`."""
    nodes, renamed = [], {}
    if past_cut:
        for value in body.input:
            if value.name.startswith("past_key_values"):
                cut = f"{prefix}{value.name}"
                nodes.append(
                    helper.make_node(
                        "Slice",
                        [value.name, "merge/zero", "merge/zero", "merge/axis"],
                        [cut],
                        name=f"{prefix}cut/{value.name}",
                    )
                )
                renamed[value.name] = cut
    for index, node in enumerate(body.node):
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{prefix}{node.name or index}"
        for position, name in enumerate(copy.input):
            if name in renamed:
                copy.input[position] = renamed[name]
            elif name and name not in outer:
                copy.input[position] = f"{prefix}{name}"
        for position, name in enumerate(copy.output):
            copy.output[position] = renamed.setdefault(name, f"{prefix}{name}")
        nodes.append(copy)
    outputs = []
    for value in body.output:
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(value)
        copy.name = renamed[value.name]
        outputs.append(copy)
    return helper.make_graph(nodes, f"{prefix}branch", [], outputs)


def merged(graph: Path, output: Path) -> Path:
    """A merged decoder: If(use_cache_branch, the graph with past, the graph with its past cut to 0 positions)."""
    model = onnx.load(str(graph))
    body = model.graph
    outer = {value.name for value in body.input} | {tensor.name for tensor in body.initializer}
    outer |= {"merge/zero", "merge/axis"}
    with_past = _renamed_copy(body, "with_past/", outer, past_cut=False)
    no_past = _renamed_copy(body, "no_past/", outer, past_cut=True)
    branch = helper.make_node(
        "If",
        ["use_cache_branch"],
        [value.name for value in body.output],
        then_branch=with_past,
        else_branch=no_past,
        name="use_cache_branch/if",
    )
    flag = helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])
    constants = [
        helper.make_tensor("merge/zero", TensorProto.INT64, [1], [0]),
        helper.make_tensor("merge/axis", TensorProto.INT64, [1], [2]),
    ]
    merged_graph = helper.make_graph(
        [branch], "merged_decoder", [*body.input, flag], list(body.output), [*body.initializer, *constants]
    )
    merged_model = helper.make_model(merged_graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    onnx.save(merged_model, str(output))
    return output


def float16_graph(graph: Path, output: Path) -> Path:
    """The graph in float16 throughout, its past and logits included (keep_io_types=False, as transformers.js's
    fp16 graphs are); the converter leaves Cast nodes casting to float32, which are turned to float16 too."""
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(graph)), keep_io_types=False)
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.FLOAT16
    onnx.save(model, str(output))
    return output


def transformers_js(export: Path, output: Path) -> Path:
    """The transformers.js layout of an optimum export: side files on top; onnx/model.onnx,
    onnx/model_quantized.onnx (dynamic uint8 weights), onnx/model_fp16.onnx and onnx/decoder_model_merged.onnx
    without position_ids."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    copy_side_files(export, output)
    graphs = output / "onnx"
    graphs.mkdir()
    shutil.copy2(export / "model.onnx", graphs / "model.onnx")
    quantize_dynamic(
        str(graphs / "model.onnx"),
        str(graphs / "model_quantized.onnx"),
        weight_type=QuantType.QUInt8,
        extra_options={"EnableSubgraph": True},
    )
    with warnings.catch_warnings():  # the converter warns of every weight it rounds
        warnings.simplefilter("ignore")
        float16_graph(export / "model.onnx", graphs / "model_fp16.onnx")
    legacy = without_position_ids(export / "model.onnx", output / "legacy.onnx")
    merged(legacy, graphs / "decoder_model_merged.onnx")
    legacy.unlink()
    return output
