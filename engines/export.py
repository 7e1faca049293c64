"""QDQ ONNX export, one Q/DQ placement per engine (see `engines.targets`).

The model is exported in float and Q/DQ pairs are then inserted from each layer's calibrated ranges
(`LayerQuant`: input amax, per-channel weight amax, optional output amax; scale = amax / 127, zero point 0).
Ranges come from ModelOpt TensorQuantizers (`repq.quant.toolkit`) or from an explicit
`specs={conv_name: LayerQuant(...)}` -- so a model quantized outside ModelOpt (RepQ's learned steps,
already-quantized weights) exports through the same code.

Placements
- ``tensorrt`` (explicit quantization): Q/DQ on every quantized Conv/Gemm input (int8) and weight (float
  initializer -> Q -> DQ, per channel, axis 0), plus a Q/DQ on the residual input of an Add so TensorRT can
  fuse the Add into the conv. Nothing else: the graph computes exactly what the fake-quant PyTorch model does
  (apart from that residual rounding, which the PyTorch model does not simulate).
- ``onnxruntime``: ORT's CPU EP turns DQ -> Conv -> Q into QLinearConv only when the conv *output* is
  quantized too; with TensorRT's placement it runs DQ + float Conv and is slower than FP32. So this
  placement quantizes every conv/Add output as well (reusing the consumer's calibrated range where one
  exists, the conv's recorded output range otherwise), stores int8 weights and int32 biases, and lets every
  consumer of a quantized tensor read the DQ output, which lets ORT fuse QLinearConv, QGemm and QLinearAdd.
  A tensor produced by ReLU is quantized as uint8 with zero point 0 and the same scale amax/127: for a
  non-negative tensor that is the same grid as TensorRT's int8 (which only ever uses its codes 0..127 there),
  so it carries the same information, and ORT then drops the ReLU into the QLinearConv (its ReluQuantFusion
  needs a zero point at the type's minimum). An integer Clip to codes 0..127 between that Q and its DQ keeps
  int8's saturation at amax (without it values above amax would run to 255 steps, which the fake-quant model
  never saw); ORT still fuses QLinearConv around it.
  A signed tensor is stored as uint8 with zero point 128 (codes 0..255), and a layer reading one gets its int8
  weights as uint8 with zero point 128 too: the same values, run by ORT's U8U8 kernels. Its U8S8 kernels
  without VNNI (AVX2) add pairs of uint8 x int8 products in int16, which saturates above 32767 for codes over
  128 (README, "Measurements behind the defaults"). Codes 0..127 (post-ReLU) cannot
  saturate, so those layers keep the faster U8S8 kernels.
  Symmetric int8 activations are TensorRT's constraint, not ORT's, so this is legitimate for the ORT file
  only.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from repq.engines.targets import get_target
from repq.errors import RepqError
from repq.reparam.io import atomic_write_bytes

MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear gained `axis` (per-channel) in opset 13
DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
QUANTIZED_OPS = ("Conv", "Gemm")
# Ops whose output is non-negative when their (first) input is.
SIGN_PRESERVING = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape")


@dataclass(frozen=True)
class LayerQuant:
    """Symmetric-int8 ranges of one Conv2d/Linear: scale = amax / 127, zero point 0."""

    input_amax: float | None
    weight_amax: np.ndarray | None  # one value per output channel (axis 0)
    output_amax: float | None = None


def _amax_of(quantizer, enabled_only: bool = True):
    if quantizer is None or (enabled_only and not quantizer.is_enabled):
        return None
    amax = getattr(quantizer, "_amax", None)
    return None if amax is None else amax.detach().float().cpu()


def layer_quant_specs(model: nn.Module) -> dict[str, LayerQuant]:
    """Ranges of each ModelOpt-quantized Conv2d/Linear of `model` by module name."""
    specs: dict[str, LayerQuant] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or not hasattr(module, "weight_quantizer"):
            continue
        inp = _amax_of(module.input_quantizer)
        weight = _amax_of(module.weight_quantizer)
        out = _amax_of(getattr(module, "output_quantizer", None), enabled_only=False)
        if inp is None and weight is None:
            continue
        if weight is not None:
            weight = weight.reshape(-1).expand(module.weight.shape[0]).numpy().copy()
        specs[name] = LayerQuant(
            None if inp is None else float(inp.reshape(-1)[0]),
            weight,
            None if out is None else float(out.max()),
        )
    return specs


def float_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every ModelOpt quantizer disabled: the float graph Q/DQ is inserted into."""
    plain = copy.deepcopy(model).eval().cpu()
    for module in plain.modules():
        if type(module).__name__ == "TensorQuantizer":
            module.disable()
    return plain


def export_onnx(
    model: nn.Module,
    path: str | Path,
    target: str = "tensorrt",
    input_shape: Sequence[int] = (1, 3, 224, 224),
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    dynamic_size: bool = False,
    specs: dict[str, LayerQuant] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the QDQ ONNX file of a fake-quantized `model` for `target`'s placement; returns the path.
    `metadata` goes into the file's metadata_props (repq records its data there: `repq.data`).

    `dynamic_size` leaves height and width free (super-resolution models run on whole images of any size)."""
    import onnx

    placement = get_target(target).placement
    if opset < MIN_OPSET:
        raise RepqError(f"ONNX opset {opset} is too old for per-channel Q/DQ (QuantizeLinear's axis needs "
                        f"opset >= {MIN_OPSET}): export with opset {MIN_OPSET} or newer "
                        f"({DEFAULT_OPSET} is the default)")
    specs = layer_quant_specs(model) if specs is None else specs
    if not specs:
        raise RepqError("the model has no calibrated quantizers: run quant.toolkit.quantize (or pass specs=) "
                        "before exporting a QDQ file")
    plain = float_copy(model)
    graph_model = None
    for fold in (True, False):  # constant folding renames weights folded with a BN (unfused models): retry
        graph_model = export_float(plain, input_shape, opset, dynamic_batch, fold, dynamic_size)
        nodes = find_layer_nodes(graph_model, specs)
        if len(nodes) == len(specs):
            break
    missing = sorted(set(specs) - set(nodes))
    if missing:
        raise RepqError(f"quantized layers {missing[:3]} have no Conv/Gemm with their weight in the ONNX "
                        "graph: "
                        "export a model whose quantized layers are plain nn.Conv2d/nn.Linear")
    editor = QDQEditor(graph_model)
    if placement == "tensorrt":
        editor.place_tensorrt(nodes, specs)
    else:
        editor.place_onnxruntime(nodes, specs)
    editor.finish()
    graph_model.metadata_props.add(key="repq.placement", value=placement)
    graph_model.metadata_props.add(key="repq.target", value=target)
    for key, value in (metadata or {}).items():
        graph_model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(graph_model)
    return atomic_write_bytes(path, graph_model.SerializeToString())


def export_fp32(model: nn.Module, path: str | Path, input_shape: Sequence[int], *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = False, dynamic_size: bool = False,
                metadata: dict[str, str] | None = None) -> Path:
    """Write the float ONNX file of `model` (the engines' FP32 reference) with repq's metadata."""
    graph_model = export_float(model, input_shape, opset, dynamic_batch, dynamic_size=dynamic_size)
    graph_model.metadata_props.add(key="repq.placement", value="float")
    for key, value in (metadata or {}).items():
        graph_model.metadata_props.add(key=key, value=value)
    return atomic_write_bytes(path, graph_model.SerializeToString())


def export_float(model: nn.Module, input_shape, opset: int, dynamic_batch: bool, fold: bool = True,
                 dynamic_size: bool = False):
    """The float ONNX graph of `model` (TorchScript exporter: ModelOpt's modules need dynamo=False)."""
    import onnx

    buffer = io.BytesIO()
    dummy = torch.zeros(*input_shape)
    free = ({0: "batch"} if dynamic_batch else {}) | ({2: "height", 3: "width"} if dynamic_size else {})
    out_free = {k: f"out_{v}" if k > 1 else v for k, v in free.items()}
    axes = {INPUT_NAME: free, OUTPUT_NAME: out_free} if free else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), buffer, dynamo=False, opset_version=opset,
                          do_constant_folding=fold, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes=axes)
    return onnx.load_from_string(buffer.getvalue())


def find_layer_nodes(graph_model, specs: dict[str, LayerQuant]) -> dict[str, object]:
    """Conv/Gemm node of each quantized layer, found by its weight initializer `<layer>.weight`."""
    by_weight = {n.input[1]: n for n in graph_model.graph.node
                 if n.op_type in QUANTIZED_OPS and len(n.input) > 1}
    return {name: by_weight[f"{name}.weight"] for name in specs if f"{name}.weight" in by_weight}


class QDQEditor:
    """Inserts Q/DQ pairs into a float ONNX graph; nodes are re-sorted topologically at the end."""

    def __init__(self, graph_model):
        self.model = graph_model
        self.graph = graph_model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.new_nodes: list = []
        self.qdq_cache: dict[tuple, str] = {}
        self.dq_scale: dict[str, float] = {}  # DQ output -> its scale
        self.shifted_signed = False  # signed tensors as uint8 with zero point 128 (ORT placement)
        self.wide_codes: set[str] = set()  # DQ outputs whose codes span 0..255 (shifted signed tensors)
        self.code_range: tuple[str, str] | None = None  # uint8 constants 0 and 127, made once
        self.count = 0
        self._index()

    def _index(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers = defaultdict(list)
        for n in self.graph.node:
            for i, name in enumerate(n.input):
                self.consumers[name].append((n, i))

    # -- building blocks ------------------------------------------------------------------------------------
    def _name(self, stem: str) -> str:
        self.count += 1
        return f"{stem.strip('/').replace('/', '_')}_{self.count}"

    def _const(self, stem: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self._name(stem)
        tensor = numpy_helper.from_array(np.asarray(array), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def _node(self, op: str, inputs: list[str], stem: str, **attrs) -> str:
        from onnx import helper

        out = self._name(f"{stem}_{op}")
        self.new_nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def qdq(self, tensor: str, amax: float, unsigned: bool = False) -> str:
        """Q/DQ of an activation (per tensor, zero point 0); one pair per (tensor, range, type)."""
        key = (tensor, float(amax), unsigned)
        if key not in self.qdq_cache:
            levels = 127.0
            scale = self._const(f"{tensor}_scale", np.array(_safe(amax) / levels, dtype=np.float32))
            zero = self._const(f"{tensor}_zero", _zero_point(unsigned, self.shifted_signed))
            quant = self._node("QuantizeLinear", [tensor, scale, zero], tensor)
            if unsigned:  # keep int8's top code: uint8 alone would let values above amax run to 255 steps
                quant = self._node("Clip", [quant, *self._uint8_int8_range()], tensor)
            self.qdq_cache[key] = self._node("DequantizeLinear", [quant, scale, zero], tensor)
            self.dq_scale[self.qdq_cache[key]] = float(np.float32(_safe(amax) / levels))
            if self.shifted_signed and not unsigned:
                self.wide_codes.add(self.qdq_cache[key])
        return self.qdq_cache[key]

    def _uint8_int8_range(self) -> tuple[str, str]:
        if self.code_range is None:
            self.code_range = (self._const("int8_grid_min", np.array(0, dtype=np.uint8)),
                               self._const("int8_grid_max", np.array(127, dtype=np.uint8)))
        return self.code_range

    def weight_qdq(self, node, amax: np.ndarray, prequantize: bool, shifted: bool = False) -> np.ndarray:
        """Per-channel (axis 0) Q/DQ of the node's weight; returns the weight scales. `shifted` (prequantized
        only) stores the int8 codes as uint8 with zero point 128: the same values, for ORT's U8U8 kernels."""
        from onnx import numpy_helper

        weight_name = node.input[1]
        weight = numpy_helper.to_array(self.inits[weight_name]).astype(np.float32)
        if node.op_type == "Gemm" and not _attr(node, "transB", 0):
            raise RepqError(f"Gemm {node.name} stores its weight as in x out; only torch Linear (transB=1) "
                            "is supported for per-channel weights: export the layer as nn.Linear")
        scale = (_safe(np.asarray(amax, dtype=np.float64)) / 127.0).astype(np.float32)
        zeros = np.full(weight.shape[0], 128, np.uint8) if shifted else np.zeros(weight.shape[0], np.int8)
        zero = self._const(f"{weight_name}_zero", zeros)
        scale_name = self._const(f"{weight_name}_scale", scale)
        if prequantize:  # int8 initializer + DQ: what ORT's QDQ fusion reads, a quarter of the size
            shape = (-1,) + (1,) * (weight.ndim - 1)
            q = np.clip(np.round(weight / scale.reshape(shape)), -128, 127)
            q = (q + 128).astype(np.uint8) if shifted else q.astype(np.int8)
            source = self._const(f"{weight_name}_{q.dtype}", q)
        else:  # float weight -> Q -> DQ: TensorRT's explicit-quantization form
            source = self._node("QuantizeLinear", [weight_name, scale_name, zero], weight_name, axis=0)
        node.input[1] = self._node("DequantizeLinear", [source, scale_name, zero], weight_name, axis=0)
        return scale

    def bias_qdq(self, node, input_scale: float, weight_scale: np.ndarray) -> None:
        """int32 bias with scale input_scale * weight_scale (ORT's QLinearConv/QGemm bias convention)."""
        from onnx import numpy_helper

        if len(node.input) < 3 or node.input[2] not in self.inits:
            return
        bias = numpy_helper.to_array(self.inits[node.input[2]]).astype(np.float64)
        scale = (np.float64(input_scale) * weight_scale.astype(np.float64)).astype(np.float32)
        q = np.clip(np.round(bias / scale), -(2**31), 2**31 - 1).astype(np.int32)
        source = self._const(f"{node.input[2]}_int32", q)
        scale_name = self._const(f"{node.input[2]}_scale", scale)
        zero = self._const(f"{node.input[2]}_zero", np.zeros(q.shape[0], dtype=np.int32))
        node.input[2] = self._node("DequantizeLinear", [source, scale_name, zero], node.input[2], axis=0)

    # -- placements -----------------------------------------------------------------------------------------
    def place_tensorrt(self, nodes: dict, specs: dict[str, LayerQuant]) -> None:
        known = self._known_ranges(nodes, specs)
        for name, node in nodes.items():
            spec = specs[name]
            if spec.input_amax is not None:
                node.input[0] = self.qdq(node.input[0], spec.input_amax)
            if spec.weight_amax is not None:
                self.weight_qdq(node, spec.weight_amax, prequantize=False)
        for add in [n for n in self.graph.node if n.op_type == "Add"]:
            index = self._residual_index(add)
            if index is not None and add.input[index] in known:
                add.input[index] = self.qdq(add.input[index], known[add.input[index]])

    def place_onnxruntime(self, nodes: dict, specs: dict[str, LayerQuant]) -> None:
        self.shifted_signed = True
        known = self._known_ranges(nodes, specs)
        wanted = [node.input[0] for name, node in nodes.items() if specs[name].input_amax is not None]
        for node in nodes.values():
            wanted.append(self._after_relu(node.output[0]))
        for add in [n for n in self.graph.node if n.op_type == "Add"]:
            if self._residual_index(add) is not None:
                wanted += [add.input[0], add.input[1], self._after_relu(add.output[0])]
        outputs = {o.name for o in self.graph.output}
        dq_of = {}
        for tensor in dict.fromkeys(wanted):
            if tensor in known and tensor not in outputs:
                dq_of[tensor] = self.qdq(tensor, known[tensor], unsigned=self._non_negative(tensor))
        kept_in_float = {id(n) for n in self.graph.node if n.op_type in QUANTIZED_OPS} - {id(n) for n in nodes.values()}
        for tensor, dq in dq_of.items():  # every consumer reads the quantized tensor: ORT fuses around it
            for consumer, i in self.consumers[tensor]:
                if id(consumer) not in kept_in_float:  # a layer kept in float (skip_layers) reads the float one
                    consumer.input[i] = dq
        for name, node in nodes.items():
            spec = specs[name]
            if spec.weight_amax is None:
                continue
            weight_scale = self.weight_qdq(node, spec.weight_amax, prequantize=True,
                                           shifted=node.input[0] in self.wide_codes)
            if node.input[0] in self.dq_scale:
                self.bias_qdq(node, self.dq_scale[node.input[0]], weight_scale)

    # -- graph facts ----------------------------------------------------------------------------------------
    def _known_ranges(self, nodes: dict, specs: dict[str, LayerQuant]) -> dict[str, float]:
        """amax per tensor: a consumer's calibrated input range first, a producer's output range otherwise."""
        known: dict[str, float] = {}
        for name, node in nodes.items():
            if specs[name].input_amax is not None:
                known.setdefault(node.input[0], specs[name].input_amax)
        for name, node in nodes.items():
            out = specs[name].output_amax
            if out is not None:
                known.setdefault(node.output[0], out)
                known.setdefault(self._after_relu(node.output[0]), out)
        return known

    def _after_relu(self, tensor: str) -> str:
        users = self.consumers.get(tensor, [])
        if len(users) == 1 and users[0][0].op_type == "Relu":
            return users[0][0].output[0]
        return tensor

    def _residual_index(self, add) -> int | None:
        """Which input of an activation + activation Add is the residual (the one TensorRT does not fuse)."""
        if len(add.input) != 2 or any(name in self.inits for name in add.input):
            return None
        from_conv = [self.producer.get(name) is not None and self.producer[name].op_type == "Conv"
                     for name in add.input]
        if from_conv == [True, False]:
            return 1
        if from_conv == [False, True]:
            return 0
        return 1  # torch's `out + identity` puts the shortcut second

    def _non_negative(self, tensor: str) -> bool:
        node = self.producer.get(tensor)
        while node is not None and node.op_type in SIGN_PRESERVING:
            node = self.producer.get(node.input[0])
        return node is not None and node.op_type == "Relu"

    def finish(self) -> None:
        nodes = list(self.graph.node) + self.new_nodes
        del self.graph.node[:]
        self.graph.node.extend(_toposort(nodes, self.graph))
        used = {name for node in self.graph.node for name in node.input}
        kept = [t for t in self.graph.initializer if t.name in used]  # float weights replaced by int8 ones
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)


def _zero_point(unsigned: bool, shifted_signed: bool) -> np.ndarray:
    """0 as int8 (symmetric), 0 as uint8 (non-negative), or 128 as uint8 for a signed tensor in the ORT file:
    codes 0..255 with zero point 128 are the int8 grid -128..127 shifted, the same values, and ORT's x86
    kernels are much faster for uint8 activations (U8S8) than for int8 ones."""
    if unsigned:
        return np.array(0, dtype=np.uint8)
    return np.array(128, dtype=np.uint8) if shifted_signed else np.array(0, dtype=np.int8)


def _safe(amax):
    """amax 0 (a channel or tensor that is always zero) would give scale 0, which ONNX forbids."""
    return np.where(np.asarray(amax) > 0, amax, 1.0) if np.ndim(amax) else (float(amax) if amax > 0 else 1.0)


def _attr(node, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            from onnx import helper

            return helper.get_attribute_value(attr)
    return default


def _toposort(nodes: list, graph) -> list:
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(nodes), []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise RepqError("the QDQ graph has a cycle or a dangling input: "
                            "report this as a bug of engines.export")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        done = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in done]
    return ordered
