"""The model zoo: variants are data (one table), each name builds through one registry.

``create_model(name, **kw)`` builds a model and records how on ``model.repq_arch`` so a checkpoint can rebuild it
with ``model_from_arch``; ``list_models()`` lists the names.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repq.errors import RepqError
from repq.reparam.blocks import ECBlock, PlainBlock, QARepVGGBlock, RepVGGBlock
from repq.reparam.convert import convert_convs, substitute_qarepvgg
from repq.reparam.mobileone import MOBILEONE_CONFIGS, MobileOneNet


@dataclass(frozen=True)
class RepVGGConfig:
    """Depths and width multipliers of the RepVGG paper (Ding et al., CVPR 2021, Table 2)."""

    depths: tuple[int, int, int, int]
    widths: tuple[float, float, float, float]
    groups: int = 1  # on the paper's "optional group-wise" layers 2, 4, ..., 26
    se: bool = False  # squeeze-excitation after every block's sum (D2se)


A_DEPTHS, B_DEPTHS, D_DEPTHS = (2, 4, 14, 1), (4, 6, 16, 1), (8, 14, 24, 1)
REPVGG_CONFIGS: dict[str, RepVGGConfig] = {
    "a0": RepVGGConfig(A_DEPTHS, (0.75, 0.75, 0.75, 2.5)),
    "a1": RepVGGConfig(A_DEPTHS, (1, 1, 1, 2.5)),
    "a2": RepVGGConfig(A_DEPTHS, (1.5, 1.5, 1.5, 2.75)),
    "b0": RepVGGConfig(B_DEPTHS, (1, 1, 1, 2.5)),
    "b1": RepVGGConfig(B_DEPTHS, (2, 2, 2, 4)),
    "b1g2": RepVGGConfig(B_DEPTHS, (2, 2, 2, 4), groups=2),
    "b1g4": RepVGGConfig(B_DEPTHS, (2, 2, 2, 4), groups=4),
    "b2": RepVGGConfig(B_DEPTHS, (2.5, 2.5, 2.5, 5)),
    "b2g2": RepVGGConfig(B_DEPTHS, (2.5, 2.5, 2.5, 5), groups=2),
    "b2g4": RepVGGConfig(B_DEPTHS, (2.5, 2.5, 2.5, 5), groups=4),
    "b3": RepVGGConfig(B_DEPTHS, (3, 3, 3, 5)),
    "b3g2": RepVGGConfig(B_DEPTHS, (3, 3, 3, 5), groups=2),
    "b3g4": RepVGGConfig(B_DEPTHS, (3, 3, 3, 5), groups=4),
    "d2se": RepVGGConfig(D_DEPTHS, (2.5, 2.5, 2.5, 5), se=True),  # the official code's D2se (320 px in its zoo)
}
GROUPWISE_LAYERS = frozenset(range(2, 27, 2))


def _channels(base: float, width_mult: float) -> int:
    """Scale a channel count, keeping it a multiple of 8 (so every group setting divides it)."""
    return max(8, int(round(base * width_mult / 8)) * 8)


class SqueezeExcite(nn.Module):
    """Channel gates from the global mean (Hu et al., CVPR 2018), as RepVGG-D2se applies them after a block's sum:
    x * sigmoid(up(relu(down(mean(x))))), 1x1 convs with bias, ``hidden`` = channels / 16."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.up(F.relu(self.down(x.mean((2, 3), keepdim=True)))))


class SEReLU(nn.Module):
    """The slot after a D2se block: relu(se(x)); a module of its own so the block stays a pure re-param block."""

    def __init__(self, channels: int):
        super().__init__()
        self.se = SqueezeExcite(channels, max(1, channels // 16))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.se(x))


class RepVGGNet(nn.Module):
    """RepVGG / QARepVGG: a plain stack of re-param blocks, each followed by ReLU (D2se: squeeze-excitation, then
    ReLU), then GAP + linear.

    ``cifar=True`` keeps full resolution in the stem and the first stage (three downsamplings instead of five),
    for 32x32 inputs.
    """

    def __init__(self, config: RepVGGConfig, block: type = RepVGGBlock, num_classes: int = 1000,
                 cifar: bool = False, width_mult: float = 1.0, in_chans: int = 3, deploy: bool = False):
        super().__init__()
        widths = [_channels(64 * config.widths[0], width_mult), _channels(128 * config.widths[1], width_mult),
                  _channels(256 * config.widths[2], width_mult), _channels(512 * config.widths[3], width_mult)]
        stem_out = min(_channels(64, width_mult), widths[0])

        def after(channels: int) -> nn.Module:
            return SEReLU(channels) if config.se else nn.ReLU()

        self.stem = nn.Sequential(block(in_chans, stem_out, 3, 1 if cifar else 2, deploy=deploy), after(stem_out))
        layers, c_in, layer_idx = [], stem_out, 1
        for stage, (depth, c_out) in enumerate(zip(config.depths, widths, strict=True)):
            stage_layers = []
            for i in range(depth):
                stride = 2 if i == 0 and not (cifar and stage == 0) else 1
                groups = config.groups if layer_idx in GROUPWISE_LAYERS else 1
                stage_layers += [block(c_in, c_out, 3, stride, groups, deploy=deploy), after(c_out)]
                c_in, layer_idx = c_out, layer_idx + 1
            layers.append(nn.Sequential(*stage_layers))
        self.stages = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


class ECBSR(nn.Module):
    """ECBSR (Zhang et al., ACM MM 2021): ECB + PReLU stack, pixel-shuffle upsampling, nearest-neighbour
    residual. m4c8 = 4 middle blocks of 8 channels. Works on ``colors`` channels (1 = the Y channel)."""

    def __init__(self, scale: int = 2, num_blocks: int = 4, channels: int = 8, colors: int = 1,
                 with_identity: bool = False, deploy: bool = False):
        super().__init__()
        if scale not in (2, 3, 4):
            raise RepqError(f"ECBSR scale must be 2, 3 or 4, got {scale}")
        self.scale, self.colors = scale, colors
        # with_identity on every block, as the authors' with_idt: it applies wherever in == out channels (the last
        # block too when channels == colors * scale^2, m4c4 x2).
        body: list[nn.Module] = [ECBlock(colors, channels, with_identity=with_identity, deploy=deploy),
                                 nn.PReLU(channels)]
        for _ in range(num_blocks):
            body += [ECBlock(channels, channels, with_identity=with_identity, deploy=deploy), nn.PReLU(channels)]
        body.append(ECBlock(channels, colors * scale * scale, with_identity=with_identity, deploy=deploy))
        self.body = nn.Sequential(*body)

    def forward(self, x: Tensor) -> Tensor:
        residual = x.repeat_interleave(self.scale * self.scale, dim=1)
        return F.pixel_shuffle(self.body(x) + residual, self.scale)


def _resnet18(num_classes: int = 1000, cifar: bool = False) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    if cifar:
        model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _repvgg_factory(variant: str, block: type) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 1000, cifar: bool = False, width_mult: float = 1.0, in_chans: int = 3,
                deploy: bool = False) -> nn.Module:
        return RepVGGNet(REPVGG_CONFIGS[variant], block, num_classes, cifar, width_mult, in_chans, deploy)

    if block is PlainBlock:
        factory.__doc__ = (f"{variant.upper()} of RepVGG (Ding et al., CVPR 2021) with single conv-BN layers, no "
                           "re-param: the Plain baseline of RepQ's Table 2.")
    else:
        paper = "QARepVGG (Chu et al., AAAI 2024)" if block is QARepVGGBlock else "RepVGG (Ding et al., CVPR 2021)"
        factory.__doc__ = f"{variant.upper()} of {paper}."
    return factory


def _mobileone_factory(variant: str) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 1000, cifar: bool = False, width_mult: float = 1.0, in_chans: int = 3,
                deploy: bool = False) -> nn.Module:
        return MobileOneNet(MOBILEONE_CONFIGS[variant], num_classes, cifar, width_mult, in_chans, deploy)

    factory.__doc__ = f"MobileOne-{variant.upper()} (Vasu et al., CVPR 2023), laid out as timm's mobileone_{variant}."
    return factory


def _converted_resnet18(block: str) -> Callable[..., nn.Module]:
    def factory(num_classes: int = 1000, cifar: bool = False, deploy: bool = False) -> nn.Module:
        return convert_convs(_resnet18(num_classes, cifar), block, deploy=deploy)

    factory.__doc__ = f"torchvision ResNet-18, every kxk conv+BN converted to {block} blocks (convert_convs)."
    return factory


def _plain_resnet18(num_classes: int = 1000, cifar: bool = False, deploy: bool = False) -> nn.Module:
    """torchvision ResNet-18 (He et al., CVPR 2016), plain convs: the 'Plain' baseline."""
    return _resnet18(num_classes, cifar)


def _ecbsr_m4c8(scale: int = 2, colors: int = 1, deploy: bool = False) -> nn.Module:
    """ECBSR-M4C8 (Zhang et al., ACM MM 2021): 4 ECBs of 8 channels."""
    return ECBSR(scale, 4, 8, colors, deploy=deploy)


MODELS: dict[str, Callable[..., nn.Module]] = {
    **{f"repvgg_{v}": _repvgg_factory(v, RepVGGBlock) for v in REPVGG_CONFIGS},
    **{f"qarepvgg_{v}": _repvgg_factory(v, QARepVGGBlock) for v in REPVGG_CONFIGS},
    **{f"plain_{v}": _repvgg_factory(v, PlainBlock) for v in REPVGG_CONFIGS},
    **{f"mobileone_{v}": _mobileone_factory(v) for v in MOBILEONE_CONFIGS},
    "resnet18": _plain_resnet18,
    **{f"resnet18_{b}": _converted_resnet18(b) for b in ("acb", "dbb", "orepa", "repvgg")},
    "ecbsr_m4c8": _ecbsr_m4c8,
}

TRANSFORMS: dict[str, Callable[..., nn.Module]] = {"substitute_qarepvgg": substitute_qarepvgg,
                                                  "convert_convs": convert_convs}


def list_models() -> list[str]:
    return sorted(MODELS)


def model_doc(name: str) -> str:
    """The first line of a zoo model's docstring (its paper)."""
    return (MODELS[name].__doc__ or "").strip().splitlines()[0]


def is_super_resolution(name: str) -> bool:
    """Whether zoo model `name` maps a low-resolution Y image to a high-resolution one (else: a classifier)."""
    return name.startswith("ecbsr")


def create_model(name: str, num_classes: int | None = None, *, convert: str | None = None, **kwargs) -> nn.Module:
    """Build a zoo model by name, or a torchvision CNN by its name (random weights); ``convert`` re-parametrizes
    its kxk conv+BN pairs into those blocks (convert_convs); ``deploy=True`` builds a zoo model's fused form
    directly (to load fused weights). The recipe of the build is kept on ``model.repq_arch``."""
    factory = MODELS.get(name) or _torchvision_factory(name)
    if factory is None:
        close = difflib.get_close_matches(name, MODELS, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "run `repq models` for the list"
        raise RepqError(f"unknown model {name!r}: {hint}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    accepted = inspect.signature(factory).parameters
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise RepqError(f"model {name} does not take {', '.join(unknown)}: it takes {', '.join(accepted)}")
    model = factory(**kwargs)
    deploy = kwargs.pop("deploy", False)
    model.repq_arch = {"name": name, "kwargs": kwargs, "deploy": deploy}
    if convert is not None:
        model = convert_convs(model, convert, deploy=deploy)
        model.repq_arch["transforms"] = [f"convert_convs:{convert}"]
    return model


def _torchvision_factory(name: str) -> Callable[..., nn.Module] | None:
    """A torchvision classification model by name, built without downloading weights."""
    try:
        import torchvision
    except ImportError:
        return None
    if name not in torchvision.models.list_models(module=torchvision.models):
        return None

    def factory(num_classes: int = 1000, cifar: bool = False) -> nn.Module:
        """`cifar` is accepted for the zoo's sake: a torchvision architecture keeps its own stem."""
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)

    return factory


def model_from_arch(arch: dict) -> nn.Module:
    """Rebuild a model from ``model.repq_arch`` (as saved in checkpoints), with its transforms."""
    try:
        name, kwargs = arch["name"], dict(arch.get("kwargs", {}))
    except (KeyError, TypeError) as err:
        raise RepqError(f"checkpoint architecture record {arch!r} is malformed: re-save the checkpoint") from err
    if arch.get("deploy") and not any(t.startswith("convert_convs") for t in arch.get("transforms", [])):
        # Substitution only changes training branches; the deploy form is the same plain conv stack.
        model = create_model(name, deploy=True, **kwargs)
    elif arch.get("deploy"):  # converted convs: build the training form, convert, fuse
        from repq.reparam.convert import fuse_model

        model = fuse_model(model_from_arch({**arch, "deploy": False}))
    else:
        model = create_model(name, **kwargs)
        for transform in arch.get("transforms", []):
            name_, _, argument = transform.partition(":")
            if name_ not in TRANSFORMS:
                raise RepqError(f"checkpoint asks for unknown transform {transform!r}: known are "
                                f"{', '.join(TRANSFORMS)}")
            model = TRANSFORMS[name_](model, argument) if argument else TRANSFORMS[name_](model)
    model.repq_arch = dict(arch)
    return model


def model_label(model_or_arch) -> str:
    """The name a person knows a model by: the zoo name with its transforms applied (a substituted repvgg_a0
    is qarepvgg_a0); a model without a record is named by its class."""
    arch = model_or_arch if isinstance(model_or_arch, dict) else getattr(model_or_arch, "repq_arch", None)
    if not isinstance(arch, dict):
        return type(model_or_arch).__name__
    name = str(arch.get("name", "model"))
    for transform in arch.get("transforms", []):
        if transform == "substitute_qarepvgg":
            name = f"qa{name}" if name.startswith("repvgg") else f"{name}+qarepvgg"
        else:
            name = f"{name}+{transform}"
    return name


def custom_l2(model: nn.Module) -> Tensor:
    """RepVGG's custom L2 summed over the model's RepVGG blocks (zero when it has none)."""
    terms = [m.custom_l2() for m in model.modules() if isinstance(m, RepVGGBlock) and not m.deployed]
    return torch.stack(terms).sum() if terms else torch.zeros(())
