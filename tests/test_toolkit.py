"""ModelOpt adapter: TensorRT's symmetric-INT8 convention, the four calibrators, save/restore, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from repq.calibration.calibrators import entropy_amax, mse_amax, settings
from repq.errors import RepqError
from repq.quant.toolkit import load_quantized, quantize, quantized_layers, save_quantized


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()


@pytest.fixture(scope="module")
def calib():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 12, 12, generator=gen), torch.zeros(8, dtype=torch.long)) for _ in range(3)]


@pytest.fixture(scope="module")
def max_quantized(calib):
    return quantize(tiny_net(), calib, "max", fuse=False)


def test_every_conv_and_linear_is_quantized_like_tensorrt(max_quantized, calib):
    net = tiny_net()
    layers = quantized_layers(max_quantized)
    assert sorted(layers) == ["0", "2", "6"]  # first and last layer included
    for name, layer in layers.items():
        weight = dict(net.named_modules())[name].weight.detach()
        per_channel = weight.abs().reshape(weight.shape[0], -1).max(dim=1).values
        assert torch.allclose(layer.weight_quantizer.amax.reshape(-1), per_channel)  # axis 0, max
        assert layer.input_quantizer.amax.numel() == 1  # per tensor
    first_input_max = max(float(x.abs().max()) for x, _ in calib)
    assert float(layers["0"].input_quantizer.amax) == pytest.approx(first_input_max)
    assert not layers["0"].output_quantizer.is_enabled  # recorded for export, not in the forward
    assert float(layers["0"].output_quantizer.amax) > 0


def test_fake_quant_forward_matches_hand_computed_int8(max_quantized, calib):
    x = calib[0][0]
    layer = quantized_layers(max_quantized)["0"]
    s_in = float(layer.input_quantizer.amax) / 127
    s_w = layer.weight_quantizer.amax.reshape(-1, 1, 1, 1) / 127
    xq = torch.clamp(torch.round(x / s_in), -128, 127) * s_in
    wq = torch.clamp(torch.round(layer.weight / s_w), -128, 127) * s_w
    expected = nn.functional.conv2d(xq, wq, layer.bias, padding=1)
    with torch.no_grad():
        assert torch.allclose(layer(x), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["entropy", "percentile", "mse"])
def test_histogram_calibrators_clip_inside_the_max(method, calib, max_quantized):
    q = quantize(tiny_net(), calib, method, percentile=99.9, fuse=False)
    for name, layer in quantized_layers(q).items():
        amax = float(layer.input_quantizer.amax)
        ceiling = float(quantized_layers(max_quantized)[name].input_quantizer.amax)
        assert 0 < amax <= ceiling * 1.001


def test_percentile_is_monotonic(calib):
    quantized = [quantize(tiny_net(), calib, "percentile", percentile=p, fuse=False) for p in (99.9, 99.999)]
    amaxes = [float(q[2].input_quantizer.amax) for q in quantized]
    assert amaxes[0] < amaxes[1]


def test_mse_amax_on_hand_made_histograms():
    edges = np.linspace(0, 10, 1001)
    uniform = np.ones(1000)
    assert mse_amax(uniform, edges) > 9.5  # no outliers: clipping costs more than rounding
    outlier = np.zeros(1000)
    outlier[:100] = 1e6  # bulk in [0, 1]
    outlier[-1] = 1  # one value at 10
    assert 1.0 <= mse_amax(outlier, edges) < 5.0  # clipped well below the outlier


def test_entropy_amax_equals_modelopts_search():
    from modelopt.torch.quantization.calib.histogram import _compute_amax_entropy

    rng = np.random.default_rng(0)
    values = np.abs(np.concatenate([rng.standard_normal(20000), 6 * rng.standard_normal(20)]))
    hist, edges = np.histogram(values, bins=300)
    expected = float(_compute_amax_entropy(hist.copy(), edges, 8, False))
    assert entropy_amax(hist, edges) == pytest.approx(expected, rel=1e-6)
    assert entropy_amax(hist, edges) < values.max() / 2  # the outliers are clipped


def test_skip_layers_keep_float(calib):
    q = quantize(tiny_net(), calib, "max", fuse=False, skip_layers=["6"])
    assert not q[6].input_quantizer.is_enabled and not q[6].weight_quantizer.is_enabled
    with pytest.raises(RepqError, match="did you mean"):
        quantize(tiny_net(), calib, "max", fuse=False, skip_layers=["6x"])


def test_save_and_load_without_recalibrating(tmp_path, max_quantized, calib):
    path = save_quantized(max_quantized, tmp_path / "q.pt")
    restored = load_quantized(path, tiny_net())
    x = calib[1][0]
    with torch.no_grad():
        assert torch.equal(restored(x), max_quantized(x))
    other = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(RepqError, match="does not match"):
        load_quantized(path, other)


def test_zoo_model_is_fused_before_quantizing(calib):
    from repq.reparam import create_model

    model = create_model("repvgg_a0", num_classes=5, cifar=True, width_mult=0.25).eval()
    q = quantize(model, calib[:1], "max")
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in quantized_layers(q).values())
    assert not any(hasattr(m, "rbr_1x1") or "1x1" in n for n, m in q.named_modules())
    with torch.no_grad():
        ref, out = model(calib[0][0]), q(calib[0][0])
    assert (ref - out).abs().max() < 0.1 * ref.abs().max()  # int8 noise, not a broken model


def test_bad_calibration_input(calib):
    nan = [(torch.full((2, 3, 12, 12), float("nan")), torch.zeros(2))]
    with pytest.raises(RepqError, match="NaN"):
        quantize(tiny_net(), nan, "max", fuse=False)
    with pytest.raises(RepqError, match="unknown calibrator"):
        settings("minmax")
    with pytest.raises(RepqError, match="percentile"):
        settings("percentile", percentile=95.0)


def test_qat_fine_tunes_with_the_training_loop_and_saves_amax(tmp_path):
    from repq.calibration.datasets import load_data
    from repq.calibration.loaders import calibration_loader
    from repq.quant.qat import qat
    from repq.reparam import create_model

    data = load_data("digits")
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125).eval()
    q = quantize(model, calibration_loader(data, 64, 64), "max")
    amax_before = float(quantized_layers(q)["stem.0.reparam_conv"].input_quantizer.amax)
    weight_before = q.stem[0].reparam_conv.weight.detach().clone()
    result = qat(q, data, tmp_path / "qat", epochs=1, lr=0.05, batch_size=64, max_steps_per_epoch=2)
    assert len(result["history"]) == 1 and 0 <= result["history"][0]["val_top1"] <= 100
    assert not torch.equal(q.stem[0].reparam_conv.weight, weight_before)  # gradients reached the weights
    restored = load_quantized(tmp_path / "qat" / "last.pt")  # no float model, no recalibration
    assert float(quantized_layers(restored)["stem.0.reparam_conv"].input_quantizer.amax) == amax_before
    x = calibration_loader(data, 8, 8).dataset.tensors[0]
    with torch.no_grad():
        assert torch.equal(restored(x), q(x))
    with pytest.raises(RepqError, match="already holds a QAT run"):
        qat(q, data, tmp_path / "qat", epochs=1)


def test_an_interrupted_qat_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    """Toolkit QAT shares the training loop's resumable state: killed in its second epoch (after last.pt of the
    first), rerun with resume, it ends with the weights, history and amax of a run that was never stopped."""
    from repq.calibration.datasets import load_data
    from repq.calibration.loaders import calibration_loader
    from repq.quant.qat import qat
    from repq.reparam import create_model
    from repq.training import loop as loop_module

    data = load_data("digits")
    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125).eval()
    q = quantize(model, calibration_loader(data, 64, 64), "max")
    settings = dict(epochs=2, lr=0.05, batch_size=64, max_steps_per_epoch=3, progress=False)
    whole = qat(load_quantized_copy(q, tmp_path), data, tmp_path / "whole", **settings)

    class Killed(Exception):
        pass

    real_step, steps = loop_module._optimizer_step, [0]

    def step_then_kill(loop, loss):
        steps[0] += 1
        if steps[0] == 5:  # epoch 2, second step
            raise Killed
        real_step(loop, loss)

    monkeypatch.setattr(loop_module, "_optimizer_step", step_then_kill)
    with pytest.raises(Killed):
        qat(load_quantized_copy(q, tmp_path), data, tmp_path / "killed", **settings)
    monkeypatch.setattr(loop_module, "_optimizer_step", real_step)
    resumed = qat(load_quantized_copy(q, tmp_path), data, tmp_path / "killed", resume=True, **settings)
    expected, got = whole["model"].state_dict(), resumed["model"].state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert [h["train_loss"] for h in whole["history"]] == [h["train_loss"] for h in resumed["history"]]


def load_quantized_copy(q, tmp_path):
    """A fresh copy of the PTQ model (through its file, as `repq qat` loads it)."""
    path = tmp_path / "ptq.pt"
    if not path.exists():
        save_quantized(q, path)
    return load_quantized(path)


def test_fold_batchnorm_folds_an_untraceable_model_or_refuses_in_one_line():
    """torch.fx cannot trace data-dependent control flow: conv + BN pairs inside an nn.Sequential still fold (the
    folded model computes the same function), and a BN that follows no conv there is refused, never left in."""
    from repq.quant.toolkit import fold_batchnorm

    class Untraceable(nn.Module):
        def __init__(self, tail: nn.Module):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.tail = tail

        def forward(self, x):
            x = self.body(x)
            return self.tail(x) if x.sum() > -1e9 else x  # fx cannot trace a tensor in an `if`

    torch.manual_seed(0)
    model = Untraceable(nn.Identity())
    model.train()(torch.randn(4, 3, 8, 8) * 3 + 1)  # running statistics away from their defaults
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(RepqError, match=r"^BatchNorm tail .* cannot be folded into a conv") as info:
        fold_batchnorm(Untraceable(nn.BatchNorm2d(8)).eval())
    assert "\n" not in str(info.value)


def test_a_ptq_model_of_a_substituted_network_reloads_from_its_file_alone(tmp_path):
    """load_quantized rebuilds the model with its recorded transforms (a QARepVGG made by substitution)."""
    from repq.reparam import create_model, substitute_qarepvgg

    torch.manual_seed(0)
    model = substitute_qarepvgg(create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125)).eval()
    x = torch.randn(16, 3, 32, 32)
    q = quantize(model, [(x, torch.zeros(16))], "max")
    save_quantized(q, tmp_path / "ptq.pt")
    again = load_quantized(tmp_path / "ptq.pt")
    with torch.no_grad():
        assert torch.equal(again(x), q(x))
