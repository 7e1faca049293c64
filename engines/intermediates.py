"""Intermediate tensors of an ONNX file by name, as an engine computes them: where an engine parts ways with the
model it was exported from is then a comparison per tensor, not a guess (repq doctor's engine table)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from repq.errors import RepqError


def prefix(graph_model, name: str):
    """The part of the graph that computes tensor ``name``, with ``name`` as its only output."""
    import onnx
    from onnx import TensorProto, helper

    producer = {o: n for n in graph_model.graph.node for o in n.output}
    if name not in producer:
        raise RepqError(f"the ONNX graph has no tensor {name!r}: name tensors a node of the graph produces")
    needed, stack = set(), [name]  # the first output of every node the tensor depends on
    while stack:
        node = producer.get(stack.pop())
        if node is not None and node.output[0] not in needed:
            needed.add(node.output[0])
            stack.extend(node.input)
    copy = onnx.ModelProto()
    copy.CopyFrom(graph_model)
    kept = [n for n in copy.graph.node if n.output[0] in needed]
    del copy.graph.node[:]
    copy.graph.node.extend(kept)
    del copy.graph.output[:]
    copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    used = {i for n in kept for i in n.input}
    inits = [t for t in copy.graph.initializer if t.name in used]
    del copy.graph.initializer[:]
    copy.graph.initializer.extend(inits)
    return copy


def _session(graph_model, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or os.cpu_count() or 1)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_intermediates(onnx_file: str | os.PathLike, images: np.ndarray, names: Sequence[str],
                      threads: int | None = None) -> dict[str, np.ndarray]:
    """The tensors ``names`` of the file run by ONNX Runtime's CPU engine (all optimizations) on ``images``, each
    read as the output of its own prefix of the graph (one session per tensor): everything before it is fused as
    the engine fuses it. Exposing the tensors as extra outputs of the whole graph is not faithful: a fusion that
    consumes one is then made differently (a RepVGG stem conv's output read so was 4.5e-5 off its float value,
    read from its prefix 1e-7), and OpenVINO even computed the next conv as zeros."""
    import onnx

    path = Path(onnx_file)
    if not path.is_file():
        raise RepqError(f"ONNX file {path} does not exist: export the model first")
    graph_model = onnx.load(str(path))
    images = np.ascontiguousarray(images, dtype=np.float32)
    values = {}
    for name in names:
        session = _session(prefix(graph_model, name), threads)
        values[name] = session.run([name], {session.get_inputs()[0].name: images})[0]
    return values


def layer_outputs(graph_model, layers: Sequence[str]) -> dict[str, str]:
    """The output tensor of each layer's Conv/Gemm in an exported file (float or QDQ, either placement), found
    by its weight: the initializer ``<layer>.weight``, read directly or through its Q/DQ nodes."""
    producer = {o: n for n in graph_model.graph.node for o in n.output}
    found = {}
    for node in graph_model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        source = node.input[1]
        while source in producer and producer[source].op_type in ("DequantizeLinear", "QuantizeLinear"):
            source = producer[source].input[0]
        for layer in layers:
            if source == f"{layer}.weight" or source.startswith(f"{layer}.weight_"):
                found[layer] = node.output[0]
    return found


def run_intermediates_openvino(onnx_file: str | os.PathLike, images: np.ndarray, names: Sequence[str]
                               ) -> dict[str, np.ndarray]:
    """The tensors ``names`` of the file compiled by OpenVINO for the CPU (float32 precision hint: its INT8
    kernels run where the file has Q/DQ, as TensorRT's do) on ``images``, each from its own prefix of the graph
    (see ``run_intermediates``: with a conv output exposed beside the graph's own output, OpenVINO 2026.4
    computed the next conv as zeros here)."""
    import onnx

    from repq.engines.openvino import _openvino

    ov = _openvino()
    path = Path(onnx_file)
    if not path.is_file():
        raise RepqError(f"ONNX file {path} does not exist: export the model first")
    graph_model = onnx.load(str(path))
    images = np.ascontiguousarray(images, dtype=np.float32)
    core = ov.Core()
    values = {}
    for name in names:
        model = core.read_model(prefix(graph_model, name).SerializeToString(), b"")
        compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        values[name] = np.asarray(compiled({0: images})[0])
    return values
