"""Bring your own model: checkpoints of the official RepVGG code and timm import exactly (outputs against the
source model, train form and fused), YOLOv6-style blocks inside any network are adapted exactly and then go
through RepQ fine-tuning and QDQ export, and bad files are one-line errors that write nothing."""

import argparse
import copy
import re

import numpy as np
import pytest
import torch
from foreign_blocks import OFFICIAL_VARIANTS, RefQARepVGGBlock, RefRepVGG, RefRepVGGBlock, TinyDetector, randomize
from torch import nn

from repq.errors import RepqError
from repq.reparam import RepVGGBlock, fuse_model
from repq.reparam.adapt import adapt
from repq.reparam.importers import import_checkpoint, resolve
from repq.reparam.io import load_checkpoint
from repq.reparam.models import REPVGG_CONFIGS, model_from_arch

TOLERANCE = 1e-5  # float32, relative to the output's magnitude (outputs here are O(1))


def _imported(ckpt: dict) -> nn.Module:
    model = model_from_arch(ckpt["arch"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def _assert_same(reference: torch.Tensor, *outputs: torch.Tensor) -> None:
    scale = max(1.0, float(reference.abs().max()))
    for out in outputs:
        assert float((out - reference).abs().max()) <= TOLERANCE * scale


@torch.no_grad()
def _check_exact(source: nn.Module, ckpt: dict, size: int = 64) -> None:
    x = torch.randn(2, 3, size, size)
    imported = _imported(ckpt)
    _assert_same(source.eval()(x), imported(x), fuse_model(imported)(x))


# ------------------------------------------------------------------------------------------ the official layout


@pytest.mark.parametrize("block", [RefRepVGGBlock, RefQARepVGGBlock], ids=["repvgg", "qarepvgg"])
@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
def test_official_layout_imports_exactly_from_a_wrapped_file(tmp_path, block, deploy):
    source = randomize(RefRepVGG("a0", num_classes=7, block=block))
    if deploy:
        source.switch_to_deploy()
    path = tmp_path / "RepVGG-A0.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    ckpt = import_checkpoint(path, tmp_path / "a0.pt")
    expected = "qarepvgg_a0" if block is RefQARepVGGBlock and not deploy else "repvgg_a0"
    assert ckpt["arch"]["name"] == expected and ckpt["arch"]["kwargs"]["num_classes"] == 7
    assert ckpt["imported"]["container"] == "state_dict" and ckpt["imported"]["deploy"] == deploy
    assert load_checkpoint(tmp_path / "a0.pt")["arch"] == ckpt["arch"]  # what every stage loads
    _check_exact(source, ckpt)


@pytest.mark.parametrize("variant", list(OFFICIAL_VARIANTS))
@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
def test_every_official_variant_resolves_to_its_zoo_model(variant, deploy):
    """Depths, widths, groups and classes come from the tensors (shapes only: built on the meta device)."""
    with torch.device("meta"):
        source = RefRepVGG(variant, num_classes=5)
    if deploy:
        for module in source.modules():
            if isinstance(module, RefRepVGGBlock):
                conv = module.rbr_dense.conv
                module.rbr_reparam = nn.Conv2d(conv.in_channels, conv.out_channels, 3, conv.stride, 1,
                                               groups=conv.groups, device="meta")
                del module.rbr_dense, module.rbr_1x1, module.rbr_identity
    found = resolve(source.state_dict())
    assert (found.name, found.classes, found.deploy) == (f"repvgg_{variant}", 5, deploy)


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
def test_official_d2se_with_its_squeeze_excitation_imports_exactly(deploy):
    """D2se's SE (``se.down``/``se.up`` after each block's sum) lands in the slot after the block; 32x32 inputs keep
    the 133M-parameter reference cheap (a 1x1 map at the end)."""
    source = randomize(RefRepVGG("d2se", num_classes=10))
    if deploy:
        source.switch_to_deploy()
    ckpt = import_checkpoint(source.state_dict())
    assert ckpt["arch"]["name"] == "repvgg_d2se" and ckpt["imported"]["deploy"] == deploy
    _check_exact(source, ckpt, size=32)


# ------------------------------------------------------------------------------------------ timm


import timm  # noqa: E402 -- the independent RepVGG and MobileOne (a test extra)


def test_a_live_timm_model_imports_exactly():
    source = randomize(timm.create_model("repvgg_a0", num_classes=10))
    ckpt = import_checkpoint(source)
    assert ckpt["arch"]["name"] == "repvgg_a0" and ckpt["imported"]["format"] == "timm"
    _check_exact(source, ckpt)


def test_a_deployed_timm_state_dict_under_ema_imports_exactly(tmp_path):
    from timm.utils.model import reparameterize_model

    source = reparameterize_model(randomize(timm.create_model("repvgg_a0", num_classes=10)))
    path = tmp_path / "timm_deploy.pth"
    # timm's training checkpoint: its settings as an argparse.Namespace, the EMA weights beside the raw ones
    torch.save({"epoch": 9, "arch": "repvgg_a0", "args": argparse.Namespace(lr=0.1), "state_dict": {},
                "state_dict_ema": source.state_dict()}, path)
    ckpt = import_checkpoint(path)
    assert ckpt["imported"]["container"] == "state_dict_ema" and ckpt["imported"]["deploy"]
    _check_exact(source, ckpt)
    # The train form it imports into trains: its 1x1 branches are silent (gamma 0) but not dead (random convs).
    blocks = [b for b in _imported(ckpt).modules() if isinstance(b, RepVGGBlock)]
    assert all(not b.rbr_1x1.bn.weight.detach().any() and b.rbr_1x1.conv.weight.detach().any() for b in blocks)


@pytest.mark.parametrize("name", timm.list_models("repvgg_*"))
def test_every_timm_repvgg_resolves_to_its_zoo_model(name):
    assert name.removeprefix("repvgg_") in REPVGG_CONFIGS
    with torch.device("meta"):
        source = timm.create_model(name, num_classes=1000)
    assert resolve(source.state_dict()).name == name


def test_a_live_timm_d2se_imports_exactly():
    source = randomize(timm.create_model("repvgg_d2se", num_classes=10))
    ckpt = import_checkpoint(source)
    assert ckpt["arch"]["name"] == "repvgg_d2se"
    _check_exact(source, ckpt, size=32)


def test_a_timm_variant_the_zoo_lacks_names_the_closest():
    from timm.models.byobnet import ByobNet, ByoModelCfg, _rep_vgg_bcfg

    # B3's depths and widths with a wider last stage: a RepVGG no zoo (the official, timm's, repq's) has
    with torch.device("meta"):
        source = ByobNet(ByoModelCfg(blocks=_rep_vgg_bcfg(wf=(3.0, 3.0, 3.0, 6.0)), stem_type="rep"),
                         num_classes=1000)
    with pytest.raises(RepqError, match="matches no repq model; closest: repvgg_b3, .* tensors differ"):
        resolve(source.state_dict())


def test_a_live_timm_mobileone_imports_exactly_and_its_deploy_form_stays_deployed():
    from timm.utils.model import reparameterize_model

    source = randomize(timm.create_model("mobileone_s0", num_classes=10))
    ckpt = import_checkpoint(source)
    assert ckpt["arch"]["name"] == "mobileone_s0" and ckpt["imported"]["format"] == "timm-mobileone"
    _check_exact(source, ckpt)
    # MobileOne blocks cannot start from one conv (no load_conv_bn): a deploy checkpoint imports as the deploy form.
    deployed = import_checkpoint(reparameterize_model(source).state_dict())
    assert deployed["arch"]["deploy"] and deployed["imported"]["deploy"]
    _check_exact(source, deployed)


@pytest.mark.parametrize("name", ["mobileone_s1", "mobileone_s2", "mobileone_s3", "mobileone_s4"])
def test_timm_mobileone_variants_resolve_to_their_zoo_model(name):
    with torch.device("meta"):
        source = timm.create_model(name, num_classes=1000)
    assert resolve(source.state_dict()).name == name


# ------------------------------------------------------------------------------------------ adapt: YOLOv6-style


@pytest.mark.parametrize("deploy", [False, True], ids=["train", "deploy"])
def test_adapt_replaces_yolov6_blocks_in_a_detector_exactly(deploy):
    source = randomize(TinyDetector())
    if deploy:
        for module in source.modules():
            if isinstance(module, RefRepVGGBlock):
                module.switch_to_deploy()
    model = copy.deepcopy(source)
    lines = []
    report = adapt(model, log=lines.append)
    assert len(report.replaced) == 7 and not report.unrecognised and lines == [str(report)]
    assert not any(isinstance(m, RefRepVGGBlock) for m in model.modules())
    assert isinstance(model.reduce, nn.Conv2d) and model.reduce is not source.reduce  # the rest left as it was
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got, fused = source.eval()(x), model.eval()(x), fuse_model(model)(x)
    for e, g, f in zip(expected, got, fused, strict=True):
        _assert_same(e, g, f)


@pytest.mark.parametrize("name,blocks", [("repvgg_a0", 22), ("mobileone_s0", 43)])
def test_adapt_replaces_the_blocks_of_a_timm_model_exactly(name, blocks):
    source = randomize(timm.create_model(name, num_classes=10))
    model = copy.deepcopy(source)
    report = adapt(model, log=lambda line: None)
    assert len(report.replaced) == blocks and not report.unrecognised
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _assert_same(source(x), model.eval()(x), fuse_model(model)(x))


class _DilatedBlock(RefRepVGGBlock):
    def __init__(self):
        super().__init__(4, 4)
        self.rbr_dense.conv = nn.Conv2d(4, 4, 3, 1, 2, dilation=2, bias=False)


class _DenseOnly(RefRepVGGBlock):
    """The structure of a RepVGG block, another forward: the output check must catch it."""

    def forward(self, x):
        return self.nonlinearity(self.rbr_dense(x))


class _OtherReparam(nn.Module):
    """A re-param block of a family repq does not adapt (its own branch names)."""

    def __init__(self):
        super().__init__()
        self.dbb_origin = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.dbb_origin(x)

    def switch_to_deploy(self):
        pass


class _UserStage(nn.Module):
    """A user's container: a child named `identity` and a model-wide switch_to_deploy are no re-param block."""

    def __init__(self):
        super().__init__()
        self.identity = nn.Identity()
        self.body = RefRepVGGBlock(4, 4)

    def forward(self, x):
        return self.body(self.identity(x))

    def switch_to_deploy(self):
        self.body.switch_to_deploy()


def test_adapt_lists_what_it_cannot_take_one_line_each_and_leaves_it_alone():
    model = nn.Sequential(RefRepVGGBlock(3, 4), _DilatedBlock(), _DenseOnly(4, 4), _OtherReparam(),
                          nn.Sequential(RefQARepVGGBlock(4, 4)), nn.Conv2d(4, 4, 1), _UserStage())
    randomize(model)
    lines = []
    report = adapt(model, log=lines.append)
    assert [name for name, _ in report.replaced] == ["0", "4.0", "6.body"]
    assert [name for name, _ in report.unrecognised] == ["1", "2", "3"]
    assert len(lines) == 4 and all("\n" not in line for line in lines)
    assert "dilation" in lines[1] and "outputs differ" in lines[2] and "_OtherReparam" in lines[3]
    assert isinstance(model[1], _DilatedBlock) and isinstance(model[2], _DenseOnly)
    assert isinstance(model[3], _OtherReparam) and isinstance(model[5], nn.Conv2d)


class _Flat(nn.Module):
    """Both heads as one tensor: `finetune` trains one output against float targets (L1)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, x):
        return torch.cat([head.flatten(1) for head in self.detector(x)], 1)


def test_an_adapted_detector_fine_tunes_with_repq_and_exports_a_qdq_file_equal_to_it(tmp_path):
    import onnxruntime as ort

    from repq.quant.finetune import export_quantized, finetune, quantized_model

    detector = randomize(TinyDetector())
    adapt(detector, log=lambda line: None)
    model = quantized_model(detector, method="bnest_corrected", w_bits=8, a_bits=8)
    gen = torch.Generator().manual_seed(0)
    images, targets = torch.randn(24, 3, 32, 32, generator=gen), torch.randn(24, 7 * 8 * 8, generator=gen)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = finetune(_Flat(model), loader, epochs=1, lr=0.01, log=lambda line: None)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if "rbr_1x1" in n)
    model.eval()
    path = export_quantized(model, tmp_path / "detector.onnx", "tensorrt", (1, 3, 32, 32), dynamic_batch=True)
    x = torch.randn(16, 3, 32, 32, generator=gen)
    with torch.no_grad():
        expected = [head.numpy() for head in fuse_model(model).eval()(x)]
    # The file as written (no graph rewrites) computes the fused fake-quant model to float rounding, but for ties.
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for options, exact in ((plain, True), (None, False)):
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert len(got) == len(expected) == 2
        for g, e in zip(got, expected, strict=True):
            scale = np.abs(e).max()
            if exact:
                # Float rounding may put one activation on the other side of a rounding tie (measured on a
                # Sapphire Rapids CPU: one code step, 0.3% of the output's range, reaching a few outputs).
                off = np.abs(g - e) > TOLERANCE * max(1.0, scale)
                assert off.mean() <= 0.01 and np.abs(g - e).max() <= 0.01 * scale, (off.mean(), np.abs(g - e).max())
            else:
                # ORT's own optimizations turn DQ -> Conv -> Q into integer QLinearConv, whose requantization
                # rounds differently: a few code steps, propagated; never a systematic difference.
                assert np.abs(g - e).max() <= 0.05 * scale


def test_an_adapted_detector_goes_through_toolkit_ptq_and_its_qdq_file_equals_it(tmp_path):
    import onnxruntime as ort

    import repq
    from repq.engines.export import export_onnx

    detector = randomize(TinyDetector())
    adapt(detector, log=lambda line: None)
    gen = torch.Generator().manual_seed(0)
    quantized = repq.ptq(detector, [(torch.randn(8, 3, 32, 32, generator=gen), torch.zeros(8))], method="max")
    path = export_onnx(quantized, tmp_path / "ptq.onnx", "tensorrt", (1, 3, 32, 32), dynamic_batch=True)
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        expected = quantized(x)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert len(got) == 2
    for g, e in zip(got, expected, strict=True):
        _assert_same(e, torch.from_numpy(g))


# ------------------------------------------------------------------------------------------ bad input, CLI


def _repq_import(capsys, *args):
    """`repq import ARGS` in this process: (exit code, stdout, stderr)."""
    from repq.pipeline.cli import main

    capsys.readouterr()
    code = main(["import", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def a1_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("a1") / "RepVGG-A1-train.pth"
    torch.save(randomize(RefRepVGG("a1", num_classes=10)).state_dict(), path)
    return path


def _truncated(folder, a1_file):
    data = a1_file.read_bytes()
    path = folder / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    return path


def _unknown_keys(folder, a1_file):
    state = torch.load(a1_file, weights_only=True)
    state["stage1.0.rbr_gate.weight"] = torch.zeros(64, 1, 1, 1)  # a branch no RepVGG has
    path = folder / "with_gate.pth"
    torch.save(state, path)
    return path


def _pickled_model(folder, a1_file):
    path = folder / "detector.pt"
    torch.save({"model": TinyDetector()}, path)  # what YOLOv6's trainer saves: the module object itself
    return path


@pytest.mark.parametrize("case,extra,message", [
    ("wrong_variant", ["--model", "repvgg_a0"], "holds a repvgg_a1 .*not a repvgg_a0: pass --model repvgg_a1"),
    ("class_count", ["--num-classes", "1000"], "has a 10-class head, but 1000 classes are asked for"),
    ("truncated", [], "is truncated or not a PyTorch checkpoint"),
    ("unknown_keys", [], r"1 of \d+ keys fit no repq model \(stage1.0.rbr_gate.weight\); closest known format: "
                         "official"),
    ("pickled", [], "holds pickled Python objects .*weights_only=True"),
    ("bad_format", ["--format", "timm"], "fit no repq model"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, a1_file, case, extra, message):
    src = {"truncated": _truncated, "unknown_keys": _unknown_keys, "pickled": _pickled_model}.get(
        case, lambda folder, path: path)(tmp_path, a1_file)
    out = tmp_path / "new" / "a0.pt"
    code, _, err = _repq_import(capsys, src, "--out", out, *extra)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), err
    assert not out.exists() and not out.parent.exists()


def test_the_import_command_writes_a_checkpoint_every_stage_loads(tmp_path, capsys, a1_file):
    from repq.quant.artifacts import load_artifact

    out = tmp_path / "a1.pt"
    code, stdout, err = _repq_import(capsys, a1_file, "--out", out, "--model", "repvgg_a1", "--num-classes", "10")
    assert code == 0, err
    assert "official layout, train form -> repvgg_a1 (10 classes)" in stdout
    artifact = load_artifact(out)
    assert artifact.kind == "float" and artifact.arch["name"] == "repvgg_a1"
    source = RefRepVGG("a1", num_classes=10)
    source.load_state_dict(torch.load(a1_file, weights_only=True))
    _check_exact(source, load_checkpoint(out))
