"""Turn plain convs into re-param blocks, RepVGG blocks into QARepVGG blocks, and any model into its deploy form."""

from __future__ import annotations

import copy

import torch
from torch import nn

from repq.errors import RepqError
from repq.reparam.block import ReparamBlock
from repq.reparam.blocks import BLOCKS, QARepVGGBlock, RepVGGBlock

CONVERTIBLE = ("acb", "dbb", "orepa", "repvgg", "plain")


def fuse_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every module that has ``fuse()`` in its deploy form.

    ``fuse()`` works in place and returns the module that stands in its place afterwards (the block itself for
    re-param blocks; a wrapper may return a replacement). Works on any model, like timm's reparameterize_model.
    """
    deployed = copy.deepcopy(model)
    if hasattr(deployed, "fuse") and not isinstance(deployed, nn.Conv2d):
        deployed = deployed.fuse()
    else:
        _fuse_children(deployed)
    arch = getattr(deployed, "repq_arch", None)
    if arch is not None:
        deployed.repq_arch = {**arch, "deploy": True}
    return deployed


def _fuse_children(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if callable(getattr(child, "fuse", None)):
            replacement = child.fuse()
            if replacement is not None and replacement is not child:
                setattr(module, name, replacement)
        else:
            _fuse_children(child)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv name, bn name) for every Conv2d whose only consumer is a BatchNorm2d, read off the traced graph."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # FX raises many types for untraceable control flow
        raise RepqError(f"convert_convs could not trace {type(model).__name__} ({type(err).__name__}): it needs an "
                        f"FX-traceable model; convert its traceable sub-modules one by one") from err
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        calls[node.target] = calls.get(node.target, 0) + 1
        if not isinstance(modules.get(node.target), nn.Conv2d) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op == "call_module" and type(modules.get(user.target)) is nn.BatchNorm2d:
            pairs.append((node.target, user.target))
    # A module called twice cannot be replaced by one block per call site.
    return [(c, b) for c, b in pairs if calls[c] == 1 and calls[b] == 1]


def _eligible(conv: nn.Conv2d, block_cls: type[ReparamBlock]) -> bool:
    k = conv.kernel_size
    return (k[0] == k[1] and k[0] >= 3 and k[0] % 2 == 1 and conv.dilation == (1, 1)
            and conv.padding == (k[0] // 2, k[0] // 2) and conv.padding_mode == "zeros"
            and conv.stride[0] == conv.stride[1] and conv.stride[0] in block_cls.SUPPORTED_STRIDES)


def convert_convs(model: nn.Module, block: str = "acb", deploy: bool = False) -> nn.Module:
    """Replace every eligible kxk Conv2d followed by a BatchNorm2d with a ``block`` computing the same function.

    Eligible: square odd kernel >= 3, same padding, no dilation, stride the block supports. The BN becomes
    nn.Identity; the block's main branch takes the conv weight and the BN, its other branches start at zero.
    Works in place and returns ``model``.
    """
    if block not in CONVERTIBLE:
        raise RepqError(f"convert_convs: unknown block {block!r}: choose one of {', '.join(CONVERTIBLE)}")
    block_cls = BLOCKS[block]
    modules = dict(model.named_modules())
    for conv_name, bn_name in _conv_bn_pairs(model):
        conv, bn = modules[conv_name], modules[bn_name]
        if not _eligible(conv, block_cls):
            continue
        new = block_cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.groups,
                        deploy=deploy).to(conv.weight.device)
        if not deploy:
            new.load_conv_bn(conv, bn)
        _set_module(model, conv_name, new)
        _set_module(model, bn_name, nn.Identity())
    return model


def substitute_qarepvgg(model: nn.Module) -> nn.Module:
    """Swap every RepVGG block for a QARepVGG block, in place.

    Carries the kxk conv + BN and the 1x1 conv weights; the identity and the post-BN start fresh (QARepVGG
    paper). Plain L2 instead of the custom L2 (the paper's M1) is a training setting, not part of the model.
    """
    found = False
    for name, module in list(model.named_modules()):
        if not isinstance(module, RepVGGBlock):
            continue
        if module.deployed:
            raise RepqError(f"substitute_qarepvgg: block {name} is already fused: substitute the train-form model "
                            f"(from its training checkpoint), then fuse")
        new = QARepVGGBlock(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.groups)
        new.rbr_dense.load_state_dict(module.rbr_dense.state_dict())
        new.rbr_1x1.weight.data.copy_(module.rbr_1x1.conv.weight.data)
        _set_module(model, name, new.to(module.rbr_dense.conv.weight.device))
        found = True
    if not found:
        raise RepqError(f"substitute_qarepvgg: {type(model).__name__} has no RepVGG blocks: use a repvgg_* model "
                        f"or convert_convs(model, 'repvgg') first")
    arch = getattr(model, "repq_arch", None)
    if arch is not None:
        model.repq_arch = {**arch, "transforms": [*arch.get("transforms", []), "substitute_qarepvgg"]}
    return model


def _set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, leaf = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)
