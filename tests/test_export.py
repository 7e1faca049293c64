"""QDQ export per engine, checked against PyTorch and against hand-computed quantization (ONNX Runtime runs both)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from repq.engines.export import LayerQuant, export_onnx
from repq.engines.onnxruntime import OrtEngine, optimized_op_types
from repq.errors import RepqError
from repq.quant.toolkit import quantize


def small_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)


@pytest.fixture(scope="module")
def digits():
    """The fixed calibration set of the digits data: real images, 512 of them."""
    from repq.calibration.loaders import calibration_set

    return calibration_set("digits", 512, seed=0)


@pytest.fixture(scope="module")
def trained(digits):
    """A small CNN trained briefly on the digits: its predictions mean something, unlike a random net's."""
    images, labels = digits
    torch.manual_seed(0)
    model = small_cnn()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        for start in range(0, len(images), 64):
            loss = nn.functional.cross_entropy(model(images[start:start + 64]), labels[start:start + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def quantized(trained, digits):
    loader = [(digits[0][i:i + 128], digits[1][i:i + 128]) for i in range(0, 512, 128)]
    return quantize(trained, loader, "max", fuse=False)


@pytest.fixture(scope="module")
def files(quantized, tmp_path_factory):
    out = tmp_path_factory.mktemp("qdq")
    return {target: export_onnx(quantized, out / f"m.{target}.onnx", target, (1, 3, 32, 32), dynamic_batch=True)
            for target in ("tensorrt", "onnxruntime")}


def power_of_two_scales(model: nn.Module) -> nn.Module:
    """Move every amax to 127 * 2^k and every bias onto its layer's product grid (input step x weight step):
    then every quantized layer is exact integer arithmetic in float32 (codes times powers of two; sums of a few
    hundred int8 x int8 products stay far below 2^24), so torch and ONNX Runtime get bit-identical results in
    any summation order, and ModelOpt's x * (127 / amax) equals ONNX's x / (amax / 127). With calibrated amax
    and float biases they differ within an ulp, and a value that lands on the other side of a rounding
    boundary flips an int8 code, which moves later logits by up to a few percent."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if type(module).__name__ == "TensorQuantizer" and getattr(module, "_amax", None) is not None:
            # an amax of 0 (a channel, or D2se's SE hidden unit, dead on the calibration images) has no log:
            # any power of two will do there
            amax = torch.where(module.amax > 0, module.amax, torch.full_like(module.amax, 127.0))
            module.amax = 127.0 * torch.exp2(torch.round(torch.log2(amax / 127.0)))
    for module in model.modules():
        if getattr(module, "bias", None) is not None and hasattr(module, "weight_quantizer"):
            step = (module.input_quantizer.amax / 127.0) * (module.weight_quantizer.amax / 127.0).reshape(-1)
            with torch.no_grad():
                module.bias.copy_(torch.round(module.bias / step) * step)
    return model


def test_tensorrt_placement_equals_fake_quant_pytorch(quantized, digits, tmp_path):
    exact = power_of_two_scales(quantized)
    path = export_onnx(exact, tmp_path / "exact.onnx", "tensorrt", (1, 3, 32, 32), dynamic_batch=True)
    # Gaussian images: digits pixels (17 levels) over power-of-two scales land exactly on .5 ties, where
    # torch and ORT break ties differently.
    images = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = exact(images).numpy()
    got = OrtEngine(path, threads=1)(images.numpy())
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_tensorrt_placement_predicts_like_fake_quant_pytorch(files, quantized, digits):
    with torch.no_grad():
        expected = quantized(digits[0]).numpy()
    got = OrtEngine(files["tensorrt"], threads=1)(digits[0].numpy())
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.998


def test_tensorrt_graph_has_qdq_on_every_conv_and_gemm(files):
    model = onnx.load(str(files["tensorrt"]))
    assert model.opset_import[0].version >= 13
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(layers) == 4
    for node in layers:
        data, weight = producers[node.input[0]], producers[node.input[1]]
        assert data.op_type == weight.op_type == "DequantizeLinear"
        assert [a.i for a in weight.attribute if a.name == "axis"] == [0]
        scale, zero = inits[weight.input[1]], inits[weight.input[2]]
        assert scale.shape == (inits[producers[weight.input[0]].input[0]].shape[0],)  # one per output channel
        assert zero.dtype == np.int8 and not zero.any()
        assert inits[data.input[2]].dtype == np.int8 and inits[data.input[2]] == 0  # symmetric int8


def test_onnxruntime_placement_runs_qlinear_kernels_and_agrees(files, digits):
    ops = optimized_op_types(files["onnxruntime"])
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 1
    assert not {"Conv", "FusedConv", "Gemm"} & set(ops)
    images = digits[0].numpy()
    reference = OrtEngine(files["tensorrt"], threads=1)(images).argmax(1)
    ort_int8 = OrtEngine(files["onnxruntime"], threads=1)(images).argmax(1)
    assert (reference == ort_int8).mean() >= 0.99
    assert (ort_int8 == digits[1].numpy()).mean() > 0.5  # the model learnt something: the check means something


def test_onnxruntime_file_gives_layers_with_signed_inputs_uint8_weights_and_its_kernels_stay_exact(files, digits):
    """A signed input is stored as uint8 codes 0..255 (zero point 128). U8S8 kernels without VNNI (AVX2) would
    saturate int16 pair sums on those codes, so such a layer gets uint8 weights (zero point 128, U8U8); layers
    reading post-ReLU codes 0..127 keep int8 weights. On every CPU the fused integer kernels then compute
    exactly the QDQ graph's arithmetic (ORT with graph optimizations off: the ONNX operator semantics)."""
    import onnxruntime as ort

    graph = onnx.load(str(files["onnxruntime"])).graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weight_types = []
    for node in (n for n in graph.node if n.op_type in ("Conv", "Gemm")):
        data_zero, weight_dq = inits[producers[node.input[0]].input[2]], producers[node.input[1]]
        weights, weight_zero = inits[weight_dq.input[0]], inits[weight_dq.input[2]]
        signed_input = data_zero.dtype == np.uint8 and data_zero == 128
        assert weights.dtype == weight_zero.dtype == (np.uint8 if signed_input else np.int8)
        assert (weight_zero == (128 if signed_input else 0)).all()
        weight_types.append(weights.dtype)
    assert weight_types == [np.uint8, np.int8, np.int8, np.int8]  # images are signed, the rest post-ReLU
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = ort.InferenceSession(str(files["onnxruntime"]), options, providers=["CPUExecutionProvider"])
    images = digits[0].numpy()
    expected = unfused.run(None, {unfused.get_inputs()[0].name: images})[0]
    got = OrtEngine(files["onnxruntime"], threads=1)(images)
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()


@pytest.mark.parametrize("name", ["qarepvgg_a0", "repvgg_d2se"])
def test_fused_zoo_model_exports_exactly(digits, tmp_path, name):
    """D2se adds squeeze-excitation after every block: a mean, two quantized 1x1 convs, a sigmoid gate."""
    from repq.reparam import create_model

    model = create_model(name, num_classes=10, cifar=True, width_mult=0.25).eval()
    q = quantize(model, [(digits[0][:64], digits[1][:64])], "percentile", percentile=99.99)
    q = power_of_two_scales(q)
    path = export_onnx(q, tmp_path / "zoo.onnx", "tensorrt", (2, 3, 32, 32))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = q(images).numpy()
    got = OrtEngine(path, threads=1)(images.numpy())
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_residual_input_of_add_is_quantized_with_the_shortcut_range(digits, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), Residual(8), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10)).eval()
    q = quantize(model, [(digits[0][:64], digits[1][:64])], "max", fuse=False)
    graph = onnx.load(str(export_onnx(q, tmp_path / "res.onnx", "tensorrt", (1, 3, 32, 32)))).graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    add = next(n for n in graph.node if n.op_type == "Add")
    dq = producers[add.input[1]]
    assert dq.op_type == "DequantizeLinear" and producers[add.input[0]].op_type == "Conv"
    shortcut_amax = float(q[2].conv1.input_quantizer.amax)  # the shortcut is conv1's input
    assert float(inits[dq.input[1]]) == pytest.approx(shortcut_amax / 127, rel=1e-6)


def fake_quant(t: torch.Tensor, amax, top: int = 127) -> torch.Tensor:
    """Symmetric int8 by hand: scale amax / 127, codes -128..top."""
    scale = torch.as_tensor(amax, dtype=torch.float32) / 127
    return torch.clamp(torch.round(t / scale), -128, top) * scale

def test_ranges_given_as_plain_values_export_the_hand_computed_int8_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    w_amax = {"0": np.full(4, 0.3), "3": np.full(3, 0.05)}
    specs = {"0": LayerQuant(2.0, w_amax["0"]), "3": LayerQuant(1.0, w_amax["3"])}
    path = export_onnx(model, tmp_path / "spec.onnx", "tensorrt", (2, 3, 6, 6), specs=specs)
    x = torch.randn(2, 3, 6, 6) * 1.5

    with torch.no_grad():
        h = torch.relu(nn.functional.conv2d(fake_quant(x, 2.0), fake_quant(model[0].weight, 0.3), model[0].bias))
        expected = nn.functional.linear(fake_quant(h.flatten(1), 1.0), fake_quant(model[3].weight, 0.05), model[3].bias)
    got = OrtEngine(path, threads=1)(x.numpy())
    assert np.abs(got - expected.numpy()).max() <= 1e-4 * expected.abs().max().item()


def test_bad_export_requests(quantized, tmp_path):
    with pytest.raises(RepqError, match="opset 12 is too old"):
        export_onnx(quantized, tmp_path / "old.onnx", "tensorrt", (1, 3, 32, 32), opset=12)
    with pytest.raises(RepqError, match="no calibrated quantizers"):
        export_onnx(small_cnn(), tmp_path / "float.onnx", "tensorrt", (1, 3, 32, 32))
    with pytest.raises(RepqError, match="did you mean 'tensorrt'"):
        export_onnx(quantized, tmp_path / "x.onnx", "tensort", (1, 3, 32, 32))
    assert not list(tmp_path.iterdir())



def test_onnxruntime_file_saturates_relu_outputs_at_amax_as_the_int8_model_does(tmp_path):
    """uint8 after a ReLU has codes up to 255, int8 stops at 127: values above the consumer's amax must
    saturate at amax in the ORT file as in the int8 model, with the QLinearConv kernel kept."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 4)).eval()
    h_amax = 0.2
    specs = {"0": LayerQuant(2.0, np.full(4, 0.3)), "2": LayerQuant(h_amax, np.full(3, 0.05))}
    path = export_onnx(model, tmp_path / "sat.onnx", "onnxruntime", (2, 3, 6, 6), specs=specs)
    assert optimized_op_types(path)["QLinearConv"] == 1
    x = torch.randn(2, 3, 6, 6) * 1.5

    def second_conv(h_quantized):
        return nn.functional.conv2d(h_quantized, fake_quant(model[2].weight, 0.05), model[2].bias)

    with torch.no_grad():
        h = torch.relu(nn.functional.conv2d(fake_quant(x, 2.0), fake_quant(model[0].weight, 0.3), model[0].bias))
        expected, uint8_range = second_conv(fake_quant(h, h_amax)), second_conv(fake_quant(h, h_amax, top=255))
    assert (h > 1.2 * h_amax).float().mean() > 0.2  # the premise: many values far above amax
    got = torch.as_tensor(OrtEngine(path, threads=1)(x.numpy()))
    one_code = h_amax / 127 * 0.05 * 16  # one input code changed in every tap of an output
    assert (got - expected).abs().max() <= one_code
    assert (uint8_range - expected).abs().max() > 20 * one_code  # what the file computed before the Clip
