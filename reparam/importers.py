"""Checkpoints of other code bases become repq checkpoints: `import_checkpoint(src, out)`.

Formats are told apart by their keys (``format=`` forces one): the official RepVGG layout (``stage0.``,
``stage{s}.{i}.rbr_*``, ``linear.``; ``rbr_reparam`` when deployed; QARepVGG blocks in YOLOv6's naming, a bare
1x1 conv and the post-BN ``bn``, are read too), timm's ``repvgg_*`` (``stem.``, ``stages.{s}.{i}.conv_kxk``,
``head.fc.``) and timm's ``mobileone_*``, as a file, a state dict or a live timm model. A file may wrap the weights
in the usual containers (``state_dict``, ``model``, ``ema``; ``module.`` prefixes). A layout only renames keys:
which names and shapes are right is read off the zoo models themselves (built on the meta device), so the variant,
class count, input channels and widths come from the tensors and must fill one zoo model exactly; anything else is
a one-line RepqError naming the mismatch and the fix, and nothing is written. A deploy checkpoint imports into the
train form with its fused conv in the kxk branch (the other branches start silent), so substitution and RepQ work
on it too; a family whose blocks cannot start from one conv (MobileOne) keeps the deploy form.

A network that is not a zoo model (a YOLOv6 detector, a segmentation net) cannot be rebuilt from weights alone:
build it in Python and call `repq.adapt(model)` (repq.reparam.adapt).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from repq.errors import RepqError
from repq.reparam.adapt import unit_bn
from repq.reparam.block import ReparamBlock
from repq.reparam.io import atomic_save, verify_checksum
from repq.reparam.mobileone import from_timm_key
from repq.reparam.models import create_model, list_models

# Wrappers that training code puts around a state dict, in the order they are tried: EMA weights first, since
# they are what these repositories evaluate and export.
CONTAINERS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model", "net", "params")
PREFIXES = ("module.", "_orig_mod.", "model.")  # DDP, torch.compile, wrapper modules
BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
IMPORTED_FORMAT = "repq-imported/1"


@dataclass(frozen=True)
class Layout:
    """A foreign key layout: the zoo families its weights fill and how its keys read as theirs. Which renamed keys
    are right is not written here: the zoo models themselves say it (their state dicts, built on the meta device)."""

    name: str
    description: str
    families: tuple[str, ...]  # zoo name prefixes, in order of preference
    rename: Callable[[str], str | None]


def _positional(positions: tuple[tuple[str, Callable[[re.Match], str]], ...], head: str,
                inner: tuple[tuple[str, str], ...], after: tuple[tuple[str, str], ...] = ()
                ) -> Callable[[str], str | None]:
    """A rename for RepVGG-style networks: block positions (regex -> repq block prefix), the classifier, the
    block-inner prefixes (foreign -> repq) and those that repq keeps in the slot after the block (D2se's
    squeeze-excitation); an inner key no prefix covers keeps its name (and matches nothing)."""
    compiled = tuple((re.compile(pattern), place) for pattern, place in positions)
    head_pattern = re.compile(head)

    def rename(key: str) -> str | None:
        found = head_pattern.fullmatch(key)
        if found:
            return f"head.2.{found.group(1)}"
        for pattern, place in compiled:
            found = pattern.fullmatch(key)
            if found:
                rest = found.group("inner")
                for foreign, ours in after:
                    if rest.startswith(foreign):
                        return _next_slot(place(found)) + ours + rest[len(foreign):]
                for foreign, ours in inner:
                    if rest.startswith(foreign):
                        return place(found) + ours + rest[len(foreign):]
                return place(found) + rest
        return None

    return rename


def _next_slot(prefix: str) -> str:
    """``stages.1.4.`` -> ``stages.1.5.``: the module after a block in its Sequential."""
    head, index = re.fullmatch(r"(.*\.)(\d+)\.", prefix).groups()
    return f"{head}{int(index) + 1}."


LAYOUTS: dict[str, Layout] = {
    "official": Layout(
        "official", "the official RepVGG code's layout (DingXiaoH/RepVGG; QARepVGG blocks in YOLOv6's naming)",
        ("repvgg", "qarepvgg"),
        _positional(((r"stage0\.(?P<inner>.+)", lambda m: "stem.0."),
                     (r"stage(?P<s>[1-4])\.(?P<i>\d+)\.(?P<inner>.+)",
                      lambda m: f"stages.{int(m['s']) - 1}.{2 * int(m['i'])}.")),
                    r"linear\.(weight|bias)",
                    (("rbr_reparam.", "reparam_conv."), ("bn.", "post_bn.")), (("se.", "se."),))),
    "timm": Layout(
        "timm", "timm's repvgg_* (timm.models.byobnet)", ("repvgg",),
        _positional(((r"stem\.(?P<inner>.+)", lambda m: "stem.0."),
                     (r"stages\.(?P<s>\d+)\.(?P<i>\d+)\.(?P<inner>.+)",
                      lambda m: f"stages.{m['s']}.{2 * int(m['i'])}.")),
                    r"head\.fc\.(weight|bias)",
                    (("conv_kxk.", "rbr_dense."), ("conv_1x1.", "rbr_1x1."), ("identity.", "rbr_identity.")),
                    (("attn.fc1.", "se.down."), ("attn.fc2.", "se.up.")))),
    "timm-mobileone": Layout(
        "timm-mobileone", "timm's mobileone_* (timm.models.mobileone, the authors' released models)", ("mobileone",),
        from_timm_key),
}
FORMATS = ("repq", *LAYOUTS)


# ------------------------------------------------------------------------------------------ the operation


def import_checkpoint(src: str | Path | Mapping | nn.Module, out: str | Path | None = None, *,
                      format: str | None = None, model: str | None = None, num_classes: int | None = None,
                      cifar: bool = False) -> dict:
    """The repq checkpoint of ``src`` (a file, a state dict, or a live model such as a timm ``repvgg_*``), written
    atomically to ``out`` when given. ``format`` forces a layout (FORMATS); ``model`` and ``num_classes`` are
    checks against what the weights say, never conversions. ``cifar`` builds the zoo's 32x32 stem (stride 1 in
    the stem and first stage; the weights are the same). Returns the checkpoint dict: arch, state_dict, an empty
    data record and ``imported`` (source, sha256, format, container, variant, deploy)."""
    if format is not None and format not in FORMATS:
        raise RepqError(f"unknown --format {format!r}: choose one of {', '.join(FORMATS)} (or leave it out to detect "
                        "it from the keys)")
    shown, raw, digest = _read(src)
    if isinstance(raw, Mapping) and isinstance(raw.get("arch"), dict) and "state_dict" in raw and format in (
            None, "repq"):
        ckpt = _checked_repq(raw, shown, model, num_classes)
    elif format == "repq":
        raise RepqError(f"{shown} is not a repq checkpoint (no arch/state_dict): leave --format out to detect its "
                        "layout")
    else:
        state, container = unwrap(raw, shown)
        ckpt = _import_state(state, shown, format, model, num_classes, cifar)
        ckpt["imported"].update(source=shown, sha256=digest, container="/".join(container))
        if isinstance(src, nn.Module):
            _check_outputs(src, ckpt, shown)
    if out is not None:
        atomic_save(ckpt, out)
    return ckpt


def _read(src) -> tuple[str, Any, str | None]:
    """(how to name it, the loaded object, sha256 of the file or None)."""
    if isinstance(src, nn.Module):
        return type(src).__name__, src.state_dict(), None
    if isinstance(src, Mapping):
        return "the state dict", src, None
    path = Path(src)
    if path.is_dir():
        raise RepqError(f"{path} is a folder: pass the checkpoint file")
    if not path.is_file():
        raise RepqError(f"{path} does not exist: check the path")
    data = path.read_bytes()
    try:
        # timm's training checkpoints keep their argparse.Namespace of settings: a plain record, safe to build
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = f" ({found.group(1)})" if found else ""
            raise RepqError(f"{path} holds pickled Python objects{what}, which repq does not run (weights_only=True): "
                            "save the weights alone (torch.save(model.state_dict(), ...)) and import that, or "
                            "build the model in Python and call repq.adapt(model)") from None
        raise _corrupt(path, err) from None
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise _corrupt(path, err) from None
    verify_checksum(path)  # a file repq wrote must still match its checksum
    return str(path), obj, hashlib.sha256(data).hexdigest()


def _corrupt(path: Path, err: Exception) -> RepqError:
    text = str(err).strip()
    first = text.splitlines()[0].split(". ")[0].rstrip(".")[:120] if text else type(err).__name__
    return RepqError(f"{path} is truncated or not a PyTorch checkpoint ({first}): download or copy it again")


def unwrap(obj: Any, shown: str = "the checkpoint") -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """The flat state dict inside ``obj`` and the container keys it sat under; `module.`-style prefixes gone."""
    trail: tuple[str, ...] = ()
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        key = next((k for k in CONTAINERS if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if key is None:
            keys = ", ".join(map(str, list(obj)[:5]))
            raise RepqError(f"{shown} holds no state dict (top-level keys: {keys}): pass a file whose weights sit "
                            f"at the top or under one of {', '.join(CONTAINERS)}")
        obj, trail = obj[key], (*trail, key)
    if not isinstance(obj, Mapping) or not obj:
        raise RepqError(f"{shown} holds a {type(obj).__name__}, not a state dict: pass a checkpoint of weights")
    state = dict(obj)
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state, trail


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


# ------------------------------------------------------------------------------------------ layouts


@dataclass(frozen=True)
class Resolved:
    """What a foreign state dict is: its layout, its weights under repq's keys, the zoo model they fill."""

    layout: Layout
    state: dict[str, Tensor]
    name: str
    classes: int
    channels: int
    deploy: bool


def resolve(state: dict[str, Tensor], shown: str = "the checkpoint", format: str | None = None,
            model: str | None = None, num_classes: int | None = None) -> Resolved:
    """The layout and zoo model of a flat state dict (shapes only: meta tensors work), or a one-line RepqError."""
    layout, translated, unmatched = _pick_layout(state, format)
    if unmatched:
        few = ", ".join(unmatched[:4]) + (", ..." if len(unmatched) > 4 else "")
        raise RepqError(f"{shown}: {len(unmatched)} of {len(state)} keys fit no repq model ({few}); closest known "
                        f"format: {layout.name} ({layout.description}){_network_hint(unmatched)}")
    deploy = any(k.endswith("reparam_conv.weight") for k in translated)
    if deploy and any(k.endswith(".conv.weight") for k in translated):
        raise RepqError(f"{shown} mixes fused and unfused blocks: fuse all of them or none, then import")
    if deploy:
        translated = _fold_post_bn(translated)
    classes, channels = _head_and_input(translated, shown)
    if num_classes is not None and num_classes != classes:
        raise RepqError(f"{shown} has a {classes}-class head, but {num_classes} classes are asked for (--num-classes, "
                        "or the data's): import without --num-classes, or use data with the checkpoint's classes")
    name = _variant(translated, layout, classes, channels, deploy, shown, model)
    return Resolved(layout, translated, name, classes, channels, deploy)


def _import_state(state: dict[str, Tensor], shown: str, format: str | None, model: str | None,
                  num_classes: int | None, cifar: bool) -> dict:
    found = resolve(state, shown, format, model, num_classes)
    built = _build(found.name, found.state, found.classes, found.channels, found.deploy, cifar, shown)
    return {"format": IMPORTED_FORMAT, "arch": built.repq_arch, "state_dict": built.state_dict(), "data": {},
            "settings": {}, "imported": {"format": found.layout.name, "variant": found.name,
                                         "deploy": found.deploy}}


def _pick_layout(state: dict[str, Tensor], format: str | None) -> tuple[Layout, dict[str, Tensor], list[str]]:
    """The layout that renames the most keys to keys of its zoo models (``format`` forces one), the renamed dict,
    and the keys that fit nowhere."""
    best = None
    for layout in ([LAYOUTS[format]] if format else LAYOUTS.values()):
        known = _known_keys(layout.name)
        translated, unmatched = {}, []
        for key, value in state.items():
            ours = layout.rename(key)
            if ours is None or ours not in known or ours in translated:
                unmatched.append(key)
            else:
                translated[ours] = value
        if best is None or len(unmatched) < len(best[2]):
            best = (layout, translated, unmatched)
    return best


def _candidates(layout: Layout) -> list[str]:
    return [name for family in layout.families for name in list_models() if name.startswith(f"{family}_")]


@functools.cache
def _known_keys(layout_name: str) -> frozenset[str]:
    """Every state-dict key of the layout's zoo models, train and deploy form."""
    keys = set()
    for name in _candidates(LAYOUTS[layout_name]):
        for deploy in (False, True):
            keys.update(_zoo_shapes(name, 10, 3, deploy))
    return frozenset(keys)


@functools.lru_cache(maxsize=256)
def _zoo_shapes(name: str, classes: int, channels: int, deploy: bool) -> dict[str, tuple]:
    with torch.device("meta"):
        built = create_model(name, num_classes=classes, in_chans=channels, deploy=deploy)
    return {k: tuple(v.shape) for k, v in built.state_dict().items()}


def _network_hint(unmatched: list[str]) -> str:
    if any(re.search(r"(^|\.)(rbr_dense|rbr_reparam|conv_kxk|reparam_conv)\.", k) for k in unmatched):
        return ("; its RepVGG-style blocks sit in a network repq cannot rebuild from weights (a detector, a "
                "segmentation net, an SE or custom variant): build it in Python, load the weights and call "
                "repq.adapt(model)")
    return "; pass a checkpoint of a model `repq models` lists, or --format to force a layout"


def _fold_post_bn(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """YOLOv6's deployed QARepVGG keeps its post-BN after the fused conv: fold it in (the repq deploy conv)."""
    folded = dict(state)
    for key in [k for k in state if k.endswith(".post_bn.weight")]:
        block = key[: -len("post_bn.weight")]
        bn = {s: folded.pop(f"{block}post_bn.{s}") for s in BN_STATE if f"{block}post_bn.{s}" in folded}
        weight, bias = folded[f"{block}reparam_conv.weight"], folded.get(f"{block}reparam_conv.bias")
        scale = bn["weight"] / torch.sqrt(bn["running_var"] + 1e-5)  # nn.BatchNorm2d's eps: not in a state dict
        bias = torch.zeros_like(bn["running_mean"]) if bias is None else bias
        folded[f"{block}reparam_conv.weight"] = weight * scale.reshape(-1, 1, 1, 1)
        folded[f"{block}reparam_conv.bias"] = bn["bias"] + (bias - bn["running_mean"]) * scale
    return folded


def _head_and_input(state: dict[str, Tensor], shown: str) -> tuple[int, int]:
    """(classes, input channels): the classifier's rows and the stem block's input channels (not its SE's)."""
    heads = [v for k, v in state.items() if k.startswith("head.") and k.endswith(".weight") and v.ndim == 2]
    stems = [v for k, v in state.items() if k.startswith("stem.") and ".se." not in k and v.ndim == 4]
    if len(heads) != 1 or not stems:
        missing = "classifier" if len(heads) != 1 else "stem"
        raise RepqError(f"{shown} has no {missing} weights: pass the whole model's checkpoint, not a part of it")
    return int(heads[0].shape[0]), int(stems[0].shape[1])


def _variant(state: dict[str, Tensor], layout: Layout, classes: int, channels: int, deploy: bool, shown: str,
             asked: str | None) -> str:
    """The zoo model whose keys and shapes the weights fill exactly; one line naming the closest otherwise."""
    have = {k: tuple(v.shape) for k, v in state.items()}
    scored = []
    for name in _candidates(layout):
        want = _zoo_shapes(name, classes, channels, deploy)
        wrong = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k)
                       and not (k.endswith("num_batches_tracked") and k not in have))
        scored.append((len(wrong), name, wrong, want))
    count, name, wrong, want = min(scored, key=lambda s: s[0])  # the first of equals: the layout's preference
    summary = _describe(have)
    if count == 0 and asked in (None, name):
        return name
    if count == 0:
        raise RepqError(f"{shown} holds a {name} ({summary}), not a {asked}: pass --model {name} or leave --model "
                        "out")
    first = ", ".join(f"{k} {have.get(k, 'missing')} vs {want.get(k, 'absent')}" for k in wrong[:3])
    raise RepqError(f"{shown} ({summary}) matches no repq model; closest: {name}, {count} tensors differ ({first}): "
                    "import a checkpoint of a variant `repq models` lists")


def _describe(shapes: dict[str, tuple]) -> str:
    """Layers and width per stage (``2x48`` = 2 layers of 48 channels), as a person reads a variant."""
    layers: dict[int, dict[int, int]] = {}
    for key, shape in shapes.items():
        found = re.match(r"stages\.(\d+)\.(\d+)\.", key)
        if found and len(shape) == 4:
            stage = layers.setdefault(int(found.group(1)), {})
            layer = int(found.group(2))
            stage[layer] = max(stage.get(layer, 0), shape[0])
    parts = [f"{len(stage)}x{stage[max(stage)]}" for _, stage in sorted(layers.items())]
    return f"stages {' '.join(parts) or 'none'}"


def _build(name: str, state: dict[str, Tensor], classes: int, channels: int, deploy: bool, cifar: bool,
           shown: str) -> nn.Module:
    kwargs = {"in_chans": channels, **({"cifar": True} if cifar else {})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the silent branches of a deploy import: the same file gives the same checkpoint
        built = create_model(name, num_classes=classes, deploy=deploy, **kwargs)
        _load(built, state, shown)
        if deploy:
            train = create_model(name, num_classes=classes, **kwargs)
            if _unfuse(built, train):
                built = train
    return built.eval()


def _load(model: nn.Module, state: dict[str, Tensor], shown: str) -> None:
    full = dict(model.state_dict())
    full.update({k: v.to(full[k].dtype) if v.is_floating_point() else v for k, v in state.items()})
    try:
        model.load_state_dict(full)
    except RuntimeError as err:
        raise RepqError(f"{shown} does not load into {model.repq_arch['name']} "
                        f"({str(err).strip().splitlines()[-1].strip()[:120]}): re-export the checkpoint") from None


def _unfuse(fused: nn.Module, train: nn.Module) -> bool:
    """Load ``train`` so that each block computes its deployed twin exactly (the fused conv in the kxk branch, the
    other branches silent); False, and ``train`` untouched, for a block family that cannot start from one conv."""
    blocks = {n: m for n, m in fused.named_modules() if isinstance(m, ReparamBlock)}
    twins = {n: m for n, m in train.named_modules() if isinstance(m, ReparamBlock)}
    if any(type(m).load_conv_bn is ReparamBlock.load_conv_bn for m in twins.values()):
        return False
    for name, deployed in blocks.items():
        conv = deployed.reparam_conv
        twins[name].load_conv_bn(conv, unit_bn(conv.out_channels, conv.weight))
    rest = {k: v for k, v in fused.state_dict().items() if not k.startswith(tuple(f"{n}." for n in blocks))}
    train.load_state_dict(rest, strict=False)
    return True


# ------------------------------------------------------------------------------------------ checks


def _checked_repq(ckpt: Mapping, shown: str, model: str | None, num_classes: int | None) -> dict:
    """A checkpoint repq wrote: the same checks an import makes, then itself."""
    from repq.reparam.models import model_from_arch

    arch = ckpt["arch"]
    if model is not None and arch.get("name") != model:
        raise RepqError(f"{shown} holds a {arch.get('name')}, not a {model}: pass --model {arch.get('name')} or "
                        "leave --model out")
    built = model_from_arch(arch)
    _load(built, dict(ckpt["state_dict"]), shown)
    head = [m for m in built.modules() if isinstance(m, nn.Linear)]
    if num_classes is not None and head and head[-1].out_features != num_classes:
        raise RepqError(f"{shown} has a {head[-1].out_features}-class head, but {num_classes} classes are asked for "
                        "(--num-classes, or the data's): use data with the checkpoint's classes")
    return dict(ckpt)


@torch.no_grad()
def _check_outputs(source: nn.Module, ckpt: dict, shown: str) -> None:
    """A live source model and its import compute the same function (eval mode, one random batch)."""
    from repq.reparam.models import model_from_arch

    if ckpt["arch"].get("kwargs", {}).get("cifar"):
        return  # another stem stride, by request: the function differs by design
    imported = model_from_arch(ckpt["arch"])
    imported.load_state_dict(ckpt["state_dict"])
    stem = next(m for m in imported.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(2, stem.in_channels, 64, 64, generator=torch.Generator().manual_seed(0))
    was_training = source.training
    try:
        expected = source.eval()(x.to(next(source.parameters())))
    finally:
        source.train(was_training)
    got = imported.eval()(x)
    diff = float((expected.float().cpu() - got).abs().max())
    if diff > 1e-4 * max(1.0, float(expected.abs().max())):
        raise RepqError(f"{shown} imports as {ckpt['imported']['variant']} but computes another function (max "
                        f"difference {diff:.2e}): its forward() differs from its layout; use repq.adapt(model)")
