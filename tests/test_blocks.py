"""Every block: fused == train form, a differentiable merged kernel, BN taps that describe the real BN inputs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_bn, rel_err, warm_bn

from repq.reparam import BLOCKS, RepqError, RepVGGBlock
from repq.reparam.blocks import ECBlock

GEOMETRIES = [dict(stride=1, groups=1), dict(stride=2, groups=1), dict(stride=1, groups=2),
              dict(stride=2, groups=4), dict(stride=1, groups=8)]


def make_block(name: str, channels: int = 8, **geometry):
    if name == "ecb":
        return ECBlock(channels, channels, with_identity=True)
    return BLOCKS[name](channels, channels, 3, **geometry)


def block_cases():
    for name in BLOCKS:
        for geometry in [{}] if name == "ecb" else GEOMETRIES:
            yield pytest.param(name, geometry, id=f"{name}-{'-'.join(f'{k}{v}' for k, v in geometry.items())}")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("name,geometry", list(block_cases()))
def test_fused_equals_train_form(name, geometry, dtype, tol):
    block = make_block(name, **geometry).to(dtype)
    randomize_bn(block)
    warm_bn(block, (4, 8, 9, 9), dtype=dtype)
    x = torch.randn(2, 8, 9, 9, dtype=dtype)
    expected = block(x)
    fused = copy.deepcopy(block).fuse()
    assert list(dict(fused.named_children())) == ["reparam_conv"]
    assert rel_err(fused(x), expected) < tol
    assert rel_err(fused.fuse()(x), expected) < tol  # idempotent


def test_block_with_kernel_5_and_channel_change():
    block = BLOCKS["dbb"](4, 12, 5, stride=2, groups=4)
    randomize_bn(block)
    warm_bn(block, (3, 4, 11, 11))
    x = torch.randn(2, 4, 11, 11)
    assert rel_err(copy.deepcopy(block).fuse()(x), block(x)) < 1e-5


class _Kernel(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self):
        return self.block.merged_kernel()


@pytest.mark.parametrize("name", list(BLOCKS))
def test_merged_kernel_gradcheck(name):
    # ECB's expanded middle makes gradcheck slow: two channels are enough to exercise every branch.
    block = make_block(name, channels=2 if name == "ecb" else 4,
                       **({} if name == "ecb" else {"stride": 1, "groups": 2})).double()
    randomize_bn(block)
    warm_bn(block, (2, block.in_channels, 5, 5), dtype=torch.float64)
    wrapper = _Kernel(block)
    names = [n for n, p in wrapper.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in wrapper.parameters())

    def merged(*values):
        return torch.func.functional_call(wrapper, dict(zip(names, values, strict=True)), ())

    assert torch.autograd.gradcheck(merged, params, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_every_parameter_gets_a_gradient_through_the_merged_kernel(name):
    block = make_block(name, **({} if name == "ecb" else {"stride": 1, "groups": 2}))
    randomize_bn(block)
    weight, bias = block.merged_kernel()
    (weight * torch.randn_like(weight)).sum().add((bias * torch.randn_like(bias)).sum()).backward()
    for pname, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name,geometry", [c for c in block_cases() if c.values[0] != "ecb"])
def test_bn_taps_describe_each_bn_input(name, geometry):
    """conv(x, tap.kernel()) with the tap's geometry equals what the BN really receives."""
    block = make_block(name, **geometry)
    randomize_bn(block)
    warm_bn(block, (4, 8, 9, 9))
    taps = block.bn_taps()
    assert {id(t.bn) for t in taps.values()} == {id(m) for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    seen = {}
    hooks = [t.bn.register_forward_pre_hook(lambda m, inp, key=k: seen.__setitem__(key, inp[0]))
             for k, t in taps.items()]
    x = torch.randn(2, 8, 9, 9)
    block(x)
    for hook in hooks:
        hook.remove()
    for key, tap in taps.items():
        weight, bias = tap.kernel(None)
        expected = F.conv2d(x, weight, bias, tap.stride, tap.padding, 1, tap.groups)
        assert torch.allclose(expected, seen[key], atol=1e-5), key


def test_bn_stats_override_changes_only_the_named_bn():
    block = make_block("qarepvgg")
    randomize_bn(block)
    warm_bn(block, (4, 8, 9, 9))
    mean, var = torch.randn(8), torch.rand(8) + 0.5
    w_ref, b_ref = block.merged_kernel()
    w, b = block.merged_kernel({"post_bn": (mean, var)})
    bn = block.post_bn
    # Undo the running-stat fold by hand and apply the given one.
    scale_ref = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    scale_new = bn.weight / torch.sqrt(var + bn.eps)
    assert torch.allclose(w, w_ref / scale_ref.reshape(-1, 1, 1, 1) * scale_new.reshape(-1, 1, 1, 1), atol=1e-6)
    pre_bias = (b_ref - bn.bias) / scale_ref + bn.running_mean
    assert torch.allclose(b, bn.bias + (pre_bias - mean) * scale_new, atol=1e-5)


def test_custom_l2_matches_the_equal_scale_closed_form():
    """With equal BN scales t on both branches the centre term is (K3c + K1)^2 / 2 (RepVGG's normalisation)."""
    block = RepVGGBlock(4, 4, 3)
    for bn in (block.rbr_dense.bn, block.rbr_1x1.bn):
        bn.weight.data.fill_(1.7)
        bn.running_var.fill_(2.0)
    k3, k1 = block.rbr_dense.conv.weight, block.rbr_1x1.conv.weight
    ring = (k3 ** 2).sum() - (k3[:, :, 1, 1] ** 2).sum()
    centre = ((k3[:, :, 1:2, 1:2] + k1) ** 2).sum() / 2
    assert torch.allclose(block.custom_l2(), ring + centre)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=2), dict(kernel_size=1), dict(stride=3)])
def test_unsupported_geometry_is_a_clear_error(kwargs):
    with pytest.raises(RepqError, match="RepVGGBlock"):
        RepVGGBlock(4, 4, **kwargs)


@pytest.mark.parametrize("name", [n for n in BLOCKS if n != "ecb"])
def test_every_block_refuses_stride_3_by_name(name):
    with pytest.raises(RepqError, match=BLOCKS[name].__name__):
        BLOCKS[name](4, 4, 3, stride=3)


def test_fuse_on_a_half_fused_block_is_a_clear_error():
    block = RepVGGBlock(4, 4)
    block.reparam_conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    with pytest.raises(RepqError, match="half-fused"):
        block.fuse()


@pytest.mark.parametrize("name", ["repvgg", "qarepvgg", "dbb"])
def test_strided_1x1_branches_subsample_first_and_match_a_strided_conv(name):
    """A strided RGB 1x1 branch on a channels-last batch is the case whose weight gradient hangs or crashes
    oneDNN's strided kernel (AVX2); PointwiseConv subsamples, then runs the stride-1 kernel. Reference: a plain
    strided conv on a contiguous NCHW copy (another kernel), same forward and gradients."""
    from repq.reparam.block import PointwiseConv

    torch.manual_seed(0)
    block = BLOCKS[name](3, 16, 3, stride=2).train()  # 3 input channels: the subsampling path
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)
             and m.stride == (2, 2)]
    assert convs and all(isinstance(m, PointwiseConv) for m in convs)
    conv = convs[0]
    x = torch.randn(8, 32, 32, 3).permute(0, 3, 1, 2).requires_grad_()  # NHWC memory, as images arrive
    x_ref = x.detach().contiguous().requires_grad_()
    weight_ref = conv.weight.detach().clone().requires_grad_()
    out, ref = conv(x), F.conv2d(x_ref, weight_ref, None, 2)
    assert rel_err(out, ref) < 1e-6
    grad = torch.randn_like(ref)
    weight_grad, input_grad = torch.autograd.grad(out, (conv.weight, x), grad)
    weight_grad_ref, input_grad_ref = torch.autograd.grad(ref, (weight_ref, x_ref), grad)
    assert rel_err(weight_grad, weight_grad_ref) < 1e-5 and rel_err(input_grad, input_grad_ref) < 1e-6
    block(x).sum().backward()  # the whole block's backward completes
