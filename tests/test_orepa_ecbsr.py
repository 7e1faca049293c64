"""OREPA with the authors' six branches and ECBSR's identity on every block, against independent truth: each OREPA
branch computed as the convolutions it stands for (feature maps, not merged kernels), the prior by hand, the
authors' parameter shapes, and fused == train form in float64."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn, rel_err, warm_bn

from repq.reparam import ECBlock, OREPABlock
from repq.reparam.blocks import frequency_prior
from repq.reparam.models import ECBSR

GEOMETRIES = [(8, 8, 3, 1, 1), (8, 16, 3, 2, 2), (8, 8, 3, 1, 8), (4, 8, 5, 1, 1), (16, 16, 3, 2, 8)]


def _random_orepa(c_in, c_out, k, stride, groups) -> OREPABlock:
    block = OREPABlock(c_in, c_out, k, stride, groups).double()
    with torch.no_grad():
        for name, param in block.named_parameters():
            if not name.startswith("bn."):
                param.normal_(0.0, 0.3)
    randomize_bn(block)
    warm_bn(block, (4, c_in, 11, 11), dtype=torch.float64)
    return block


def _branch_outputs(block: OREPABlock, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each branch as the network it stands for, run on the input (no kernel merging)."""
    k, s, p, g = block.kernel_size, block.stride, block.padding, block.groups
    c_in, c_out = block.in_channels, block.out_channels
    out_per_group = c_out // g
    pw = block.weight_dws_pw  # authors' row order: row a * groups + c feeds output a of group c
    pw = pw.reshape(out_per_group, g, -1, 1, 1).transpose(0, 1).reshape(c_out, -1, 1, 1)
    return {
        "origin": F.conv2d(x, block.weight_origin, None, s, p, 1, g),
        "one": F.conv2d(x, block.weight_one, None, s, 0, 1, g),
        "avg": F.avg_pool2d(F.conv2d(x, block.weight_avg, None, 1, 0, 1, g), k, s, p, count_include_pad=True),
        "one_kxk": F.conv2d(F.conv2d(x, block.one_kxk_first.effective_weight(), None, 1, 0, 1, g),
                            block.weight_one_kxk, None, s, p, 1, g),
        "prior": F.conv2d(F.conv2d(x, block.weight_prior_conv, None, 1, 0, 1, g), block.prior.unsqueeze(1), None,
                          s, p, 1, c_out),
        "dws": F.conv2d(F.conv2d(x, block.weight_dws_dw, None, s, p, 1, c_in), pw, None, 1, 0, 1, g),
    }


@pytest.mark.parametrize("c_in,c_out,k,stride,groups", GEOMETRIES)
def test_six_branches_equal_their_convolutions_and_fuse_exactly(c_in, c_out, k, stride, groups):
    block = _random_orepa(c_in, c_out, k, stride, groups)
    x = torch.randn(2, c_in, 11, 11, dtype=torch.float64)
    branches = _branch_outputs(block, x)
    assert list(branches) == list(OREPABlock.BRANCHES)
    summed = sum(scale.reshape(1, -1, 1, 1) * branches[name]
                 for name, scale in zip(OREPABlock.BRANCHES, block.branch_scale, strict=True))
    with torch.no_grad():
        expected = block.bn(summed)
        assert (block(x) - expected).abs().max().item() < 1e-10
        fused = copy.deepcopy(block).fuse()
        assert (fused(x) - expected).abs().max().item() < 1e-10
        # and every branch matters: the two new ones change the kernel
        for name in ("prior", "dws"):
            assert branches[name].abs().max() > 1e-3, name


def test_prior_is_the_authors_cosine_by_hand():
    """Channel i < C/2 varies along rows, cos(pi (h + 1/2)(i + 1) / 3); the rest along columns with i + 1 - C/2."""
    prior = frequency_prior(4, 3)
    along = [math.cos(math.pi * 0.5 / 3), math.cos(math.pi * 1.5 / 3), math.cos(math.pi * 2.5 / 3)]  # u = 1
    assert torch.allclose(prior[0], torch.tensor(along).reshape(3, 1).expand(3, 3), atol=1e-7)
    assert torch.allclose(prior[2], torch.tensor(along).reshape(1, 3).expand(3, 3), atol=1e-7)
    twice = [math.cos(math.pi * (h + 0.5) * 2 / 3) for h in range(3)]  # u = 2
    assert torch.allclose(prior[1], torch.tensor(twice).reshape(3, 1).expand(3, 3), atol=1e-7)
    assert torch.allclose(prior[3], torch.tensor(twice).reshape(1, 3).expand(3, 3), atol=1e-7)


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_parameters_have_the_authors_names_and_shapes(groups):
    """Shapes of the authors' OREPA (their blocks.py): 1x1-kxk width 2x the input at groups > 4, the
    depthwise-separable branch 8 filters per input channel, one scale row per branch; every repq parameter is one of
    theirs (or the BN)."""
    c_in, c_out, k = 8, 16, 3
    block = OREPABlock(c_in, c_out, k, 1, groups)
    internal = c_in if groups <= 4 else 2 * c_in
    expected = {
        "weight_orepa_origin": (c_out, c_in // groups, k, k), "weight_orepa_1x1": (c_out, c_in // groups, 1, 1),
        "weight_orepa_avg_conv": (c_out, c_in // groups, 1, 1), "weight_orepa_pfir_conv": (c_out, c_in // groups, 1, 1),
        "weight_orepa_prior": (c_out, k, k), "weight_orepa_1x1_kxk_idconv1": (internal, c_in // groups, 1, 1),
        "weight_orepa_1x1_kxk_conv2": (c_out, internal // groups, k, k),
        "weight_orepa_gconv_dw": (8 * c_in, 1, k, k), "weight_orepa_gconv_pw": (c_out, 8 * c_in // groups, 1, 1),
        "vector": (6, c_out),
    }
    state = block.state_dict()
    assert set(expected) == set(OREPABlock.AUTHORS_NAMES)
    for theirs, shape in expected.items():
        assert tuple(state[OREPABlock.AUTHORS_NAMES[theirs]].shape) == shape, theirs
    ours = {n for n, _ in block.named_parameters() if not n.startswith("bn.")}
    assert ours <= set(OREPABlock.AUTHORS_NAMES.values())
    assert sorted(OREPABlock.AUTHORS_VECTOR_ROWS) == list(range(6))


def test_identity_based_1x1_starts_as_the_identity_or_its_doubling():
    block = OREPABlock(8, 8, 3, 1, 8)  # groups > 4: 16 internal channels, each input read twice
    x = torch.randn(1, 8, 5, 5)
    inner = F.conv2d(x, block.one_kxk_first.effective_weight(), None, 1, 0, 1, 8)
    assert torch.equal(inner, x.repeat_interleave(2, dim=1))
    block = OREPABlock(8, 8, 3, 1, 2)
    assert torch.equal(F.conv2d(x, block.one_kxk_first.effective_weight(), None, 1, 0, 1, 2), x)


def test_ecbsr_identity_reaches_every_block_where_shapes_allow():
    """The authors pass with_idt to every ECB, which keeps it where in == out: for m4c4 x2 that includes the last
    block (4 -> 1 * 2 * 2 channels), not only the middle ones."""
    model = ECBSR(scale=2, num_blocks=4, channels=4, colors=1, with_identity=True).double()
    ecbs = [m for m in model.modules() if isinstance(m, ECBlock)]
    assert [m.with_identity for m in ecbs] == [False, True, True, True, True, True]
    assert not any(m.with_identity for m in ECBSR(2, 4, 4, 1, with_identity=False).modules()
                   if isinstance(m, ECBlock))
    x = torch.randn(1, 1, 10, 10, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        fused = copy.deepcopy(model)
        for block in [m for m in fused.modules() if isinstance(m, ECBlock)]:
            block.fuse()
        assert rel_err(fused(x), expected) < 1e-12
        # the last block's identity is in its fused kernel: without it the output changes
        last = ecbs[-1]
        last.with_identity = False
        assert rel_err(model(x), expected) > 1e-3
