"""`repq run / recipe / report / eval` called through their modules, as pipeline/cli.py calls them."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import yaml

from repq.errors import RepqError
from repq.pipeline.recipe import load_recipe, validate_recipe


def call(module_name: str, argv: list[str]) -> int:
    import importlib

    module = importlib.import_module(f"repq.pipeline.commands.{module_name}")
    parser = argparse.ArgumentParser(prog=f"repq {module_name}")
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_recipe_show_prints_the_resolved_recipe(capsys):
    assert call("recipe", ["--show", "stages.train.epochs=3", "seed=7"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert validate_recipe(shown) == load_recipe(None, ["stages.train.epochs=3", "seed=7"])
    assert shown["stages"]["ptq"]["sweep"]["method"] and shown["data"]["source"] == "digits"
    with pytest.raises(RepqError, match=r"stages\.train\.epoch: unknown key; did you mean 'epochs'"):
        call("recipe", ["stages.train.epoch=3"])
    with pytest.raises(RepqError, match="neither the recipe"):
        call("recipe", ["seed=1", "recipes/default.yaml"])


# ---------------------------------------------------------------- repq run + repq report with toy stages


def _toy_train(ctx):
    import torch

    from repq.reparam.io import atomic_save

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3))
    atomic_save({"state_dict": net.state_dict()}, ctx.path("fused.pt"))
    with open(ctx.path("metrics.jsonl"), "w") as handle:
        for epoch in range(1, ctx.settings.epochs + 1):
            row = {"epoch": epoch, "train_loss": 1.0 / epoch, "val_top1": 80 + epoch}
            handle.write(json.dumps(row) + "\n")
    return {"outputs": {"fused": "fused.pt"},
            "metrics": {"ladder": [{"step": "train", "top1": 90.0}, {"step": "fused", "top1": 90.0}],
                        "methods": [{"method": "FP32", "bits": 32, "engine": "onnxruntime", "top1": 90.0}]}}


def _toy_engine(ctx):
    ctx.path("model.ort.onnx").write_bytes(b"not really")
    return {"outputs": {"onnx": "model.ort.onnx"},
            "metrics": {"ladder": [{"step": "engine", "method": "PTQ max", "top1": 89.25}],
                        "methods": [{"method": "PTQ max", "bits": 8, "engine": "onnxruntime", "top1": 89.25,
                                     "latency_ms": 1.0}]}}


def test_run_then_rerun_is_cached_and_the_report_is_in_the_run_folder(tmp_path, monkeypatch, capsys):
    from repq.pipeline import stages

    monkeypatch.setattr(stages, "REGISTRY", {})
    stages.register("train", _toy_train, needs=())
    stages.register("engine", _toy_engine, needs=("train",))
    off = [f"stages.{s}.enabled=false" for s in ("substitute", "ptq", "doctor", "qat", "repq", "export", "bench")]
    argv = ["--out", str(tmp_path / "run"), "stages.train.epochs=3", *off]
    assert call("run", argv) == 0
    assert "ran train, engine" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["methods"][1]["int8_drop"] == pytest.approx(0.75)  # 90.0 - 89.25
    assert {p.name for p in (tmp_path / "run" / "plots").iterdir()} == \
        {"accuracy_latency.png", "weight_violins.png", "training_curves.png"}
    assert "| PTQ max | 90.00 | 90.00 | 89.25 | 0.75 | fused -> engine -0.75 |" in \
        (tmp_path / "run" / "report.md").read_text()
    assert call("run", argv) == 0
    assert "ran nothing; cached train, engine" in capsys.readouterr().out
    # An unregistered but enabled stage is refused before anything runs, naming the switch.
    with pytest.raises(RepqError, match=r"stages\.ptq\.enabled=false"):
        call("run", [a for a in argv if "ptq" not in a])
    # repq report renders the same report elsewhere, from the verified manifests only.
    (tmp_path / "run" / "engine" / "model.ort.onnx").write_bytes(b"tampered")
    assert call("report", [str(tmp_path / "run"), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert list(again["stages"]) == ["train"]
    with pytest.raises(RepqError, match="does not exist"):
        call("report", [str(tmp_path / "nowhere")])


# ---------------------------------------------------------------- repq eval against a direct computation


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    import torch
    from PIL import Image

    from repq.calibration.transforms import PRESETS
    from repq.reparam import create_model
    from repq.reparam.io import atomic_save

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.25).eval()
    classes = [str(i) for i in range(10)]
    preset = PRESETS["cifar"]
    data = {"preset": "cifar", "classes": classes, "image_size": 32, "mean": list(preset.mean),
            "std": list(preset.std)}
    rng = np.random.default_rng(0)
    images, labels = [], []
    for label, name in enumerate(classes):
        (root / "folder" / name).mkdir(parents=True)
        for i in range(4):
            # a random colour per image plus a gradient and noise, so pooled features differ between images
            base = rng.uniform(0, 255, 3) * np.linspace(0.2, 1.0, 32)[:, None, None]
            pixels = np.clip(base + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "folder" / name / f"{i}.png")
            images.append(pixels)
            labels.append(label)
    # The truth, computed here: normalise by hand, run the model, count argmax hits.
    mean, std = np.array(preset.mean, np.float32), np.array(preset.std, np.float32)
    x = (np.stack(images).astype(np.float32) / 255 - mean) / std
    batch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    # A random-init net pools every image to nearly the same feature: centre the head on these images so
    # that its predictions spread over the classes (then save it; the truth below is a plain forward pass).
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    features = []
    hook = head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0]))
    with torch.no_grad():
        model(batch)
        hook.remove()
        centred = features[0] - features[0].mean(0)
        head.weight.copy_(torch.randn_like(head.weight) / centred.std(0).clamp_min(1e-6))
        head.bias.copy_(-head.weight @ features[0].mean(0))
        logits = model(batch).numpy()
    checkpoint = root / "model.pt"
    atomic_save({"arch": model.repq_arch, "state_dict": model.state_dict(), "data": data}, checkpoint)
    return {"root": root, "checkpoint": checkpoint, "model": model, "logits": logits,
            "labels": np.array(labels), "data": data}


def test_eval_checkpoint_matches_a_direct_computation(classifier, capsys):
    predicted = classifier["logits"].argmax(1)
    assert len(set(predicted)) > 2, "the test model should not predict one class for everything"
    expected = 100.0 * (predicted == classifier["labels"]).mean()
    pairs = zip(classifier["logits"], classifier["labels"], strict=True)
    top5 = 100.0 * np.mean([label in np.argsort(-row)[:5] for row, label in pairs])
    folder = str(classifier["root"] / "folder")
    assert call("eval", [str(classifier["checkpoint"]), "--data", folder, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 40
    assert result["top1"] == pytest.approx(expected, abs=1e-3)
    assert result["top5"] == pytest.approx(top5, abs=1e-3)


def test_eval_maps_class_folders_by_name(classifier, tmp_path, capsys):
    import shutil

    for name in ("3", "7"):  # a folder with two of the ten classes: labels must stay 3 and 7, not 0 and 1
        shutil.copytree(classifier["root"] / "folder" / name, tmp_path / name)
    keep = np.isin(classifier["labels"], [3, 7])
    expected = 100.0 * (classifier["logits"][keep].argmax(1) == classifier["labels"][keep]).mean()
    call("eval", [str(classifier["checkpoint"]), "--data", str(tmp_path), "--json"])
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(expected, abs=1e-3)
    (tmp_path / "cat").mkdir()
    shutil.copy(tmp_path / "3" / "0.png", tmp_path / "cat" / "0.png")
    with pytest.raises(RepqError, match="classes the model does not know \\(cat\\)"):
        call("eval", [str(classifier["checkpoint"]), "--data", str(tmp_path)])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's legacy exporter, which repq uses on purpose
def test_eval_onnx_in_onnx_runtime_matches_pytorch(classifier, tmp_path, capsys):
    import onnx
    import torch
    path = tmp_path / "model.onnx"
    torch.onnx.export(classifier["model"], torch.zeros(1, 3, 32, 32), str(path), dynamo=False,
                      input_names=["images"], output_names=["logits"], dynamic_axes={"images": {0: "batch"}})
    graph = onnx.load(str(path))
    with pytest.raises(RepqError, match="records no preprocessing: pass --preset"):
        call("eval", [str(path), "--data", str(classifier["root"] / "folder")])
    graph.metadata_props.add(key="repq.data", value=json.dumps(classifier["data"]))
    onnx.save(graph, str(path))
    call("eval", [str(path), "--data", str(classifier["root"] / "folder"), "--json"])
    result = json.loads(capsys.readouterr().out)
    expected = 100.0 * (classifier["logits"].argmax(1) == classifier["labels"]).mean()
    assert result["runtime"] == "onnxruntime" and result["top1"] == pytest.approx(expected, abs=1e-3)


def test_eval_bad_inputs_are_one_line(classifier, tmp_path):
    with pytest.raises(RepqError, match="does not exist"):
        call("eval", [str(tmp_path / "missing.pt"), "--data", "digits"])
    with pytest.raises(RepqError, match="data folder .* does not exist"):
        call("eval", [str(classifier["checkpoint"]), "--data", str(tmp_path / "nowhere")])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(RepqError, match="not an artifact repq knows"):
        call("eval", [str(tmp_path / "x.txt"), "--data", "digits"])


def test_eval_super_resolution_psnr_matches_a_direct_computation(tmp_path, capsys):
    import torch
    from PIL import Image

    from repq.reparam import create_model
    from repq.reparam.io import atomic_save

    # A deploy-form ECBSR whose last conv is zero outputs the nearest-neighbour upscale of its input (its
    # residual path), a model whose PSNR this test can compute by itself.
    model = create_model("ecbsr_m4c8", scale=2, deploy=True).eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    checkpoint = tmp_path / "sr.pt"
    atomic_save({"arch": model.repq_arch, "state_dict": model.state_dict()}, checkpoint)
    rng = np.random.default_rng(0)
    expected = []
    (tmp_path / "images").mkdir()
    for i, (h, w) in enumerate(((24, 20), (17, 31))):
        ramp = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.3, 1.0, 3)
        pixels = np.clip(ramp + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
        high = Image.fromarray(pixels).crop((0, 0, w // 2 * 2, h // 2 * 2))
        low = high.resize((w // 2, h // 2), Image.BICUBIC)

        def luma(image):
            rgb = np.asarray(image, dtype=np.float64) / 255
            return (16 + 65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255

        upscaled = np.repeat(np.repeat(luma(low), 2, axis=0), 2, axis=1)
        diff = (np.clip(upscaled, 0, 1) - luma(high))[2:-2, 2:-2]
        expected.append(10 * np.log10(1 / np.mean(diff ** 2)))
    assert call("eval", [str(checkpoint), "--data", str(tmp_path / "images"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "super_resolution" and result["scale"] == 2 and result["images"] == 2
    assert result["psnr"] == pytest.approx(np.mean(expected), abs=1e-3)


def test_finetune_scores_on_the_checkpoints_own_val_split(tmp_path):
    """`repq finetune` without --val-size evaluates on the split the checkpoint trained with (digits: its val
    share and split seed), not on a fixed count that the default data may not even have."""
    import torch

    from repq.calibration.datasets import load_data
    from repq.calibration.loaders import build_loaders
    from repq.reparam import create_model
    from repq.reparam.io import atomic_save

    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125).eval()
    checkpoint = tmp_path / "best.pt"
    atomic_save({"arch": model.repq_arch, "state_dict": model.state_dict(),
                 "settings": {"val_size": 0.2, "split_seed": 3}}, checkpoint)
    _, val = build_loaders(load_data("digits", val_size=0.2, seed=3), 64)
    with torch.no_grad():
        hits = [(model(x).argmax(1) == y).sum().item() for x, y in val]
    expected = 100.0 * sum(hits) / len(val.dataset)
    out = tmp_path / "ft"
    assert call("finetune", ["--checkpoint", str(checkpoint), "--out", str(out), "--epochs", "0.05",
                             "--no-export", "--device", "cpu"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fp32"]["top1"] == pytest.approx(expected, abs=1e-6)
    assert len(val.dataset) == 359  # 20% of digits' 1,797 images, rounded


def test_finetune_on_cuda_without_a_gpu_is_a_one_line_error(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal path cannot run")
    from repq.reparam import create_model
    from repq.reparam.io import atomic_save

    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125)
    atomic_save({"arch": model.repq_arch, "state_dict": model.state_dict()}, tmp_path / "best.pt")
    with pytest.raises(RepqError, match=r"^device 'cuda' asked for CUDA but none is available: use --device cpu$"):
        call("finetune", ["--checkpoint", str(tmp_path / "best.pt"), "--out", str(tmp_path / "ft"), "--device", "cuda"])
    assert not (tmp_path / "ft").exists()


def test_finetune_killed_mid_run_resumes_with_resume_to_the_same_model(tmp_path, monkeypatch):
    """`repq finetune` killed at its 4th step (states every 2 steps) leaves OUT/finetune_state.pt: a rerun
    without --resume refuses to overwrite it, one with --resume writes the repq.pt an uninterrupted run
    writes (bit-exact) and removes the state."""
    import torch

    from repq.quant import finetune as finetune_module
    from repq.reparam import create_model
    from repq.reparam.io import atomic_save

    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125).eval()
    checkpoint = tmp_path / "best.pt"
    atomic_save({"arch": model.repq_arch, "state_dict": model.state_dict(),
                 "settings": {"val_size": 0.2, "split_seed": 3}}, checkpoint)
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--epochs", "0.7", "--batch-size", "128",
              "--w-bits", "4", "--a-bits", "4", "--no-export", "--save-every", "2"]
    assert call("finetune", [*common, "--out", str(tmp_path / "whole")]) == 0
    assert not (tmp_path / "whole" / "finetune_state.pt").exists()

    class Killed(Exception):
        pass

    real_loss, calls = finetune_module.finetune_loss, [0]

    def loss_then_kill(*args):
        calls[0] += 1
        if calls[0] == 4:
            raise Killed
        return real_loss(*args)

    monkeypatch.setattr(finetune_module, "finetune_loss", loss_then_kill)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        call("finetune", [*common, "--out", str(out)])
    monkeypatch.setattr(finetune_module, "finetune_loss", real_loss)
    assert len(torch.load(out / "finetune_state.pt", weights_only=True)["train_state"]["losses"]) == 2
    with pytest.raises(RepqError, match="holds an interrupted fine-tune: pass --resume"):
        call("finetune", [*common, "--out", str(out)])
    assert call("finetune", [*common, "--resume", "--out", str(out)]) == 0
    assert not (out / "finetune_state.pt").exists()
    whole, resumed = (torch.load(d / "repq.pt", weights_only=True)["state_dict"] for d in (tmp_path / "whole", out))
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 8  # 0.7 x the 11 batches of 128 in the 1,438 training images, rounded up


def test_finetune_start_from_continues_the_saved_state_and_refuses_other_settings(tmp_path):
    """`repq finetune --start-from DIR/repq.pt` continues that fine-tune: at lr 0 with BN frozen from the first
    step, nothing may move, so the state written equals the loaded one exactly (learned steps and BNEst's
    correction are not re-measured). A fresh run with the same settings ends elsewhere: the load is what
    carries the state. Other widths get a one-line error."""
    import torch

    from repq.reparam import create_model
    from repq.reparam.io import atomic_save

    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125).eval()
    checkpoint = tmp_path / "best.pt"
    atomic_save({"arch": model.repq_arch, "state_dict": model.state_dict(),
                 "settings": {"val_size": 0.2, "split_seed": 3}}, checkpoint)
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--epochs", "0.05", "--w-bits", "4", "--a-bits", "4",
              "--no-export"]
    assert call("finetune", [*common, "--out", str(tmp_path / "a")]) == 0
    still = [*common, "--lr", "0", "--freeze-bn-at", "0"]
    saved = str(tmp_path / "a" / "repq.pt")
    assert call("finetune", [*still, "--start-from", saved, "--out", str(tmp_path / "b")]) == 0
    assert call("finetune", [*still, "--out", str(tmp_path / "c")]) == 0

    def state(name):
        return torch.load(tmp_path / name / "repq.pt", weights_only=True)["state_dict"]

    first, continued, fresh = state("a"), state("b"), state("c")
    assert first.keys() == continued.keys()
    assert all(torch.equal(first[k], continued[k]) for k in first)
    assert not all(torch.equal(first[k], fresh[k]) for k in first)
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in "ab"]
    assert metrics[1]["fake_quant"]["top1"] == metrics[0]["fake_quant"]["top1"]
    assert metrics[1]["started_from"] == saved
    with pytest.raises(RepqError, match="other quantizer settings .*w_bits 4 there, 8 here"):
        call("finetune", [*common[:4], "--start-from", saved, "--out", str(tmp_path / "d")])
    with pytest.raises(RepqError, match="is not a `repq finetune` output"):
        call("finetune", [*common, "--start-from", str(checkpoint), "--out", str(tmp_path / "e")])
