"""repq doctor against known truth: a planted dead channel is traced to its identity BN, a layer's SQNR is a hand
computation, and the engine table is exact where ONNX Runtime and the fake-quant model compute the same."""

import json

import numpy as np
import pytest
import torch
from conftest import randomize_bn
from torch import nn

from repq.errors import RepqError
from repq.quant.doctor import diagnose, engine_errors, first_divergence, outcome, sqnr_db
from repq.reparam import BLOCKS, create_model, fuse_model
from repq.reparam.block import sum_kernels
from repq.reparam.blocks import ECBlock

GEOMETRIES = [dict(stride=1, groups=1), dict(stride=2, groups=1), dict(stride=1, groups=2)]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"s{g['stride']}g{g['groups']}")
@pytest.mark.parametrize("name", list(BLOCKS))
def test_branch_kernels_sum_to_the_merged_kernel(name, geometry):
    block = ECBlock(8, 8, with_identity=True) if name == "ecb" else BLOCKS[name](8, 8, 3, **geometry)
    randomize_bn(block)
    block.eval()
    with torch.no_grad():
        weight, bias = block.merged_kernel()
        shares = block.branch_kernels()
        total_weight, total_bias = sum_kernels(shares.values())
    assert len(shares) >= 1 and all(w.shape == weight.shape for w, _ in shares.values())
    if name in ("qarepvgg", "orepa"):  # a BN after the sum: each share is scaled by it, so rounding differs
        torch.testing.assert_close(total_weight, weight, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(total_bias, bias, rtol=1e-6, atol=1e-6)
    else:  # the same sum in the same order
        assert torch.equal(total_weight, weight) and torch.equal(total_bias, bias)


def _images(batches=2, size=16, batch=16):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(batch, 3, size, size, generator=generator), torch.zeros(batch, dtype=torch.long))
            for _ in range(batches)]


DEAD_CHANNEL, PRODUCER, CONSUMER = 5, "stages.2.2", "stages.2.4"


def _model_with_a_dead_channel():
    """Tiny CIFAR RepVGG-A0: PRODUCER's output channel DEAD_CHANNEL is negative before its ReLU on every input
    (a large negative BN shift on all three branches), so CONSUMER's identity BN saw a near-zero variance."""
    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.25).eval()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for bn in (modules[PRODUCER].rbr_dense.bn, modules[PRODUCER].rbr_1x1.bn, modules[PRODUCER].rbr_identity):
            bn.bias[DEAD_CHANNEL] = -100.0
        modules[CONSUMER].rbr_identity.running_var[DEAD_CHANNEL] = 1e-6
    return model


def test_doctor_traces_a_dead_channel_outlier_to_its_identity_bn():
    model = _model_with_a_dead_channel()
    diagnosis = diagnose(model, _images(), engines=(), progress=False)
    layer = diagnosis.worst()
    assert layer.block == CONSUMER and layer.layer == f"{CONSUMER}.reparam_conv"
    outlier = layer.outlier
    assert (outlier.out_channel, outlier.in_channel) == (DEAD_CHANNEL, DEAD_CHANNEL)
    assert outlier.branch == "rbr_identity"
    # The prediction from the branch shares is the deploy kernel's own largest weight, to the bit.
    fused = dict(fuse_model(model).named_modules())[f"{CONSUMER}.reparam_conv"].weight
    assert outlier.predicted == outlier.value == float(fused.detach().abs().max())
    gamma = float(dict(model.named_modules())[CONSUMER].rbr_identity.weight[DEAD_CHANNEL].detach())
    assert abs(outlier.shares["rbr_identity"] - gamma / np.sqrt(1e-6 + 1e-5)) < 1e-3 * abs(outlier.value)
    dead = {d["channel"]: d for d in layer.dead_inputs}
    assert dead[DEAD_CHANNEL]["zero_share"] == 1.0 and dead[DEAD_CHANNEL]["identity_var"] == pytest.approx(1e-6)
    assert layer.worst_channel == DEAD_CHANNEL and layer.sqnr_worst_channel < 1.0  # the channel is wiped out
    assert CONSUMER in diagnosis.verdict and f"channel {DEAD_CHANNEL}" in diagnosis.verdict
    assert "identity" in diagnosis.verdict and "QARepVGG" in diagnosis.prescription
    # The outcome is the model-level evidence: the share of calibration images whose top-1 class INT8 changes.
    assert diagnosis.images == 32 and 0 <= diagnosis.changed_predictions <= 1
    assert outcome(diagnosis.output_sqnr, diagnosis.changed_predictions) in diagnosis.verdict


def _fake_quant(x, amax):
    scale = amax / 127.0
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def test_sqnr_of_one_layer_is_the_hand_computation():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    images = _images(batches=1)
    diagnosis = diagnose(nn.Sequential(conv), images, engines=(), sqnr_images=None, progress=False)
    (layer,) = diagnosis.layers
    x = images[0][0]
    w = conv.weight.detach()
    qx = _fake_quant(x, x.abs().max())
    qw = _fake_quant(w, w.abs().amax(dim=(1, 2, 3), keepdim=True))
    out = torch.nn.functional.conv2d(x, w, padding=1).double()

    def by_hand(inputs, weight):
        noise = torch.nn.functional.conv2d(inputs, weight, padding=1).double() - out
        return 10 * np.log10(float(out.pow(2).sum()) / float(noise.pow(2).sum()))

    assert layer.sqnr_weights == pytest.approx(by_hand(x, qw), abs=1e-3)
    assert layer.sqnr_inputs == pytest.approx(by_hand(qx, w), abs=1e-3)
    assert layer.sqnr_both == pytest.approx(by_hand(qx, qw), abs=1e-3)
    assert layer.input_amax == pytest.approx(float(x.abs().max())) and layer.clipped_values == 0.0
    assert sqnr_db(1.0, 0.0) == float("inf")


def _on_grid_model():
    """Two convs whose first layer computes exactly in float32 in both runtimes: inputs and weights are on
    power-of-two int8 grids whose top code is present, so every product and sum is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        weight = torch.randint(-127, 128, model[0].weight.shape).float()
        weight[:, 0, 0, 0] = 127.0
        model[0].weight.copy_(weight * 2.0 ** -6)
    codes = torch.randint(-127, 128, (8, 3, 8, 8)).float()
    codes[0, 0, 0, 0] = 127.0
    return model.eval(), [(codes * 2.0 ** -4, torch.zeros(8, dtype=torch.long))]


def test_engine_table_is_exact_on_grid_and_flags_a_planted_mismatch(tmp_path):
    import onnx
    from onnx import numpy_helper

    from repq.engines.export import export_onnx
    from repq.engines.intermediates import layer_outputs
    from repq.engines.openvino import openvino_available
    from repq.quant.toolkit import quantize

    model, images = _on_grid_model()
    quantized = quantize(model, images, "max")
    names = ["0", "2", "6"]
    x = images[0][0]
    engines = ["tensorrt", "onnxruntime"] + (["openvino"] if openvino_available() is None else [])
    for engine in engines:
        clean = engine_errors(quantized, names, x, engine=engine)
        assert clean["0"] == 0.0, engine  # the same float32 products and exact sums: bit-identical
        # Later layers: float rounding (and in ORT's own file, its int32 bias: 1.5e-5 here), no departure.
        assert max(clean.values()) < 1e-4 and first_divergence(clean, names) is None, (engine, clean)
    # Plant a mismatch: layer "2" in the file dequantizes its weights with scales 1.5x those it quantized with.
    path = export_onnx(quantized, tmp_path / "m.trt.onnx", "tensorrt", (1, 3, 8, 8), dynamic_batch=True)
    graph = onnx.load(str(path))
    producer = {out: node for node in graph.graph.node for out in node.output}
    conv = producer[layer_outputs(graph, ["2"])["2"]]
    dq = producer[conv.input[1]]
    scale = next(t for t in graph.graph.initializer if t.name == dq.input[1])  # shared with the weight's Q
    graph.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1.5),
                                                           "planted_scale"))
    dq.input[1] = "planted_scale"
    planted = tmp_path / "planted.onnx"
    onnx.save(graph, str(planted))
    for engine in engines[:1] + engines[2:]:  # the TensorRT-placement file, in ORT and in OpenVINO
        errors = engine_errors(quantized, names, x, onnx_file=planted, engine=engine)
        assert errors["0"] == 0.0 and errors["2"] > 0.1, engine
        assert first_divergence(errors, names) == "2", engine


def test_first_divergence_names_where_the_drift_began():
    order = ["a", "b", "c", "d"]
    assert first_divergence({"a": 1e-7, "b": 2e-7, "c": 5e-3, "d": 9e-3}, order) is None  # within tolerance
    assert first_divergence({"a": 1e-7, "b": 6e-5, "c": 2e-3, "d": 3e-2}, order) == "b"  # drift from b on
    assert first_divergence({"a": 0.0, "b": 0.2, "c": 0.3, "d": 0.3}, order) == "b"


def test_doctor_command_prints_json(tmp_path, capsys):
    from repq.pipeline.cli import main
    from repq.reparam.io import atomic_save

    model = _model_with_a_dead_channel()
    atomic_save({"arch": model.repq_arch, "state_dict": model.state_dict()}, tmp_path / "best.pt")
    argv = ["doctor", str(tmp_path / "best.pt"), "--data", "digits", "--calib", "16", "--json"]
    assert main([*argv, "--report", str(tmp_path / "report")]) == 0
    result = json.loads(capsys.readouterr().out)
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Doctor: where INT8 loses accuracy" in html and "where the engine parts ways" in html
    assert "data:image/png;base64" in html and (tmp_path / "report" / "plots" / "doctor.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report" / "metrics.json").read_text())["doctor"]["best.pt"]["verdict"] == \
        result["verdict"]
    assert result["images"] == 16 and len(result["layers"]) == 23
    # The TensorRT-placement file computes what the fake-quant model does, to float rounding, at every layer; so
    # does ORT's own up to the head, whose input (the pooled last conv output) only that placement quantizes.
    assert result["engine_divergence"]["tensorrt"] is None
    assert result["engine_divergence"]["onnxruntime"] in (None, "head.2")
    assert "openvino" in result["engine_divergence"] or "openvino" in result["engine_skipped"]
    assert all(layer["engine_error"]["tensorrt"] < 1e-5 for layer in result["layers"])
    assert all(layer["engine_error"]["onnxruntime"] < 1e-5 for layer in result["layers"][:-1])
    assert main(["doctor", str(tmp_path / "missing.pt"), "--data", "digits"]) == 2


def _broken_net():
    """conv0 -> conv2 -> conv4 -> linear; conv0's channel 0 is dead and conv2 reads it with a weight of 50 in
    every output channel: per-channel INT8 then rounds all of conv2's other weights to zero (RepVGG's collapse),
    while the model in float is untouched. Labels are the FP32 model's own predictions."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    with torch.no_grad():
        model[0].bias[0] = -100.0
        model[2].weight[:, 0, 1, 1] = 50.0
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(96, 3, 8, 8, generator=generator)
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    batches = [(images[i:i + 32], labels[i:i + 32]) for i in range(0, 96, 32)]
    return model, batches[:1], batches[1:]


def test_fallback_keeps_exactly_the_broken_layer_in_float(tmp_path):
    import onnx

    from repq.api import export
    from repq.quant.fallback import engine_score, fallback_search
    from repq.quant.toolkit import quantize

    model, calib, val = _broken_net()
    quantized = quantize(model, calib, "max")
    assert engine_score(quantized, val, (1, 3, 8, 8), "top1") < 80  # all of it in INT8: broken
    kept, record = fallback_search(quantized, model, calib, val, budget=5.0, input_shape=(1, 3, 8, 8),
                                   log=lambda _: None)
    assert record["float_layers"] == ["2"] and record["ranking"][0]["layer"] == "2"
    assert record["fp32"] == 100.0 and record["fp32"] - record["int8"] <= 5.0
    assert record["evaluations"] == 3  # FP32, everything in INT8, then conv 2 in float
    for target in ("onnxruntime", "tensorrt"):
        graph = onnx.load(str(export(kept, tmp_path / f"kept.{target}.onnx", target, (1, 3, 8, 8))))
        producer = {out: node for node in graph.graph.node for out in node.output}
        conv = next(n for n in graph.graph.node if n.op_type == "Conv" and n.input[1] == "2.weight")
        assert [producer[name].op_type for name in conv.input if name in producer] == ["Relu"], target
        assert not [n for n in graph.graph.node if conv.output[0] in n.input and n.op_type == "QuantizeLinear"]
        others = [n for n in graph.graph.node if n.op_type == "Conv" and n is not conv]
        assert all(producer[n.input[1]].op_type == "DequantizeLinear" for n in others), target


def test_budget_is_a_ptq_flag_and_a_recipe_field():
    import argparse

    from repq.pipeline.commands import ptq
    from repq.pipeline.flags import config_from_args
    from repq.pipeline.recipe import load_recipe, stage_config
    from repq.quant.config import PTQConfig

    parser = argparse.ArgumentParser()
    ptq.add_arguments(parser)
    args = parser.parse_args(["--ckpt", "a.pt", "--out", "b.pt", "--budget", "0.5"])
    assert config_from_args(args, PTQConfig).budget == 0.5
    assert stage_config(load_recipe(None, ["stages.ptq.budget=0.25"]), "ptq").budget == 0.25
    assert PTQConfig().budget is None


def test_auto_picks_the_calibrator_that_scores_best_on_a_heavy_tail():
    """Calibration images with a heavy tail (0.2% of values 40x larger), check images without: max and
    percentile keep the tail's range, entropy clips it and keeps the resolution the clean images need."""
    from repq.quant.auto_calibrator import choose_calibrator
    from repq.quant.toolkit import quantize

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 4)).eval()
    generator = torch.Generator().manual_seed(3)
    calib = torch.randn(64, 3, 8, 8, generator=generator)
    calib = torch.where(torch.rand(calib.shape, generator=generator) < 0.002, calib * 40, calib)
    check = torch.randn(256, 3, 8, 8, generator=generator)
    with torch.no_grad():
        labels = model(check).argmax(dim=1)
    calib_loader = [(calib[:32], torch.zeros(32)), (calib[32:], torch.zeros(32))]
    chosen, record = choose_calibrator(model, calib_loader, [(check, labels)], log=lambda _: None)
    by_hand = {}
    for method in ("max", "entropy", "percentile", "mse"):
        with torch.no_grad():
            by_hand[method] = 100.0 * float((quantize(model, calib_loader, method)(check).argmax(1) == labels)
                                            .float().mean())
    assert {m: s["top1"] for m, s in record["scores"].items()} == pytest.approx(by_hand)
    best = max(by_hand, key=by_hand.get)
    assert record["method"] == best == "entropy"
    assert all(by_hand[best] >= score + 5 for method, score in by_hand.items() if method != best)
    assert chosen.repq_quant["calibration"]["method"] == "entropy"


def test_auto_judges_on_training_images_disjoint_from_the_calibration_draw(monkeypatch):
    import dataclasses

    from repq.calibration.datasets import ImageSet, load_data
    from repq.calibration.loaders import calibration_check_loader, calibration_indices

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"the val split was read ({name})")

        def __len__(self):
            raise AssertionError("the val split was read (len)")

    data = load_data("digits")
    data = dataclasses.replace(data, val=Untouchable())
    seen = []
    original = ImageSet.__getitems__
    monkeypatch.setattr(ImageSet, "__getitems__", lambda self, positions: seen.extend(positions) or original(
        self, positions))
    loader = calibration_check_loader(data, 64, 100, batch_size=50)
    assert sum(len(b[1]) for b in loader) == 100 and len(set(seen)) == 100
    assert not set(seen) & set(calibration_indices(data, 64, 0).tolist())


@pytest.mark.parametrize("family", ["dbb", "acb", "orepa"])
def test_doctor_blames_the_branches_of_any_block_family(family):
    """No per-block code in the doctor: a plain CNN converted to another family gets its own branch names, and
    the shares at the largest weight sum to the deploy kernel's weight there."""
    from repq.reparam import convert_convs

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    model = convert_convs(model, family)
    randomize_bn(model)
    for p in model.parameters():  # the converted branches start at zero: give every branch a share
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    blocks = {name: block for name, block in model.named_modules() if hasattr(block, "branch_kernels")}
    diagnosis = diagnose(model, _images(batches=1, size=8), engines=(), progress=False)
    fused = dict(fuse_model(model).named_modules())
    for name, block in blocks.items():
        layer = diagnosis.layer(name)
        assert set(layer.outlier.shares) == set(block.branch_kernels())
        value = float(fused[f"{name}.reparam_conv"].weight.detach().abs().max())
        assert abs(layer.outlier.value) == value
        assert layer.outlier.predicted == pytest.approx(layer.outlier.value, rel=1e-5, abs=1e-6)


def test_diagnose_is_public():
    import repq
    import repq.quant.doctor

    assert repq.diagnose is repq.quant.doctor.diagnose and "diagnose" in repq.__all__


def test_ranking_by_accuracy_matches_each_layer_quantized_alone_by_hand():
    from repq.quant.fallback import keep_in_float, rank_layers
    from repq.quant.toolkit import quantize, quantized_layers
    from repq.training.evaluate import evaluate

    model, calib, val = _broken_net()
    quantized = quantize(model, calib, "max")
    ranking = dict(rank_layers(quantized, model, calib, by="accuracy", val_loader=val))
    layers = list(quantized_layers(quantized))
    for name in layers:  # by hand: every other layer kept in float
        alone = keep_in_float(quantized, [n for n in layers if n != name])
        assert ranking[name] == pytest.approx(100.0 - evaluate(alone, val)["top1"])
    assert max(ranking, key=ranking.get) == "2" and ranking["2"] > 20
    with pytest.raises(RepqError, match="val_loader"):
        rank_layers(quantized, model, calib, by="accuracy")


def test_fallback_records_the_accuracy_layers_latency_trade_off():
    from repq.quant.fallback import fallback_search
    from repq.quant.toolkit import quantize

    model, calib, val = _broken_net()
    quantized = quantize(model, calib, "max")
    _, record = fallback_search(quantized, model, calib, val, budget=5.0, input_shape=(1, 3, 8, 8),
                                rank_by="accuracy", timed_runs=3, log=lambda _: None)
    assert record["float_layers"] == ["2"] and record["rank_by"] == "accuracy"
    assert record["rank_evaluations"] == 5  # FP32 and each of the 4 layers alone, fake-quant
    assert [len(h["float_layers"]) for h in record["history"]] == [0, 1]
    assert all(h["latency_ms"] > 0 for h in record["history"]) and record["fp32_latency_ms"] > 0


def _broken_sr_net():
    """_broken_net's collapse in a x2 super-resolution net (Y channel in, PixelShuffle out), with targets the
    FP32 model's own outputs (0.5 +- 0.1) plus noise of 0.01: FP32 scores about 40 dB PSNR."""
    from repq.calibration.sr import SRValidation

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, padding=1), nn.PixelShuffle(2)).eval()
    with torch.no_grad():
        model[0].bias[0] = -100.0
        model[2].weight[:, 0, 1, 1] = 50.0
        generator = torch.Generator().manual_seed(4)
        lows = torch.rand(12, 1, 16, 16, generator=generator)
        model[4].weight *= 0.1 / model(lows).std()  # outputs around 0.5, well inside PSNR's clip to [0, 1]
        model[4].bias.fill_(0.5)
        highs = model(lows) + 0.01 * torch.randn(12, 1, 32, 32, generator=generator)
    pairs = [(low[0].numpy(), high[0].numpy()) for low, high in zip(lows[4:], highs[4:], strict=True)]
    return model, [(lows[:4], highs[:4])], SRValidation(pairs, scale=2, name="constructed")


def test_a_psnr_budget_keeps_the_broken_layer_of_a_super_resolution_net(tmp_path):
    from repq.quant.fallback import engine_score, fallback_search
    from repq.quant.toolkit import quantize

    model, calib, val = _broken_sr_net()
    quantized = quantize(model, calib, "max")
    fp32 = engine_score(model, val, (1, 1, 16, 16), "psnr")
    assert 38 < fp32 < 42
    assert engine_score(quantized, val, (1, 1, 16, 16), "psnr") < fp32 - 3  # all of it in INT8: broken
    _, record = fallback_search(quantized, model, calib, val, budget=1.0, input_shape=(1, 1, 16, 16),
                                metric="psnr", timed_runs=0, log=lambda _: None)
    assert record["metric"] == "psnr" and record["fp32"] == pytest.approx(fp32)
    assert record["float_layers"] == ["2"] and record["fp32"] - record["int8"] <= 1.0


def test_doctor_flags_and_recipe_section_come_from_one_config():
    import argparse

    from repq.pipeline.commands import doctor
    from repq.pipeline.flags import config_from_args
    from repq.pipeline.recipe import load_recipe, stage_config
    from repq.quant.config import DOCTOR_ENGINES, DoctorConfig
    from repq.quant.doctor import ENGINE_RUNS

    assert DOCTOR_ENGINES == tuple(ENGINE_RUNS)
    parser = argparse.ArgumentParser()
    doctor.add_arguments(parser)
    args = parser.parse_args(["a.pt", "--data", "digits", "--calib", "16", "--engine", "onnxruntime",
                              "--sqnr-images", "4"])
    config = config_from_args(args, DoctorConfig)
    assert (config.calib_size, config.engines, config.sqnr_images) == (16, ["onnxruntime"], 4)
    recipe = load_recipe(None, ["stages.doctor.calib_size=16", "stages.doctor.engines=[onnxruntime]"])
    assert stage_config(recipe, "doctor") == DoctorConfig(calib_size=16, engines=["onnxruntime"])
    assert stage_config(load_recipe(None, []), "doctor") == DoctorConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["a.pt", "--data", "digits", "--engine", "tflite"])
