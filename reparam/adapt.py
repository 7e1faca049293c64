"""Foreign re-param blocks inside any model become repq blocks: `adapt(model)`.

A block is recognised by its structure, not its class name: the RepVGG layout of the official code, YOLOv6 and timm
(a kxk conv-BN branch, a 1x1 branch, an identity BN; ``rbr_*`` or timm's ``conv_kxk``/``conv_1x1``/ ``identity``),
timm's MobileOneBlock (several ``conv_kxk`` branches, ``conv_scale``, ``identity``), YOLOv6's QARepVGGBlock (a bare
1x1 conv, a bare identity and the post-BN ``bn``), and the deploy form of each (one conv, for QARepVGG followed by
its unfused ``bn``). Its weights and BN state move into the equivalent repq block; the activation and any
squeeze-excitation it applied after the sum follow it in an ``nn.Sequential``. Every replacement is checked on a
random input against the block it replaces, so a forward() that differs from its structure is reported rather than
silently changed. Anything that looks like a re-param block but is not one of these is listed, one line each, and
left alone.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from repq.reparam.block import ReparamBlock, copy_bn, silence_bn
from repq.reparam.blocks import QARepVGGBlock, RepVGGBlock

# Child names a foreign re-param block is made of, and methods only such blocks have.
BRANCH_NAMES = {"dense": ("rbr_dense", "conv_kxk"), "one": ("rbr_1x1", "conv_1x1"), "scale": ("conv_scale",),
                "identity": ("rbr_identity", "identity"), "deploy": ("rbr_reparam", "reparam_conv")}
AFTER_NAMES = {"se": ("se", "attn"), "act": ("nonlinearity", "act")}
IGNORED_NAMES = ("drop_path",)
REPARAM_METHODS = ("switch_to_deploy", "reparameterize", "get_equivalent_kernel_bias", "merge_kernel")
# Child names only a re-param block has (``identity`` or ``conv_1x1`` alone are common in other modules).
MARKERS = {"rbr_dense", "rbr_1x1", "rbr_identity", "rbr_reparam", "conv_kxk", "conv_scale", "reparam_conv"}
CHECK_TOLERANCE = 1e-4  # relative to the output's magnitude: float32 sums in another order


class Unrecognised(Exception):
    """A module that looks like a re-param block, with the reason repq cannot take it."""


@dataclass
class AdaptReport:
    """What `adapt` did: each replaced block (name, what it became) and each block it left alone (name, why)."""

    replaced: list[tuple[str, str]] = field(default_factory=list)
    unrecognised: list[tuple[str, str]] = field(default_factory=list)

    def lines(self) -> list[str]:
        head = f"adapt: {len(self.replaced)} re-param block(s) replaced by repq blocks"
        if self.unrecognised:
            head += f", {len(self.unrecognised)} left alone"
        return [head, *(f"  not adapted: {name}: {why}" for name, why in self.unrecognised)]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def adapt(model: nn.Module, *, check: bool = True, log: Callable[[str], None] | None = None) -> AdaptReport:
    """Replace every recognised foreign re-param block of ``model`` (in place) with the equivalent repq block.

    ``check``: run each replacement and the block it replaces on a random input (eval mode) and keep only
    replacements that agree. ``log`` gets the report's lines (default: stderr). Returns the report.
    """
    report = AdaptReport()
    _walk(model, "", report, check)
    for line in report.lines():
        (log or _stderr)(line)
    return report


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _walk(module: nn.Module, prefix: str, report: AdaptReport, check: bool) -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if isinstance(child, ReparamBlock) or _is_repq_wrapper(child):
            continue
        try:
            replacement = foreign_block(child)
        except Unrecognised as why:
            report.unrecognised.append((path, f"{type(child).__name__}: {why}"))
            continue
        if replacement is None:
            before = len(report.replaced) + len(report.unrecognised)
            _walk(child, f"{path}.", report, check)
            if len(report.replaced) + len(report.unrecognised) == before and _has_reparam_method(child):
                report.unrecognised.append((path, f"{type(child).__name__}: a re-param block of a family repq does "
                                                  "not adapt (it has a fusing method but no branches repq knows)"))
            continue
        if check:
            problem = _disagreement(child, replacement)
            if problem:
                report.unrecognised.append((path, f"{type(child).__name__}: {problem}"))
                continue
        setattr(module, name, replacement.train(child.training))
        block = replacement[0] if isinstance(replacement, nn.Sequential) else replacement
        report.replaced.append((path, type(block).__name__))


def _has_reparam_method(module: nn.Module) -> bool:
    return any(callable(getattr(module, m, None)) for m in REPARAM_METHODS)


def _is_repq_wrapper(module: nn.Module) -> bool:
    return callable(getattr(module, "merged_kernel", None)) and callable(getattr(module, "conv_kwargs", None))


# ------------------------------------------------------------------------------------------ recognition


def foreign_block(module: nn.Module) -> nn.Module | None:
    """The repq equivalent of a foreign re-param block (a block, or the block followed by what the foreign one
    applied after its sum), None for a module that is no re-param block; Unrecognised for one repq cannot take."""
    children = dict(module.named_children())
    found = {role: _child(children, names) for role, names in BRANCH_NAMES.items()}
    if not MARKERS & set(children):
        return None
    if found["dense"] is None and found["deploy"] is None:
        raise Unrecognised("a re-param block with no kxk branch or deploy conv repq knows (RepVGG, QARepVGG, "
                           "MobileOne and their deploy forms are adapted; others stay as they are)")
    known = {n for names in (*BRANCH_NAMES.values(), *AFTER_NAMES.values()) for n in names} | {"bn", *IGNORED_NAMES}
    unknown = sorted(set(children) - known)
    if unknown:
        raise Unrecognised(f"children repq does not know ({', '.join(unknown)})")
    for name in IGNORED_NAMES:
        if name in children and not _is_identity(children[name]):
            raise Unrecognised(f"{name} is active (drop probability > 0): build the model without it to adapt")
    post_bn = children.get("bn")
    if post_bn is not None and not isinstance(post_bn, nn.BatchNorm2d):
        raise Unrecognised(f"its bn is a {type(post_bn).__name__}, not a BatchNorm2d")
    se = _child(children, AFTER_NAMES["se"])
    act = _child(children, AFTER_NAMES["act"])
    if post_bn is not None and not _is_identity(se):
        raise Unrecognised("a QARepVGG block with squeeze-excitation before its post-BN: not adapted")
    if found["deploy"] is not None:
        block = _from_deploy(_conv(found["deploy"], "deploy conv"), post_bn)
    elif isinstance(found["dense"], nn.ModuleList):
        block = _mobileone(found)
    elif post_bn is not None:
        block = _qarepvgg(found, post_bn)
    else:
        block = _repvgg(found)
    after = [m for m in (se, act) if not _is_identity(m)]
    return nn.Sequential(block, *after) if after else block


def _child(children: dict[str, nn.Module | None], names: tuple[str, ...]) -> nn.Module | None:
    return next((children[n] for n in names if children.get(n) is not None), None)


def _is_identity(module: nn.Module | None) -> bool:
    if module is None or isinstance(module, nn.Identity):
        return True
    return type(module).__name__ == "DropPath" and not getattr(module, "drop_prob", 0.0)


def _conv(module: nn.Module, what: str) -> nn.Conv2d:
    if not isinstance(module, nn.Conv2d):
        raise Unrecognised(f"its {what} is a {type(module).__name__}, not a Conv2d")
    return module


def _conv_bn(branch: nn.Module, what: str) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """The (conv, BN) of a conv-BN branch (a Sequential or module with `conv` and `bn` children)."""
    conv, bn = getattr(branch, "conv", None), getattr(branch, "bn", None)
    extra = sorted(set(dict(branch.named_children())) - {"conv", "bn"})
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or \
            any(not _is_identity(getattr(branch, n)) for n in extra):
        raise Unrecognised(f"its {what} branch is not a conv followed by a BatchNorm2d")
    for inner in ("act", "drop"):  # timm's BatchNormAct2d applies these after the BN
        if not _is_identity(getattr(bn, inner, None)):
            raise Unrecognised(f"its {what} branch applies {inner} after the BN")
    return conv, bn


def _geometry(conv: nn.Conv2d) -> tuple[int, int, int, int, int]:
    """(in, out, kernel, stride, groups) of a kxk conv a repq block can take; Unrecognised otherwise."""
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    if k[0] != k[1] or k[0] < 3 or k[0] % 2 == 0 or s[0] != s[1] or s[0] not in ReparamBlock.SUPPORTED_STRIDES \
            or conv.dilation != (1, 1) or p != (k[0] // 2, k[0] // 2) or conv.padding_mode != "zeros":
        raise Unrecognised(f"its kxk conv (kernel {tuple(k)}, stride {tuple(s)}, padding {p}, dilation "
                           f"{conv.dilation}, {conv.padding_mode}) is not an odd square 'same' conv of stride 1 or 2")
    return conv.in_channels, conv.out_channels, k[0], s[0], conv.groups


def _check_1x1(conv: nn.Conv2d, dense: nn.Conv2d) -> None:
    if conv.kernel_size != (1, 1) or conv.padding != (0, 0) or conv.stride != dense.stride or \
            conv.groups != dense.groups or conv.out_channels != dense.out_channels:
        raise Unrecognised("its 1x1 branch does not match the kxk branch (kernel, stride, padding or groups)")


def _repvgg(found: dict) -> RepVGGBlock:
    conv, bn = _conv_bn(found["dense"], "kxk")
    c_in, c_out, k, s, g = _geometry(conv)
    block = RepVGGBlock(c_in, c_out, k, s, g).to(conv.weight)
    with torch.no_grad():
        block.rbr_dense.conv.weight.copy_(conv.weight)
    copy_bn(block.rbr_dense.bn, bn, conv.bias)
    if found.get("one") is not None:
        one, one_bn = _conv_bn(found["one"], "1x1")
        _check_1x1(one, conv)
        with torch.no_grad():
            block.rbr_1x1.conv.weight.copy_(one.weight)
        copy_bn(block.rbr_1x1.bn, one_bn, one.bias)
    else:
        silence_bn(block.rbr_1x1.bn)  # a block built without its 1x1 branch: repq's starts at zero
    _copy_identity(block.rbr_identity, found.get("identity"))
    return block


def _copy_identity(block_identity: nn.BatchNorm2d | None, identity: nn.Module | None) -> None:
    """A foreign identity BN into the repq block's (silent when the foreign block was built without one)."""
    if identity is not None and (not isinstance(identity, nn.BatchNorm2d) or
                                 not all(_is_identity(getattr(identity, n, None)) for n in ("act", "drop"))):
        raise Unrecognised(f"its identity branch is a {type(identity).__name__}, not a plain BatchNorm2d")
    if identity is not None and block_identity is None:
        raise Unrecognised("it has an identity branch where the shapes allow none")
    if block_identity is not None:
        if identity is None:
            silence_bn(block_identity)
        else:
            copy_bn(block_identity, identity)


def _mobileone(found: dict) -> nn.Module:
    """timm's MobileOneBlock: several kxk conv-BN branches (1x1 in the pointwise form), a 1x1 scale branch, an
    identity BN."""
    from repq.reparam.mobileone import MobileOneBlock

    pairs = [_conv_bn(branch, "kxk") for branch in found["dense"]]
    if not pairs:
        raise Unrecognised("it has no kxk branch")
    conv = pairs[0][0]
    k = conv.kernel_size[0]
    if any((c.kernel_size, c.stride, c.padding, c.groups, c.in_channels, c.out_channels) !=
           (conv.kernel_size, conv.stride, conv.padding, conv.groups, conv.in_channels, conv.out_channels)
           for c, _ in pairs):
        raise Unrecognised("its kxk branches differ in geometry")
    if k != 1:
        _geometry(conv)
    elif conv.padding != (0, 0) or conv.stride[0] not in ReparamBlock.SUPPORTED_STRIDES or conv.dilation != (1, 1):
        raise Unrecognised("its pointwise branches are not plain 1x1 convs of stride 1 or 2")
    block = MobileOneBlock(conv.in_channels, conv.out_channels, k, conv.stride[0], conv.groups,
                           num_conv_branches=len(pairs)).to(conv.weight)
    for ours, (theirs, bn) in zip(block.conv_kxk, pairs, strict=True):
        with torch.no_grad():
            ours.conv.weight.copy_(theirs.weight)
        copy_bn(ours.bn, bn, theirs.bias)
    scale = found.get("scale")
    if scale is not None and block.conv_scale is None:
        raise Unrecognised("it has a scale branch where repq's MobileOne block has none")
    if block.conv_scale is not None:
        if scale is None:
            silence_bn(block.conv_scale.bn)
        else:
            one, one_bn = _conv_bn(scale, "scale")
            _check_1x1(one, conv)
            with torch.no_grad():
                block.conv_scale.conv.weight.copy_(one.weight)
            copy_bn(block.conv_scale.bn, one_bn, one.bias)
    _copy_identity(block.identity, found.get("identity"))
    return block


def _qarepvgg(found: dict, post_bn: nn.BatchNorm2d) -> QARepVGGBlock:
    conv, bn = _conv_bn(found["dense"], "kxk")
    c_in, c_out, k, s, g = _geometry(conv)
    one = _conv(found.get("one"), "1x1 branch") if found.get("one") is not None else None
    block = QARepVGGBlock(c_in, c_out, k, s, g).to(conv.weight)
    has_identity = isinstance(found.get("identity"), nn.Identity)
    if has_identity != block.has_identity:
        raise Unrecognised(f"a QARepVGG block {'with' if has_identity else 'without'} an identity where repq's "
                           f"{'has none' if has_identity else 'has one'} (in {c_in}, out {c_out}, stride {s})")
    with torch.no_grad():
        block.rbr_dense.conv.weight.copy_(conv.weight)
        copy_bn(block.rbr_dense.bn, bn, conv.bias)
        if one is None:
            block.rbr_1x1.weight.zero_()
        else:
            _check_1x1(one, conv)
            block.rbr_1x1.weight.copy_(one.weight)
            if one.bias is not None:  # a bias on the 1x1 conv adds to the sum: the kxk branch's BN shift takes it
                block.rbr_dense.bn.bias.add_(one.bias)
    copy_bn(block.post_bn, post_bn)
    return block


def _from_deploy(conv: nn.Conv2d, post_bn: nn.BatchNorm2d | None) -> RepVGGBlock:
    """A deploy-form block (one conv, maybe followed by QARepVGG's unfused post-BN) as a RepVGG block whose kxk
    branch computes it exactly; the 1x1 and identity branches start silent (as convert_convs does), so RepQ and
    every other stage can train it."""
    if conv.kernel_size == (1, 1):
        raise Unrecognised("a deployed 1x1 conv (MobileOne's pointwise form): no branches to give back, so it stays "
                           "a plain conv, which PTQ and RepQ's LSQ quantize as one")
    c_in, c_out, k, s, g = _geometry(conv)
    block = RepVGGBlock(c_in, c_out, k, s, g).to(conv.weight)
    block.load_conv_bn(conv, post_bn if post_bn is not None else unit_bn(c_out, conv.weight))
    return block


def unit_bn(channels: int, like: torch.Tensor) -> nn.BatchNorm2d:
    """A BatchNorm2d that, in eval mode, passes its input through: running mean 0, variance 1, gamma sqrt(1 + eps),
    beta 0 (so gamma / sqrt(var + eps) is 1)."""
    bn = nn.BatchNorm2d(channels).to(like).eval()
    with torch.no_grad():
        bn.weight.copy_(torch.sqrt(bn.running_var + bn.eps))
    return bn


# ------------------------------------------------------------------------------------------ the check


@torch.no_grad()
def _disagreement(original: nn.Module, replacement: nn.Module) -> str:
    """'' when both compute the same function in eval mode on a random input, else why not."""
    block = replacement[0] if isinstance(replacement, nn.Sequential) else replacement
    reference = next(iter(original.parameters()), None)
    like = reference if reference is not None else torch.zeros(())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, block.in_channels, 11, 11, generator=gen).to(like)
    try:
        expected = copy.deepcopy(original).eval()(x)
    except Exception as err:  # noqa: BLE001 -- a foreign forward may fail in any way
        return f"its forward() failed on a test input ({type(err).__name__}: {str(err).strip()[:80]})"
    got = replacement.eval()(x)
    if not torch.is_tensor(expected) or expected.shape != got.shape:
        return "its forward() returns something other than the branch sum its structure describes"
    diff = float((expected - got).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if not diff <= CHECK_TOLERANCE * scale:
        return (f"its structure matches but its outputs differ from repq's block by {diff:.2e} (a forward() repq "
                "does not know): left as it is")
    return ""
