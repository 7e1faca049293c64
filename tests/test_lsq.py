"""LSQ quantizers against hand-computed quantization, LSQ's step-gradient formula, a brute-force MSE scan."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repq.errors import RepqError
from repq.quant.lsq import (
    LSQActQuantizer,
    LSQConv2d,
    LSQLinear,
    LSQQuantizer,
    quantize_plain_layers,
    weight_quantizer,
)


def _quantizer(bits, signed, step, channels=None):
    q = LSQQuantizer(bits, signed, channels=channels)
    with torch.no_grad():
        q.step.copy_(torch.as_tensor(step, dtype=torch.float32).reshape(-1))
    q.initialized.fill_(True)
    return q


@pytest.mark.parametrize("bits,signed,lo,hi", [(8, True, -128, 127), (4, True, -8, 7), (2, True, -2, 1),
                                                (8, False, 0, 255), (3, False, 0, 7)])
def test_forward_is_round_of_clamp_times_step(bits, signed, lo, hi):
    step = 0.37
    q = _quantizer(bits, signed, step)
    x = torch.linspace(-60, 120, 1001)
    expected = [min(max(round(v / step), lo), hi) * step for v in x.tolist()]  # python round: half to even
    assert torch.allclose(q(x), torch.tensor(expected, dtype=torch.float32), atol=1e-5)
    assert (q.qn, q.qp) == (lo, hi)


def test_bits_outside_2_to_8_are_refused():
    for bits in (1, 9, 16):
        with pytest.raises(RepqError, match="bit"):
            LSQQuantizer(bits)


def test_step_gradient_matches_lsq_formula_by_hand():
    # 4-bit signed: Qn=-8, Qp=7, step 0.5, per tensor (weight-like: N = numel = 5).
    q = _quantizer(4, True, 0.5)
    x = torch.tensor([0.3, -1.26, 2.9, 5.0, -7.0], requires_grad=True)
    coeff = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5])
    (q(x) * coeff).sum().backward()
    # dQ/ds: round(x/s) - x/s inside [Qn, Qp]; Qn or Qp where clipped.
    # x/s = 0.6, -2.52, 5.8, 10 (>7), -14 (<-8)
    per_element = [round(0.6) - 0.6, round(-2.52) + 2.52, round(5.8) - 5.8, 7.0, -8.0]
    grad_scale = 1.0 / math.sqrt(5 * 7)
    expected = sum(c * d for c, d in zip(coeff.tolist(), per_element, strict=True)) * grad_scale
    assert q.step.grad.item() == pytest.approx(expected, rel=1e-5)
    # straight-through: gradient passes inside the range, is cut where clipped
    assert x.grad.tolist() == pytest.approx([1.0, -2.0, 0.5, 0.0, 0.0])


def test_activation_grad_scale_uses_features_per_sample():
    q = LSQActQuantizer(8)
    x = torch.randn(4, 3, 5, 5)
    assert q.grad_scale(x) == pytest.approx(1.0 / math.sqrt(3 * 5 * 5 * 127))
    w = weight_quantizer(8, out_channels=6)
    assert w.grad_scale(torch.randn(6, 3, 3, 3)) == pytest.approx(1.0 / math.sqrt(27 * 127))


def test_per_channel_steps_are_independent():
    q = _quantizer(8, True, [0.1, 1.0, 10.0], channels=3)
    w = torch.full((3, 2, 1, 1), 0.55)
    out = q(w)
    assert out[0].flatten().tolist() == pytest.approx([0.6, 0.6])  # 5.5 -> 6 (half to even) * 0.1
    assert out[1].flatten().tolist() == pytest.approx([1.0, 1.0])
    assert out[2].flatten().tolist() == pytest.approx([0.0, 0.0])
    with pytest.raises(RepqError, match="channel"):
        q(torch.zeros(4, 2, 1, 1))


def _brute_force_mse_step(values, qn, qp):
    values = np.asarray(values, dtype=np.float64)
    top = max(values.max() / qp, values.min() / qn if qn < 0 else 0.0)
    steps = np.linspace(top / 4000, top, 4000)
    errs = [np.mean((np.clip(np.round(values / s), qn, qp) * s - values) ** 2) for s in steps]
    return steps[int(np.argmin(errs))], min(errs)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_minerror_init_reaches_the_brute_force_minimum(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3000, generator=gen) * 2.0
    x[:5] *= 8  # outliers: the max step is far from the best one at low bits
    q = LSQQuantizer(bits, signed=True, init="minerror")
    q.init_step(x)
    _, best_err = _brute_force_mse_step(x.numpy(), q.qn, q.qp)
    s = q.step.item()
    err = np.mean((np.clip(np.round(x.numpy() / s), q.qn, q.qp) * s - x.numpy()) ** 2)
    assert err <= best_err * 1.005
    max_q = LSQQuantizer(bits, signed=True, init="max")
    max_q.init_step(x)
    assert max_q.step.item() == pytest.approx(max(x.max().item() / q.qp, x.min().item() / q.qn))
    if bits <= 4:
        assert s < max_q.step.item() * 0.8  # MinError clips the outliers


def test_minerror_per_channel_and_first_batch_only():
    w = torch.randn(4, 8, 3, 3)
    w[2] *= 100
    q = weight_quantizer(4, out_channels=4, init="minerror")
    q(w)
    steps = q.step.detach().clone()
    assert steps[2] > 20 * steps[0]
    for c in range(4):
        _, best = _brute_force_mse_step(w[c].flatten().numpy(), -8, 7)
        s = steps[c].item()
        err = np.mean((np.clip(np.round(w[c].numpy() / s), -8, 7) * s - w[c].numpy()) ** 2)
        assert err <= best * 1.005
    q(w * 3)  # later batches do not re-initialise
    assert torch.equal(q.step.detach(), steps)


@pytest.mark.parametrize("bits", [4, 8])
def test_default_weight_steps_keep_a_merged_kernels_identity_taps(bits):
    """A QARepVGG-style merged kernel: small 3x3 taps plus an identity of 1 on each centre tap. MinError (the
    weight-MSE optimum) clips those taps at 4 bits, which sank CIFAR QARepVGG-A0 (NaN loss); the default keeps
    them to within half a step."""
    torch.manual_seed(0)
    w = 0.05 * torch.randn(16, 16, 3, 3)
    w[torch.arange(16), torch.arange(16), 1, 1] += 1.0
    centre = w[torch.arange(16), torch.arange(16), 1, 1]
    default = weight_quantizer(bits, out_channels=16)
    kept = default(w)[torch.arange(16), torch.arange(16), 1, 1]
    assert torch.all((kept - centre).abs() <= default.effective_step() / 2 + 1e-6)
    if bits == 4:
        minerror = weight_quantizer(bits, out_channels=16, init="minerror")
        clipped = minerror(w)[torch.arange(16), torch.arange(16), 1, 1]
        assert torch.all(clipped < 0.95 * centre)


def test_unknown_init_is_refused():
    with pytest.raises(RepqError, match="minerror"):
        LSQQuantizer(8, init="percentile")


def test_lsq_conv_equals_conv_of_hand_quantized_tensors():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=True)
    qconv = LSQConv2d.from_conv(conv, w_bits=4, a_bits=8)
    x = torch.randn(2, 3, 6, 6)
    out = qconv(x)  # first call initialises both steps
    sa = qconv.input_quantizer.step.item()
    sw = qconv.weight_quantizer.step.detach().reshape(-1, 1, 1, 1)
    xq = torch.clamp(torch.round(x / sa), -128, 127) * sa
    wq = torch.clamp(torch.round(conv.weight.detach() / sw), -8, 7) * sw
    assert torch.allclose(out, F.conv2d(xq, wq, conv.bias, padding=1), atol=1e-5)


def test_quantize_plain_layers_swaps_convs_and_linears_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    quantize_plain_layers(model, w_bits=4, a_bits=4)
    assert isinstance(model[0], LSQConv2d) and isinstance(model[4], LSQLinear)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_a_step_pushed_through_zero_quantizes_with_its_magnitude_and_keeps_a_gradient():
    from repq.quant.lsq import export_ranges

    weights = torch.tensor([[0.303, -0.417], [0.1231, 0.0507]])
    q = _quantizer(8, True, [0.01, -0.002], channels=2)
    out = q(weights.reshape(2, 2, 1, 1)).reshape(2, 2)
    hand = torch.stack([torch.clamp(torch.round(weights[c] / s), -128, 127) * s
                        for c, s in enumerate((0.01, 0.002))])
    assert torch.allclose(out, hand, atol=1e-7)  # not a dead channel quantized with a clamped step
    out.sum().backward()
    assert q.step.grad is not None and q.step.grad[1] != 0
    conv = LSQConv2d(2, 2, 1)
    conv.weight_quantizer, conv.input_quantizer = q, _quantizer(8, True, -0.05)
    (in_amax, w_amax), = export_ranges(nn.Sequential(conv)).values()
    assert in_amax == pytest.approx(0.05 * 127) and torch.allclose(w_amax, torch.tensor([0.01, 0.002]) * 127)
