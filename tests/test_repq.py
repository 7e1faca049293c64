"""RepQ layers against independent truth: the block's own fuse() + hand quantization, the block's own forward
(BN inputs caught by hooks), explicit convs for BNEst, gradient reach, and training on real CIFAR images."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repq.errors import RepqError
from repq.quant.lsq import LSQConv2d, LSQLinear
from repq.quant.repq import MODES, RepQBlock, estimated_stats, patch_mean, wrap_model
from repq.reparam import BLOCKS, create_model, fuse_model

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10" / "train"


def _block(kind: str, stride: int = 1, groups: int = 1) -> nn.Module:
    torch.manual_seed(0)
    if kind == "ecb":
        block = BLOCKS[kind](4, 4, with_identity=True)
    else:
        block = BLOCKS[kind](4, 4, 3, stride, groups)
    # Non-trivial BN statistics and affine parameters, so folding is exercised.
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
            elif isinstance(m, nn.Conv2d) and m.weight.abs().sum() == 0:
                m.weight.normal_(0, 0.1)
    return block


BLOCK_CASES = [("repvgg", 1, 1), ("repvgg", 2, 2), ("qarepvgg", 1, 1), ("acb", 2, 1), ("dbb", 1, 2),
               ("orepa", 1, 1), ("ecb", 1, 1), ("mobileone", 1, 4)]


def _hand_quant(t: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return torch.clamp(torch.round(t / step), lo, hi) * step


@pytest.mark.parametrize("kind,stride,groups", BLOCK_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_eval_equals_fused_block_with_hand_quantized_weight_and_input(kind, stride, groups, mode):
    wrapped = RepQBlock(_block(kind, stride, groups), mode, w_bits=4, a_bits=8)
    x = torch.randn(2, 4, 9, 9)
    wrapped.train()(x)  # one training step's forward: sets the steps (and moves BN statistics in bn/bnest)
    wrapped.eval()
    fused = copy.deepcopy(wrapped.block).fuse().reparam_conv  # the block's own fuse, with running stats
    sw = wrapped.weight_quantizer.step.detach().reshape(-1, 1, 1, 1)
    sa = wrapped.input_quantizer.step.detach()
    expected = F.conv2d(_hand_quant(x, sa, -128, 127), _hand_quant(fused.weight, sw, -8, 7), fused.bias,
                        fused.stride, fused.padding, fused.dilation, fused.groups)
    with torch.no_grad():
        out = wrapped(x)
        deployed = wrapped.fuse()
        assert isinstance(deployed, LSQConv2d)
        assert torch.allclose(out, expected, atol=1e-5)
        assert torch.allclose(deployed(x), out, atol=1e-6)
        codes = deployed.weight / sw
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 8 + 1e-4


def _bn_inputs(block: nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    caught = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out: caught.__setitem__(id(mod), inp[0].detach()))
             for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    block(x)
    for h in hooks:
        h.remove()
    return caught


def _bns(block: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]


def _algorithm1_truth(block: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batch mean and biased var of every BN input, from the block's own forward, where inner BNs normalise
    with the Algorithm-1 statistics (batch mean, updated running var). Iterated to a fixed point so outer BNs
    see inner BNs folded that way."""
    probe = copy.deepcopy(block).train()
    bns = _bns(probe)
    old = {id(m): (m.running_mean.clone(), m.running_var.clone()) for m in bns}
    stats = {}
    for _ in range(3):
        inputs = _bn_inputs(probe, x)
        stats = {k: (v.mean(dim=(0, 2, 3)), v.var(dim=(0, 2, 3), unbiased=False), v[:, 0].numel())
                 for k, v in inputs.items()}
        for m in bns:  # the next pass: inner BNs fold with (batch mean, updated running var)
            mean, var, n = stats[id(m)]
            m.eval()
            m.running_mean.copy_(mean)
            m.running_var.copy_((1 - m.momentum) * old[id(m)][1] + m.momentum * var * n / (n - 1))
    return [stats[id(m)][:2] for m in bns]


@pytest.mark.parametrize("kind,stride,groups", [c for c in BLOCK_CASES if c[0] != "ecb"])
def test_repq_bn_batch_stats_equal_the_branch_convs_and_update_running_stats(kind, stride, groups):
    block = _block(kind, stride, groups)
    x = torch.randn(3, 4, 10, 10) * 2 + 0.5
    truth = _algorithm1_truth(block, x)
    wrapped = RepQBlock(copy.deepcopy(block), "bn")
    taps_before = {n: (t.bn.running_mean.clone(), t.bn.running_var.clone())
                   for n, t in block.bn_taps().items()}
    wrapped.train()(x)
    taps = wrapped.block.bn_taps()
    assert set(wrapped.last_batch_stats) == set(taps)
    for name, (mean, var) in wrapped.last_batch_stats.items():
        true_mean, true_var = truth[_bns(wrapped.block).index(taps[name].bn)]
        assert torch.allclose(mean, true_mean, atol=1e-5, rtol=1e-4), name
        assert torch.allclose(var, true_var, atol=1e-5, rtol=1e-4), name
        bn, (rm, _) = taps[name].bn, taps_before[name]
        expected = (1 - bn.momentum) * rm + bn.momentum * true_mean
        assert torch.allclose(bn.running_mean, expected, atol=1e-5), name


def test_bnest_mean_is_exact_for_1x1_and_for_any_kernel_without_border_effects():
    torch.manual_seed(1)
    x = torch.randn(4, 6, 12, 12) * torch.rand(1, 6, 1, 1) * 3 + torch.randn(1, 6, 1, 1)
    var_x, mean_x = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    w1 = torch.randn(5, 6, 1, 1)
    est_mean, _ = estimated_stats(mean_x, var_x, w1, None, 1)
    assert torch.allclose(est_mean, F.conv2d(x, w1).mean(dim=(0, 2, 3)), atol=1e-5)
    # kxk, grouped: with circular padding every pixel enters every output tap once, so no border effect
    w3 = torch.randn(6, 3, 3, 3)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), w3, groups=2)
    est_mean, _ = estimated_stats(mean_x, var_x, w3, torch.ones(6), 2)
    assert torch.allclose(est_mean, y.mean(dim=(0, 2, 3)) + 1, atol=1e-4)


@pytest.mark.parametrize("kernel,stride,padding,groups", [((3, 3), 1, (1, 1), 1), ((3, 3), 2, (1, 1), 2),
                                                          ((1, 3), 2, (0, 1), 1), ((1, 1), 1, (0, 0), 3)])
def test_patch_mean_is_the_exact_conv_mean(kernel, stride, padding, groups):
    torch.manual_seed(3)
    x = torch.randn(3, 6, 11, 9) + torch.randn(1, 6, 1, 1)
    w, b = torch.randn(6, 6 // groups, *kernel), torch.randn(6)
    y = F.conv2d(x, w, b, stride, padding, 1, groups)
    assert torch.allclose(patch_mean(x, w, b, stride, padding, groups), y.mean(dim=(0, 2, 3)), atol=1e-5)


def test_bnest_variance_matches_for_independent_input_channels():
    gen = torch.Generator().manual_seed(2)
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0]).reshape(1, 4, 1, 1)
    x = torch.randn(64, 4, 32, 32, generator=gen) * scales + 1.0  # independent channels and pixels
    var_x, mean_x = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    w = torch.randn(8, 4, 3, 3, generator=gen)
    y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), w)
    _, est_var = estimated_stats(mean_x, var_x, w, None, 1)
    true_var = y.var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(est_var, true_var, rtol=0.05)
    # correlated channels (a copy of channel 0): the diagonal estimate misses the covariance term
    x_corr = torch.cat([x[:, :1], x[:, :1]], dim=1)
    var_c, mean_c = torch.var_mean(x_corr, dim=(0, 2, 3), unbiased=False)
    w_pos = w[:, :2].abs()
    _, est_c = estimated_stats(mean_c, var_c, w_pos, None, 1)
    true_c = F.conv2d(F.pad(x_corr, (1, 1, 1, 1), mode="circular"), w_pos).var(dim=(0, 2, 3))
    assert (est_c < true_c * 0.9).all()


@pytest.mark.parametrize("kind,stride,groups", BLOCK_CASES)
@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_every_branch_weight_bn_affine_and_step(kind, stride, groups, mode):
    """Every parameter the float block trains (its own forward: BN in train mode for bn/bnest, frozen BN
    statistics for repq) gets a gradient through RepQ, and so does every step size. (An inner BN's bias in
    front of an outer BN, QARepVGG's or DBB's, has none in either: the outer BN's batch mean removes it.)"""
    block = _block(kind, stride, groups)
    wrapped = RepQBlock(copy.deepcopy(block), mode, w_bits=4, a_bits=4).train()
    x = torch.randn(2, 4, 8, 8)
    wrapped(x)  # initialise steps
    probe = torch.randn_like(wrapped(x))  # a loss that depends on the output's spatial pattern
    (wrapped(x) * probe).sum().backward()
    reference = block.train() if mode != "repq" else block.eval()
    (reference(x) * probe).sum().backward()
    largest = max(p.grad.abs().max().item() for p in reference.parameters())
    trained = {n for n, p in reference.named_parameters() if p.grad.abs().max() > 1e-5 * largest}
    untrained = {n for n, _ in reference.named_parameters()} - trained
    assert all(n.endswith("bn.bias") for n in untrained), untrained  # only inner BN biases, as explained
    for name, p in wrapped.named_parameters():
        if name.startswith("block.") and name[len("block."):] not in trained:
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def _cifar_batch(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    classes = sorted(d.name for d in CIFAR.iterdir())[:4]
    images, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted((CIFAR / cls).iterdir())[: n // len(classes)]:
            images.append(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return (x - 0.5) / 0.25, torch.tensor(labels)


def _tiny_net() -> nn.Module:
    return nn.Sequential(BLOCKS["repvgg"](3, 16, 3, 2), nn.ReLU(), BLOCKS["qarepvgg"](16, 16), nn.ReLU(),
                         BLOCKS["acb"](16, 32, 3, 2), nn.ReLU(), BLOCKS["dbb"](32, 32, 3, 1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


@pytest.fixture(scope="module")
def pretrained_on_cifar():
    """A tiny four-family re-param net trained briefly in float on 64 real CIFAR images (QAT fine-tunes a
    trained model), with its BN running statistics re-estimated on those images."""
    if not CIFAR.is_dir():
        pytest.skip("shared CIFAR-10 images not found at ../shared/datasets/cifar10/train")
    torch.manual_seed(0)
    x, y = _cifar_batch()
    model = _tiny_net()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        model(x)
    for bn in bns:
        bn.momentum = 0.1
    return model, x, y


@pytest.mark.parametrize("bits,mode", [(8, "bn"), (4, "bnest"), (2, "bn")])
def test_training_lowers_the_loss_on_real_images(pretrained_on_cifar, bits, mode):
    fp, x, y = pretrained_on_cifar
    torch.manual_seed(0)
    model = wrap_model(copy.deepcopy(fp), mode, w_bits=bits, a_bits=bits).train()  # first/last: 8 bits
    opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.97 * losses[0], losses


def test_wrap_model_wraps_every_block_and_fuse_model_gives_quantized_deploy_model():
    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125)
    n_blocks = sum(1 for m in model.modules() if m.__class__.__name__ == "RepVGGBlock")
    wrap_model(model, "bn", w_bits=4, a_bits=4)
    layers = [m for m in model.modules() if isinstance(m, RepQBlock)]
    assert len(layers) == n_blocks
    assert isinstance(model.head[2], LSQLinear)
    assert layers[0].weight_quantizer.bits == 8  # first layer: 8 bits
    assert layers[1].weight_quantizer.bits == 4
    x = torch.randn(4, 3, 16, 16)
    model.train()(x)
    model.eval()
    deployed = fuse_model(model).eval()
    assert not any(isinstance(m, RepQBlock) for m in deployed.modules())
    assert sum(isinstance(m, LSQConv2d) for m in deployed.modules()) == n_blocks
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-5)


def test_wrap_model_refuses_bad_input():
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125)
    with pytest.raises(RepqError, match="mode"):
        wrap_model(model, "bnx")
    with pytest.raises(RepqError, match="no re-param blocks"):
        wrap_model(nn.Sequential(nn.Conv2d(3, 4, 3)))
    with pytest.raises(RepqError, match="already fused"):
        wrap_model(fuse_model(model))
    with pytest.raises(RepqError, match="never run"):
        fuse_model(wrap_model(model))


def _ort_vs_torch(model: nn.Module, x: torch.Tensor, path: Path) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    from repq.quant.finetune import export_quantized

    model.train()(x)
    model.eval()
    path = export_quantized(model, path, "tensorrt", (1, *x.shape[1:]), dynamic_batch=True)
    op_types = {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x).numpy()
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0], expected


@pytest.mark.parametrize("kind,stride", [("repvgg", 2), ("qarepvgg", 1), ("acb", 1), ("dbb", 2), ("orepa", 1)])
def test_exported_qdq_onnx_equals_the_repq_model_in_onnx_runtime(tmp_path, kind, stride):
    torch.manual_seed(0)
    net = nn.Sequential(BLOCKS[kind](3, 8, 3, stride), nn.ReLU(), BLOCKS[kind](8, 8, 3, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    got, expected = _ort_vs_torch(wrap_model(net, "bn"), torch.randn(8, 3, 12, 12), tmp_path / "m.onnx")
    per_sample = np.abs(got - expected).max(axis=1) / max(1.0, np.abs(expected).max())
    # Most samples agree at float rounding; a sample where float rounding moved one value across a rounding
    # boundary of the next quantizer is off by that one code step, never more.
    assert (per_sample <= 1e-6).mean() >= 0.5, per_sample
    assert per_sample.max() <= 1e-2, per_sample


def test_exported_deeper_model_differs_only_by_rounding_boundary_flips(tmp_path):
    """Deeper and wider, float rounding (ORT vs PyTorch conv sums) moves a few values across a rounding
    boundary of the next quantizer: one code step, not a systematic difference."""
    torch.manual_seed(0)
    model = wrap_model(_tiny_net(), "bnest")
    got, expected = _ort_vs_torch(model, torch.randn(8, 3, 16, 16), tmp_path / "m.onnx")
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert np.abs(got - expected).max() <= 1e-2 * np.abs(expected).max()


def test_finetune_checkpoint_rebuilds_the_same_quantized_model():
    from repq.quant.finetune import quantized_model, rebuild

    torch.manual_seed(0)
    float_model = create_model("qarepvgg_a0", num_classes=10, cifar=True, width_mult=0.125)
    arch = dict(float_model.repq_arch)
    model = quantized_model(float_model, method="bnest_corrected", w_bits=4, a_bits=8)
    x = torch.randn(4, 3, 8, 8)
    model.train()(x)
    rebuilt = rebuild({"arch": arch, "quant": model.repq_quant, "state_dict": model.state_dict()})
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_unsigned_activations_keep_the_image_input_signed():
    model = wrap_model(_tiny_net(), "bnest", 8, 8, act_signed=False)
    layers = [m for m in model.modules() if isinstance(m, (RepQBlock, LSQLinear))]
    assert layers[0].input_quantizer.signed and layers[0].input_quantizer.qn == -128
    assert all(not m.input_quantizer.signed and m.input_quantizer.qn == 0 for m in layers[1:])


def test_bnest_first_batch_calibration_keeps_a_trained_model_the_same_function(pretrained_on_cifar):
    """Train-mode forwards with no weight update move BN running statistics towards the batch statistics.
    RepQ-BN's are exact, so the function stays; BNEst's uncorrected estimates (equation 6 ignores the
    covariance of real activations) drift it away; the first-batch correction keeps it where RepQ-BN is."""
    fp, x, _ = pretrained_on_cifar
    with torch.no_grad():
        reference = fp.eval()(x)

    def drift(mode: str, **kwargs) -> float:
        model = wrap_model(copy.deepcopy(fp), mode, 8, 8, **kwargs).train()
        with torch.no_grad():
            for start in range(0, len(x), 16):
                model(x[start:start + 16])
            out = model.eval()(x)
        return ((out - reference).norm() / reference.norm()).item()

    exact, corrected, paper = drift("bn"), drift("bnest"), drift("bnest", bnest_calibrate=False)
    assert corrected < 2 * exact + 0.02
    assert paper > 2 * corrected


def test_bnest_correction_buffers_survive_a_save_and_rebuild(tmp_path):
    from repq.quant.finetune import rebuild

    model = create_model("repvgg_a0", num_classes=4, cifar=True, width_mult=0.125)
    wrapped = wrap_model(model, "bnest", 8, 8).train()
    wrapped(torch.randn(4, 3, 16, 16))
    block = next(m for m in wrapped.modules() if isinstance(m, RepQBlock))
    assert bool(block.bnest_calibrated)
    state = wrapped.state_dict()
    again = rebuild({"arch": model.repq_arch, "quant": wrapped.repq_quant, "state_dict": state})
    for key, value in again.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_channel_moments_equal_var_mean_even_with_a_large_offset():
    from repq.quant.repq import channel_moments

    y = torch.randn(8, 5, 7, 6) * torch.tensor([0.01, 1.0, 3.0, 0.5, 2.0]).reshape(1, 5, 1, 1)
    y = y + torch.tensor([50.0, -2.0, 0.0, 10.0, 1.0]).reshape(1, 5, 1, 1)  # mean >> std in channel 0
    true_var, true_mean = torch.var_mean(y.double(), dim=(0, 2, 3), unbiased=False)
    for layout in (torch.contiguous_format, torch.channels_last):
        var, mean = channel_moments(y.contiguous(memory_format=layout))
        assert torch.allclose(mean.double(), true_mean, rtol=1e-6, atol=1e-6)
        assert torch.allclose(var.double(), true_var, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("name,kwargs", [("plain_a0", {"width_mult": 0.125}), ("resnet18", {})])
def test_plain_models_get_lsq_on_bn_folded_convs_and_rebuild(name, kwargs):
    """The Plain baseline: a model trained without re-param (single conv-BN layers, or torchvision's plain
    ResNet-18) has its BNs folded and LSQ on every conv; with the quantizers off it is the FP model."""
    from repq.quant.finetune import quantized_model, rebuild
    from repq.quant.lsq import without_quantizers

    torch.manual_seed(0)
    float_model = create_model(name, num_classes=10, cifar=True, **kwargs)
    x = torch.randn(4, 3, 16, 16)
    float_model.train()(x)  # non-trivial BN running statistics
    arch = dict(float_model.repq_arch)
    model = quantized_model(float_model, method="merged", w_bits=8, a_bits=8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in float_model.modules() if isinstance(m, nn.Conv2d)]
    assert len([m for m in model.modules() if isinstance(m, LSQConv2d)]) == len(convs)
    model.train()(x)  # sets the steps
    with torch.no_grad():
        expected = float_model.eval()(x)
        quantized = model.eval()(x)
        assert 0 < (quantized - expected).abs().max() < 0.1 * expected.abs().max()
        assert torch.allclose(without_quantizers(copy.deepcopy(model))(x), expected, atol=1e-4, rtol=1e-4)
    rebuilt = rebuild({"arch": arch, "quant": model.repq_quant, "state_dict": model.state_dict()})
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), quantized)


def test_distillation_loss_is_the_cross_entropy_to_the_fp_model_and_mixes_with_the_labels():
    from repq.quant.finetune import distillation_teacher, finetune_loss

    torch.manual_seed(0)
    fp = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125).eval()
    teacher = distillation_teacher(fp, 0.5)
    images, labels = torch.randn(6, 3, 16, 16), torch.randint(0, 10, (6,))
    with torch.no_grad():
        fp_logits = fp(images)
    assert torch.allclose(teacher(images), fp_logits, atol=1e-4)  # the fused FP model
    student = torch.randn(6, 10)
    by_hand = -(torch.softmax(fp_logits, 1) * torch.log_softmax(student, 1)).sum(1).mean()
    assert torch.allclose(finetune_loss(student, images, labels, 0.0, teacher, 1.0), by_hand, atol=1e-5)
    mixed = 0.7 * F.cross_entropy(student, labels) + 0.3 * by_hand
    assert torch.allclose(finetune_loss(student, images, labels, 0.0, teacher, 0.3), mixed, atol=1e-5)
    assert distillation_teacher(fp, 0.0) is None
    with pytest.raises(RepqError, match="outside"):
        distillation_teacher(fp, 1.5)


@pytest.mark.parametrize("mode", ["bn", "bnest"])
def test_bn_recalibration_averages_the_batch_statistics_of_the_final_weights(mode):
    """The stem block reads the image, so its dense BN's statistics can be computed independently: after
    recalibrating over 3 batches, the running mean/var are the plain averages of the 3 batch statistics."""
    from repq.quant.finetune import recalibrate_bn

    torch.manual_seed(0)
    model = wrap_model(create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125), mode)
    batches = [(torch.randn(8, 3, 16, 16) * 2 + 0.5, torch.zeros(8, dtype=torch.long)) for _ in range(4)]
    model(batches[0][0])  # initialise the steps (and BNEst's first-batch correction)
    stem = next(m for m in model.modules() if isinstance(m, RepQBlock))
    name, tap = next(iter(stem.block.bn_taps().items()))
    momentum = tap.bn.momentum
    seen = []  # the statistics the block used for each batch (BNEst: its corrected estimates)

    def loader():
        for batch in batches:
            yield batch
            seen.append(stem.last_batch_stats[name])

    assert recalibrate_bn(model.eval(), loader(), 3) > 0
    seen.append(stem.last_batch_stats[name])
    count = 8 * 16 * 16
    used_mean = torch.stack([m for m, _ in seen]).mean(0)
    used_var = torch.stack([v * count / (count - 1) for _, v in seen]).mean(0)
    assert torch.allclose(tap.bn.running_mean, used_mean, atol=1e-5)
    assert torch.allclose(tap.bn.running_var, used_var, rtol=1e-4, atol=1e-6)
    if mode == "bn":  # and RepQ-BN's are the exact statistics of the branch conv
        weight, bias = tap.kernel(None)
        outs = [F.conv2d(x, weight, bias, tap.stride, tap.padding, 1, tap.groups) for x, _ in batches[:3]]
        assert torch.allclose(tap.bn.running_mean, torch.stack([y.mean(dim=(0, 2, 3)) for y in outs]).mean(0),
                              atol=1e-4)
        assert torch.allclose(tap.bn.running_var, torch.stack([y.var(dim=(0, 2, 3)) for y in outs]).mean(0),
                              rtol=1e-4, atol=1e-5)
    assert int(tap.bn.num_batches_tracked) == 3 and tap.bn.momentum == momentum and not model.training


def test_bn_recalibration_leaves_frozen_statistics_alone():
    from repq.quant.finetune import recalibrate_bn

    torch.manual_seed(0)
    model = wrap_model(create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125), "repq")
    x = torch.randn(8, 3, 16, 16)
    before = model.eval()(x)
    assert recalibrate_bn(model, [(x, None)] * 2, 2) == 0
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("mode", ["bn", "bnest"])
def test_freezing_bn_makes_the_last_steps_train_the_deploy_kernel(mode):
    """finetune(freeze_bn_at=0.5) over 4 steps: recalibration over 2 batches after step 2, then the running
    statistics stay as recalibrated, a training forward equals the eval forward (the fused deploy model), and
    the steps still move every branch weight, BN affine parameter and quantizer step."""
    from repq.quant.finetune import finetune

    torch.manual_seed(0)
    model = wrap_model(create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125), mode, 4, 4)
    images, labels = torch.randn(16, 3, 16, 16) * 2 + 0.5, torch.randint(0, 10, (16,))
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=8)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    snapshots = []

    def log(message):
        if "frozen" in message:
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
            snapshots.append([(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns])

    assert len(finetune(model, batches, epochs=2, lr=0.05, log=log, recalibrate_bn=2, freeze_bn_at=0.5)) == 4
    params, stats = snapshots
    assert all(int(bn.num_batches_tracked) == 2 for bn in bns)  # the recalibration's 2 batches, then no update
    for bn, (mean, var) in zip(bns, stats, strict=True):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, params[n])}
    for kind in ("rbr_dense.conv.weight", "rbr_1x1.conv.weight", "bn.weight", "bn.bias", "quantizer.step"):
        assert any(n.endswith(kind) for n in moved), kind
    x = images[:8]
    with torch.no_grad():
        trained = model.train()(x)
        assert torch.allclose(trained, model.eval()(x), atol=1e-6)
        assert torch.allclose(trained, fuse_model(copy.deepcopy(model))(x), atol=1e-4)
    with pytest.raises(RepqError, match="freeze-bn-at"):
        finetune(model, batches, epochs=1, lr=0.05, log=log, freeze_bn_at=1.0)


def test_training_forward_differs_from_eval_until_bn_is_frozen():
    """The control for the test above: RepQ-BNEst in training merges with batch statistics."""
    from repq.quant.repq import freeze_bn_statistics

    torch.manual_seed(0)
    model = wrap_model(create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125), "bnest", 4, 4)
    x = torch.randn(8, 3, 16, 16) * 2 + 0.5
    with torch.no_grad():
        model.train()(x)  # steps and BNEst's correction set on this batch
        assert not torch.allclose(model.train()(x), model.eval()(x), atol=1e-3)
        assert freeze_bn_statistics(model) == sum(isinstance(m, RepQBlock) for m in model.modules())
        assert torch.equal(model.train()(x), model.eval()(x))


@pytest.mark.parametrize("method", ["bnest_corrected", "merged"])
def test_weight_init_picks_the_weight_steps_start_and_first_last_layers_keep_their_default(method):
    from repq.quant.finetune import quantized_model
    from repq.quant.repq import quantized_layers

    def weight_inits(weight_init):
        torch.manual_seed(0)
        model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.25)
        model = quantized_model(model, method=method, w_bits=4, a_bits=4, weight_init=weight_init)
        return [(m.weight_quantizer.bits, m.weight_quantizer.init) for m in quantized_layers(model).values()]

    default, minerror = weight_inits(None), weight_inits("minerror")
    assert len(default) == 23  # stem, 21 body convs, head
    assert default == [(8, "max")] + [(4, "max")] * 21 + [(8, "max")]  # max from 4 bits up
    assert minerror == [(8, "max")] + [(4, "minerror")] * 21 + [(8, "max")]  # 8-bit first/last keep max


def _digits_finetune_setup():
    from repq.calibration.datasets import load_data
    from repq.calibration.loaders import build_loaders

    torch.manual_seed(0)
    model = wrap_model(create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125), "bnest", 4, 4)
    loader, _ = build_loaders(load_data("digits"), 64, seed=0)  # seeded order and augmentation per epoch
    return model, loader


class _Killed(Exception):
    pass


def _count_forwards(model: nn.Module, kill_at: int | None = None) -> list[int]:
    """Count the model's training forwards; raise _Killed at forward number ``kill_at`` (a kill mid-step)."""
    calls = [0]

    def hook(module, args):
        calls[0] += 1
        if calls[0] == kill_at:
            raise _Killed

    model.register_forward_pre_hook(hook)
    return calls


@pytest.mark.parametrize(("kill_at", "saved_step", "forwards_left"), [(38, 27, 13), (45, 30, 8)],
                         ids=["before-the-freeze", "after-the-freeze"])
def test_an_interrupted_finetune_resumes_to_the_same_weights(tmp_path, kill_at, saved_step, forwards_left):
    """A fine-tune of 1.5 x 25 batches killed mid-step in its second epoch, before or after BN freezes at step
    30, and run again with the same state file continues from its last saved state (every 9 steps, and at the
    freeze) and ends bit-exactly where an uninterrupted run ends: same weights, steps, statistics, losses. The
    resumed run takes only the steps after that state (a restart would end there too, so this is what shows it
    continued), plus the freeze's 2 recalibration batches when the state predates the freeze. The model is
    untrained, so its BN statistics are stale: the killed run re-estimated them over 8 batches before step 0
    (plus one probe forward), which the resumed run must not repeat."""
    from repq.quant.finetune import STALE_BN_BATCHES, finetune

    assert STALE_BN_BATCHES == 8  # the kill points count these forwards

    settings = dict(epochs=1.5, lr=0.05, recalibrate_bn=2, freeze_bn_at=0.8, save_every=9, log=lambda _: None)
    reference, loader = _digits_finetune_setup()
    expected_losses = finetune(reference, loader, **settings)
    total = len(expected_losses)
    assert len(loader) == 25 and total == 38

    state = tmp_path / "state.pt"
    killed, loader = _digits_finetune_setup()
    _count_forwards(killed, kill_at)
    with pytest.raises(_Killed):
        finetune(killed, loader, state_path=state, **settings)
    assert len(torch.load(state, weights_only=True)["train_state"]["losses"]) == saved_step

    resumed, loader = _digits_finetune_setup()
    calls = _count_forwards(resumed)
    lines = []
    losses = finetune(resumed, loader, state_path=state, **{**settings, "log": lines.append})
    assert any(f"at step {saved_step}/{total}" in line for line in lines)
    assert calls[0] == forwards_left
    assert losses == expected_losses
    expected, got = reference.state_dict(), resumed.state_dict()
    assert got.keys() == expected.keys()
    assert [k for k in expected if not torch.equal(got[k], expected[k])] == []


def test_the_stale_bn_check_measures_exact_statistics_not_bnests_estimate():
    """A model whose running statistics are this batch's exact ones is not stale, whatever BNEst's estimate of
    them is (on a trained CIFAR RepVGG-A0 the estimate was a median 3x under, which the check took for
    staleness); an untrained one (running variance 1) is."""
    from repq.quant.finetune import STALE_BN_RATIO, bn_statistics_mismatch, recalibrate_bn

    torch.manual_seed(0)
    images = torch.randn(32, 3, 32, 32) * 3 + 1
    loader = [(images, torch.zeros(32, dtype=torch.long))]
    untrained = wrap_model(create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125), "bnest")
    assert bn_statistics_mismatch(untrained, loader) > STALE_BN_RATIO
    model = wrap_model(create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125), "bn")
    recalibrate_bn(model, loader, 1)  # exact statistics of this batch
    estimate = copy.deepcopy(model)
    for block in estimate.modules():
        if isinstance(block, RepQBlock):
            block.mode = "bnest"
    assert bn_statistics_mismatch(estimate, loader) == pytest.approx(1.0, rel=1e-3)
    recalibrate_bn(estimate, loader, 1)  # what the estimate makes of the same batch: not the exact figure
    ratios = [float(torch.median(a.running_var / b.running_var)) for (_, a), (_, b) in
              zip(_named_bns(estimate), _named_bns(model), strict=True)]
    assert max(max(r, 1 / r) for r in ratios) > 1.2


def _named_bns(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def test_a_finetune_state_resumes_only_the_same_plan(tmp_path):
    from repq.quant.finetune import finetune

    state = tmp_path / "state.pt"
    model, loader = _digits_finetune_setup()
    finetune(model, loader, epochs=0.5, lr=0.05, log=lambda _: None, state_path=state, save_every=5)
    with pytest.raises(RepqError, match=r"state of another run \(total_steps 13 there, 25 here; lr 0.05 there, "
                                        r"0.1 here\): rerun with its settings"):
        finetune(_digits_finetune_setup()[0], loader, epochs=1, lr=0.1, log=lambda _: None, state_path=state)
    other = wrap_model(create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.25), "bnest", 4, 4)
    with pytest.raises(RepqError, match="holds another model's fine-tune"):
        finetune(other, loader, epochs=0.5, lr=0.05, log=lambda _: None, state_path=state)
    torch.save({"state_dict": {}}, state)
    with pytest.raises(RepqError, match="is not a fine-tune's resumable state"):
        finetune(model, loader, epochs=0.5, lr=0.05, log=lambda _: None, state_path=state)
