"""Training stage: schedule, weight decay groups, checkpoints, kill + resume, 2-process gloo DDP, CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from repq.errors import RepqError
from repq.reparam import create_model
from repq.training.config import TrainConfig
from repq.training.loop import warmup_cosine
from repq.training.train import (
    autocast_dtype,
    load_model_checkpoint,
    make_optimizer,
    parameter_groups,
    regularizer,
    train,
    use_channels_last,
)


def _free_port() -> int:
    """A port nobody listens on now: a fixed one collides with any other torchrun on the machine."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

ROOT = Path(__file__).resolve().parents[1]
# Tiny and fast: 8-24 channel RepVGG-A0 on digits, a few steps per epoch.
TINY = dict(model="repvgg_a0", width_mult=0.125, batch_size=32, lr=0.05, warmup_epochs=0.5, progress=False,
            max_steps_per_epoch=4, epochs=2)

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(int(sys.argv[1]))
    if sys.argv[5] == "float64":
        torch.set_default_dtype(torch.float64)  # the model is built in float64; inputs follow it
    from repq.training.config import TrainConfig
    from repq.training.train import train
    settings = TrainConfig.model_validate_json(sys.argv[2])
    kill_at = int(sys.argv[4])
    def on_step(epoch, step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a hard kill: no cleanup, no finally
    train(settings, "digits", sys.argv[3], on_step=on_step if kill_at else None)
""")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run_script(tmp_path: Path, settings: TrainConfig, out: Path, kill_at: int = 0, launcher=(),
                dtype: str = "float32"):
    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT)
    cmd = [*launcher, str(script), str(torch.get_num_threads()), settings.model_dump_json(), str(out), str(kill_at),
           dtype]
    return subprocess.run(cmd if launcher else [sys.executable, *cmd], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=240)


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_warmup_cosine_by_hand():
    f = warmup_cosine(total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f(10) == pytest.approx(0.1)


@pytest.mark.parametrize("l2", ["plain", "custom"])
def test_weight_decay_skips_bn_and_bias_and_what_custom_l2_covers(l2):
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125)
    decay, no_decay = parameter_groups(model, TrainConfig(l2=l2))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0
    assert not any(".bn." in n or n.endswith("bias") or "rbr_identity" in n for n in decayed)
    branch_weights = {n for n in names.values() if n.endswith(("rbr_dense.conv.weight", "rbr_1x1.conv.weight"))}
    assert "head.2.weight" in decayed
    if l2 == "plain":
        assert branch_weights <= decayed
    else:  # RepVGG's custom L2 regularises these through the loss instead
        assert not branch_weights & decayed
    adamw = make_optimizer(model, TrainConfig(l2=l2, optimizer="adamw", lr=1e-3))
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [5e-4, 0.0]


def test_custom_l2_enters_the_loss_only_when_chosen():
    from repq.reparam import custom_l2

    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125)
    assert regularizer(model, TrainConfig(l2="plain")) == 0.0
    term = regularizer(model, TrainConfig(l2="custom", weight_decay=1e-3))
    assert torch.isclose(term, 0.5 * 1e-3 * custom_l2(model)) and term.requires_grad


def test_kill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    settings = TrainConfig(**TINY)
    reference = tmp_path / "reference"
    train(settings, "digits", reference)
    killed = tmp_path / "killed"
    result = _run_script(tmp_path, settings, killed, kill_at=settings.max_steps_per_epoch + 2)
    assert result.returncode == -9, result.stderr[-2000:]
    assert torch.load(killed / "last.pt", weights_only=True)["epoch"] == 1
    summary = train(settings, "digits", killed, resume=True)
    assert summary["epochs"] == 2
    ref, got = _weights(reference / "last.pt"), _weights(killed / "last.pt")
    assert ref.keys() == got.keys()
    for key in ref:
        assert torch.equal(ref[key], got[key]), f"{key} differs after resume"
    got_log, ref_log = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
                        for d in (killed, reference))
    assert [r["epoch"] for r in got_log] == [1, 2]
    for key in ("train_loss", "train_top1", "val_top1", "lr"):
        assert [r[key] for r in got_log] == [r[key] for r in ref_log]


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    # float64: in float32 this deep 8-channel net amplifies summation-order noise through BatchNorms of
    # near-dead channels (up to 1e-2 after 3 steps), which would hide a real error; in float64 a correct
    # all-reduce and synchronised BatchNorm agree to ~1e-12, while any wrong term shows at full size.
    settings = TrainConfig(**{**TINY, "epochs": 1, "max_steps_per_epoch": 3})
    single = tmp_path / "single"
    result = _run_script(tmp_path, settings, single, dtype="float64")
    assert result.returncode == 0, result.stderr[-3000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                str(_free_port())]
    result = _run_script(tmp_path, settings, tmp_path / "ddp", launcher=launcher, dtype="float64")
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _weights(single / "last.pt"), _weights(tmp_path / "ddp" / "last.pt")
    moved = 0
    initial = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125).state_dict()
    for key in one:
        assert one[key].dtype in (torch.float64, torch.int64)
        torch.testing.assert_close(two[key], one[key], rtol=1e-9, atol=1e-10, msg=lambda m, k=key: f"{k}: {m}")
        moved += int(not torch.equal(one[key], initial[key].to(one[key].dtype)))
    assert moved > len(one) // 2  # the comparison is about trained weights, not untouched ones
    a = json.loads((single / "metrics.jsonl").read_text().splitlines()[0])
    b = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0])
    assert a["val_top1"] == pytest.approx(b["val_top1"], abs=1.0)  # 180 images: one image is 0.56 points


def test_run_folder_contract_and_deploy_check(tmp_path):
    summary = train(TrainConfig(**TINY, keep_every=2), "digits", tmp_path / "run", recipe={"name": "tiny", "seed": 0})
    out = tmp_path / "run"
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    assert sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_002.pt"]  # keep_every=2 of 2 epochs
    kept, last = (torch.load(out / name, weights_only=True) for name in ("epoch_002.pt", "last.pt"))
    assert kept["epoch"] == 2 and all(torch.equal(kept["state_dict"][k], v) for k, v in last["state_dict"].items())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert 0 <= r["val_top1"] <= 100 and "val_top5" in r and r["deploy_agrees"]
        assert abs(r["deploy_val_top1"] - r["val_top1"]) < 1e-9
    best_epoch = max(records, key=lambda r: r["val_top1"])["epoch"]
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == best_epoch == summary["best"]["epoch"]
    model, ckpt = load_model_checkpoint(out / "last.pt", expect_arch="repvgg_a0")
    assert ckpt["data"]["classes"] == [str(i) for i in range(10)] and ckpt["settings"]["l2"] == "plain"
    assert ckpt["recipe"] == {"name": "tiny", "seed": 0} and ckpt["epoch"] == 2 and "rng" in ckpt["train_state"]
    x = torch.randn(2, 3, 32, 32)
    assert model.eval()(x).shape == (2, 10)
    with pytest.raises(RepqError, match="already holds a training run"):
        train(TrainConfig(**TINY), "digits", out)


def test_bad_checkpoints_get_clear_errors(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**{**TINY, "epochs": 1, "max_steps_per_epoch": 1}), "digits", out)
    with pytest.raises(RepqError, match="holds a repvgg_a0, not a qarepvgg_a0"):
        load_model_checkpoint(out / "last.pt", expect_arch="qarepvgg_a0")
    with pytest.raises(RepqError, match="trained as"):
        train(TrainConfig(**{**TINY, "model": "qarepvgg_a0", "epochs": 2}), "digits", out, resume=True)
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(RepqError, match="corrupt or truncated"):
        load_model_checkpoint(out / "last.pt")
    with pytest.raises(RepqError, match="corrupt or truncated"):
        train(TrainConfig(**{**TINY, "epochs": 2}), "digits", out, resume=True)


def test_nan_input_stops_training_with_a_clear_error(tmp_path, monkeypatch):
    from repq.calibration.datasets import ImageSet, load_data

    data = load_data("digits")
    real = ImageSet.__getitems__

    def poisoned(self, positions):
        images, labels = real(self, positions)
        return images.index_fill(0, torch.tensor([0]), float("nan")), labels

    monkeypatch.setattr(ImageSet, "__getitems__", poisoned)
    with pytest.raises(RepqError, match="NaN/Inf"):
        train(TrainConfig(**TINY), data, tmp_path / "nan")
    assert not (tmp_path / "nan" / "last.pt").exists()


def test_cli_settings_and_errors(tmp_path):
    import argparse

    from repq.pipeline.commands import train as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--width-mult", "0.125", "--epochs", "3", "--l2", "custom",
                              "--set", "nesterov=false", "--set", "max_steps_per_epoch=2", "--val-size", "5000",
                              "--set", 'model_kwargs={"deploy": false}'])
    settings = command.settings_from_args(args)
    assert settings.model_kwargs == {"deploy": False}
    assert (settings.width_mult, settings.epochs, settings.l2, settings.nesterov) == (0.125, 3, "custom", False)
    assert settings.max_steps_per_epoch == 2 and settings.val_size == 5000
    with pytest.raises(RepqError, match="did you mean label_smoothing"):
        command.settings_from_args(parser.parse_args(["--out", "x", "--set", "label_smothing=0.1"]))
    with pytest.raises(RepqError, match="training setting optimizer"):
        command.settings_from_args(parser.parse_args(["--out", "x", "--set", "optimizer=lion"]))
    with pytest.raises(SystemExit):  # a flag's choices come from the setting's type
        parser.parse_args(["--out", "x", "--optimizer", "lion"])
    with pytest.raises(RepqError, match=r"^training settings: low_res_epochs \(3\) must leave full-size epochs"):
        command.settings_from_args(parser.parse_args(["--out", "x", "--epochs", "3", "--set", "low_res=24",
                                                      "--set", "low_res_epochs=3"]))


@pytest.mark.parametrize("cifar,size", [(True, 32), (False, 112)])
def test_channels_last_training_step_equals_nchw_and_is_the_default(cifar, size):
    """NHWC is a memory format, not other math: one SGD step gives the same weights either way, also with the
    ImageNet stem's strided RGB 1x1 branch (whose oneDNN weight-gradient kernel hung or crashed in NHWC until
    it subsampled first: reparam.block.PointwiseConv). BN runs on warmed running statistics: with batch
    statistics a random deep 8-channel net is so ill-conditioned that float32 summation order alone moves the
    gradient by up to 2% (measured against float64 on a Sapphire Rapids CPU, in NHWC and in NCHW alike)."""
    from conftest import warm_bn

    torch.manual_seed(0)
    nchw = create_model("repvgg_a0", num_classes=10, cifar=cifar, width_mult=0.125)
    warm_bn(nchw, (8, 3, size, size))
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    before = copy.deepcopy(nchw.state_dict())
    x, y = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
    for model, batch in ((nchw, x), (nhwc, x.contiguous(memory_format=torch.channels_last))):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        torch.nn.functional.cross_entropy(model.eval()(batch), y).backward()
        optimizer.step()
    moved = 0
    for (name, a), b in zip(nchw.state_dict().items(), nhwc.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name
        moved += name.endswith("conv.weight") and not torch.equal(a, before[name])
    assert moved > 30  # most of the 44 branch convs took a step (the comparison is about moved weights)
    assert use_channels_last(None) and use_channels_last(True) and not use_channels_last(False)


def test_progressive_resizing_trains_the_first_epochs_on_smaller_inputs(tmp_path):
    from pydantic import ValidationError

    settings = TrainConfig(**{**TINY, "epochs": 3, "low_res": 16, "low_res_epochs": 2})
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125)
    seen = []  # (training?, input size) of every forward; deep copies of the model keep the hook
    model.register_forward_pre_hook(lambda module, args: seen.append((module.training, args[0].shape[-1])))
    summary = train(settings, "digits", tmp_path / "run", initial_model=model)
    steps = settings.max_steps_per_epoch
    train_sizes = [size for training, size in seen if training]
    assert train_sizes == [16] * (2 * steps) + [32] * steps
    assert summary["last"]["deploy_agrees"]
    with pytest.raises(ValidationError, match="must leave full-size epochs"):
        TrainConfig(epochs=2, low_res=16, low_res_epochs=2)
    with pytest.raises(ValidationError, match="needs low_res"):
        TrainConfig(epochs=2, low_res_epochs=1)


def test_bf16_asked_for_autocasts_on_the_cpu_and_evaluation_stays_float32(tmp_path):
    """precision=bf16 runs the training convs in bfloat16 on the CPU; auto keeps the CPU in float32; the
    evaluation (and its deploy check) runs the float32 weights in float32 either way."""
    settings = TrainConfig(**{**TINY, "epochs": 1, "precision": "bf16"})
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125)
    seen = []  # dtype of the model's output in every training step
    model.register_forward_hook(lambda module, args, out: seen.append(out.dtype) if module.training else None)
    summary = train(settings, "digits", tmp_path / "run", initial_model=model)
    assert seen and set(seen) == {torch.bfloat16}
    # bf16 logits would differ from the fused model's by ~1e-2: the evaluation ran in float32.
    assert summary["last"]["deploy_max_logit_diff"] < 1e-4
    cpu = torch.device("cpu")
    assert autocast_dtype(TrainConfig(), cpu) is None
    assert autocast_dtype(TrainConfig(), torch.device("cuda")) == torch.bfloat16
    with pytest.raises(RepqError, match="fp16 needs CUDA"):
        autocast_dtype(TrainConfig(precision="fp16"), cpu)
