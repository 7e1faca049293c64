"""MobileOne against independent truth: the fused zoo models equal their train form in float64, the deploy parameter
counts are the paper's (and timm's), blocks and whole models equal timm's MobileOne with the same weights, and
RepQ-BN / RepQ-BNEst fine-tune it through the library with no per-block code."""

from pathlib import Path

import numpy as np
import pytest
import timm  # the independent MobileOne (a test extra)
import torch
from conftest import randomize_bn, rel_err
from torch import nn

from repq.quant.repq import RepQBlock
from repq.reparam import MobileOneBlock, create_model, fuse_model
from repq.reparam.mobileone import MobileOneConfig, MobileOneNet, from_timm_key

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10" / "train"
VARIANTS = ["s0", "s1", "s2", "s3", "s4"]
PAPER_MILLIONS = {"s0": 2.1, "s1": 4.8, "s2": 7.8, "s3": 10.1, "s4": 14.8}  # Vasu et al., CVPR 2023, Table 7


@pytest.fixture(autouse=True)
def _one_thread():
    """Grouped convs in float64 run one parallel region per group (26,000 a forward of S4): one thread skips their
    synchronisation, 1.6 s instead of minutes for S0 on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_bn(model: nn.Module) -> nn.Module:
    """Random BN affine parameters and running statistics, eval mode. Variances above 1 keep S0's six summed
    branches from growing the signal layer after layer. (Statistics measured on random data instead make a deep
    random network chaotic: float64 rounding then grows ~1.5x a layer, whatever the fusion.)"""
    randomize_bn(model)
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.normal_(0.0, 0.2)
            bn.running_var.uniform_(1.0, 3.0)
    return model.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_zoo_model_fuses_exactly_in_float64(variant):
    model = create_model(f"mobileone_{variant}").double()
    _random_bn(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        fused = fuse_model(model)
        got = fused(x)
    assert all(m.deployed for m in fused.modules() if isinstance(m, MobileOneBlock))
    assert expected.abs().max() > 1e-2  # a signal, not zeros
    assert (got - expected).abs().max().item() < 1e-10


@pytest.mark.parametrize("variant", VARIANTS)
def test_deploy_parameter_counts_are_the_papers_and_timms(variant):
    """The paper gives millions to one decimal; the exact count is that of timm's mobileone (the authors' released
    models), fused. (S0's 2.0785M and S1's 4.7648M are 1.0% and 0.7% under the paper's rounded 2.1M and 4.8M.)"""
    count = sum(p.numel() for p in fuse_model(create_model(f"mobileone_{variant}")).parameters())
    reference = timm.utils.model.reparameterize_model(timm.create_model(f"mobileone_{variant}"))
    assert count == sum(p.numel() for p in reference.parameters())
    assert round(count / 1e6, 1) == PAPER_MILLIONS[variant]


def _random_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Random values for every entry of a MobileOne state dict (weights, BN affine and statistics)."""
    state = {}
    for key, value in module.state_dict().items():
        if key.endswith("num_batches_tracked"):
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = torch.empty_like(value).uniform_(0.5, 2.0)
        elif key.endswith("running_mean"):
            state[key] = torch.randn_like(value) * 0.5
        elif value.dim() == 1 and ("bn" in key or "identity" in key):  # BN affine (an identity BN is bare)
            state[key] = torch.empty_like(value).uniform_(0.5, 1.5) if key.endswith("weight") else \
                torch.randn_like(value) * 0.3
        else:
            state[key] = torch.randn_like(value) * 0.3
    return state


# (in, out, kernel, stride, timm group_size, branches): depthwise, pointwise, the dense stem, a grouped one
BLOCK_CASES = [(8, 8, 3, 1, 1, 4), (8, 8, 3, 2, 1, 2), (8, 16, 1, 1, 0, 4), (16, 16, 1, 1, 0, 1),
               (3, 8, 3, 2, 0, 1), (8, 8, 3, 1, 4, 3)]


@pytest.mark.parametrize("c_in,c_out,k,stride,group_size,branches", BLOCK_CASES)
def test_block_equals_timms_with_the_same_weights(c_in, c_out, k, stride, group_size, branches):
    from timm.models.byobnet import MobileOneBlock as TimmMobileOneBlock

    theirs = TimmMobileOneBlock(c_in, c_out, kernel_size=k, stride=stride, group_size=group_size,
                                num_conv_branches=branches)
    theirs.act = nn.Identity()  # repq's blocks leave the activation outside
    theirs.load_state_dict(_random_state(theirs))
    ours = MobileOneBlock(c_in, c_out, k, stride, theirs.groups, num_conv_branches=branches)
    ours.load_state_dict(theirs.state_dict())  # the same keys: strict
    theirs.eval(), ours.eval()
    x = torch.randn(2, c_in, 9, 9)
    with torch.no_grad():
        expected = theirs(x)
        assert (ours(x) - expected).abs().max().item() < 1e-5
        theirs.reparameterize()
        ours.fuse()
        assert (ours(x) - theirs(x)).abs().max().item() < 1e-5
        assert torch.allclose(ours.reparam_conv.weight, theirs.reparam_conv.weight, atol=1e-6)


@pytest.mark.parametrize("variant", ["s0", "s4"])  # four branches; SE
def test_whole_model_loads_timm_weights_by_key_rename_and_gives_timms_outputs(variant):
    theirs = timm.create_model(f"mobileone_{variant}")
    _random_bn(theirs)
    x = torch.randn(2, 3, 32, 32)
    ours = create_model(f"mobileone_{variant}")
    ours.load_state_dict({from_timm_key(k): v for k, v in theirs.state_dict().items()})
    ours.eval()
    with torch.no_grad():
        expected = theirs(x)
        assert rel_err(ours(x), expected) < 1e-5
        # The fused forms in float64: 40 random layers amplify float32 rounding differences between two fusions.
        fused_theirs = timm.utils.model.reparameterize_model(theirs.double())
        assert rel_err(fuse_model(ours.double())(x.double()), fused_theirs(x.double())) < 1e-10


def _cifar_batch_loader(n: int = 32, classes: int = 4, repeats: int = 4):
    """One batch of ``n`` real CIFAR-10 images (``classes`` classes), served ``repeats`` times an epoch: the loss of
    one batch falls step after step, where batch-to-batch noise would hide a few steps' progress."""
    from PIL import Image

    if not CIFAR.is_dir():
        pytest.skip("shared CIFAR-10 images not found at ../shared/datasets/cifar10/train")
    images, labels = [], []
    for label, cls in enumerate(sorted(d.name for d in CIFAR.iterdir())[:classes]):
        for path in sorted((CIFAR / cls).iterdir())[: n // classes]:
            images.append(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)
            labels.append(label)
    x = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) - 0.5) / 0.25
    data = torch.utils.data.TensorDataset(x.repeat(repeats, 1, 1, 1), torch.tensor(labels).repeat(repeats))
    return torch.utils.data.DataLoader(data, batch_size=n)


def test_repq_wraps_every_block_of_a_zoo_model_and_its_fused_form_equals_it():
    from repq.quant.finetune import quantized_model

    torch.manual_seed(0)
    float_model = create_model("mobileone_s4", num_classes=4, cifar=True, width_mult=0.125)  # with SE
    blocks = sum(isinstance(m, MobileOneBlock) for m in float_model.modules())
    model = quantized_model(float_model, method="bn", w_bits=8, a_bits=8)
    assert sum(isinstance(m, RepQBlock) for m in model.modules()) == blocks
    x = torch.randn(8, 3, 32, 32)
    model.train()(x)  # sets the quantizer steps
    with torch.no_grad():
        assert torch.allclose(fuse_model(model)(x), model.eval()(x), atol=1e-4)


@pytest.mark.parametrize("method", ["bn", "bnest_corrected"])
def test_repq_fine_tuning_lowers_the_loss_on_real_images(method):
    """W8A8 RepQ-BN / RepQ-BNEst through the library (quantized_model, finetune) on a short MobileOne (S0's
    widths and four kxk branches, one unit a stage, SE on the last; depthwise and pointwise forms) and real CIFAR-10
    images. (The full-depth zoo model, untrained, is too sharp for a few steps of SGD to show anything, in float
    as in RepQ.)"""
    from repq.quant.finetune import finetune, quantized_model

    torch.manual_seed(0)
    config = MobileOneConfig((0.75, 1.0, 1.0, 2.0), num_conv_branches=4, se_units=(0, 0, 0, 1), depths=(1, 1, 1, 1))
    model = quantized_model(MobileOneNet(config, num_classes=4, cifar=True, width_mult=0.25), method=method,
                            w_bits=8, a_bits=8)
    loader = _cifar_batch_loader()
    losses = finetune(model, loader, epochs=2, lr=0.03, progress=False, log=lambda _: None)
    assert len(losses) == 8 and np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.92 * losses[0], losses
    x = next(iter(loader))[0]
    with torch.no_grad():
        assert torch.allclose(fuse_model(model)(x), model.eval()(x), atol=1e-4)
