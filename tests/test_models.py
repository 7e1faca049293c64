"""The zoo: paper parameter counts, every model fuses exactly, conversion and substitution keep the function."""

import copy

import pytest
import torch
import torchvision
from conftest import randomize_bn, rel_err, warm_bn

from repq.reparam import (
    ReparamBlock,
    RepqError,
    convert_convs,
    create_model,
    fuse_model,
    list_models,
    model_from_arch,
    substitute_qarepvgg,
)


def small(name):
    if name == "ecbsr_m4c8":
        return create_model(name, scale=2), (2, 1, 12, 12)
    if name.startswith(("repvgg", "qarepvgg", "mobileone")):
        return create_model(name, num_classes=10, cifar=True, width_mult=0.125), (2, 3, 32, 32)
    return create_model(name, num_classes=10), (2, 3, 32, 32)  # ImageNet stem: 1x1 at the end, cheap


@pytest.mark.parametrize("name,millions", [("repvgg_a0", 8.30), ("repvgg_b0", 14.33), ("repvgg_b1", 51.82),
                                           ("repvgg_b3g4", 75.62), ("plain_a0", 8.30), ("qarepvgg_a0", 8.30)])
def test_fused_parameter_count_matches_the_paper(name, millions):
    fused = fuse_model(create_model(name, num_classes=1000))
    count = sum(p.numel() for p in fused.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.005


def test_d2se_parameter_count_matches_the_official_zoo():
    """The official README lists RepVGG-D2se at 133.33M parameters: the train form's count (fused: 120.39M)."""
    with torch.device("meta"):
        model = create_model("repvgg_d2se", num_classes=1000)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 133.33


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("name", list_models())
def test_every_model_fuses_exactly(name, dtype, tol):
    model, shape = small(name)
    model = model.to(dtype)
    randomize_bn(model)
    warm_bn(model, shape, steps=2, dtype=dtype)
    x = torch.randn(*shape, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        fused = fuse_model(model)
        assert not any(isinstance(m, ReparamBlock) and not m.deployed for m in fused.modules())
        assert rel_err(fused(x), expected) < tol
    # The deploy form rebuilds from the recorded architecture and takes the fused weights as they are.
    rebuilt = model_from_arch(fused.repq_arch).to(dtype)
    rebuilt.load_state_dict(fused.state_dict())
    with torch.no_grad():
        assert rel_err(rebuilt.eval()(x), expected) < tol


@pytest.mark.parametrize("block", ["acb", "dbb", "orepa", "repvgg", "plain"])
def test_convert_convs_keeps_the_function_of_torchvision_resnet18(block):
    original = torchvision.models.resnet18(num_classes=10)
    randomize_bn(original)
    warm_bn(original, (2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = original(x)
    converted = convert_convs(copy.deepcopy(original), block)
    blocks = [m for m in converted.modules() if isinstance(m, ReparamBlock)]
    assert len(blocks) == 17  # conv1 (7x7) + 16 3x3 convs; the 1x1 downsample convs are not eligible
    with torch.no_grad():
        assert rel_err(converted.eval()(x), expected) < 1e-5
    # Train the converted model a little, then the fused form is a plain-conv resnet18 with the same output.
    randomize_bn(converted)
    warm_bn(converted, (2, 3, 32, 32))
    with torch.no_grad():
        trained = converted(x)
        fused = fuse_model(converted)
        assert all(type(m) is torch.nn.Conv2d for m in fused.modules() if isinstance(m, torch.nn.Conv2d))
        convs = [m for m in fused.modules() if type(m) is torch.nn.Conv2d]
        assert len(convs) == 20 and not any(isinstance(m, ReparamBlock) and not m.deployed for m in fused.modules())
        assert rel_err(fused(x), trained) < 1e-5


def test_substitute_qarepvgg_carries_weights_and_fuses():
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.25)
    randomize_bn(model)
    warm_bn(model, (2, 3, 32, 32))
    old = model.stages[1][0]
    dense, one = old.rbr_dense.conv.weight.clone(), old.rbr_1x1.conv.weight.clone()
    substitute_qarepvgg(model)
    new = model.stages[1][0]
    assert type(new).__name__ == "QARepVGGBlock"
    assert torch.equal(new.rbr_dense.conv.weight, dense) and torch.equal(new.rbr_1x1.weight, one)
    warm_bn(model, (2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(fuse_model(model)(x), model(x)) < 1e-5
    # A substituted model rebuilds from its record: the same structure, so the weights load strictly.
    model_from_arch(model.repq_arch).load_state_dict(model.state_dict())


def test_substitute_qarepvgg_errors():
    with pytest.raises(RepqError, match="no RepVGG blocks"):
        substitute_qarepvgg(create_model("resnet18_acb", num_classes=10))
    with pytest.raises(RepqError, match="already fused"):
        substitute_qarepvgg(fuse_model(create_model("repvgg_a0", num_classes=10, width_mult=0.125)))


def test_unknown_model_name_suggests_the_close_ones():
    with pytest.raises(RepqError, match="did you mean.*repvgg_a0"):
        create_model("repvgg_ao")
    with pytest.raises(RepqError, match="does not take"):
        create_model("repvgg_a0", widthmult=0.5)


def test_ecbsr_upsamples_by_its_scale():
    for scale in (2, 3, 4):
        model = create_model("ecbsr_m4c8", scale=scale).eval()
        assert model(torch.randn(1, 1, 10, 12)).shape == (1, 1, 10 * scale, 12 * scale)
