"""The pipeline's repq stage, called directly on a real checkpoint: an interrupted attempt keeps the fine-tunes it
finished and continues the one it was in, to the same files an uninterrupted attempt writes."""

from pathlib import Path

import pytest
import torch

from repq.pipeline.recipe import load_recipe
from repq.pipeline.run_stages import repq_stage
from repq.pipeline.sections import RepQSection
from repq.pipeline.stages import StageContext, StageRecord
from repq.quant import finetune as finetune_module
from repq.reparam import create_model
from repq.reparam.io import atomic_save

SETTINGS = RepQSection(method="bnest_corrected", sweep={"bits": [8, 4]}, epochs=0.2, batch_size=64, lr=0.01,
                       save_every=2, progress=False)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> dict:
    train_dir = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.125).eval()
    atomic_save({"arch": model.repq_arch, "state_dict": model.state_dict(), "settings": {}}, train_dir / "best.pt")
    manifest = {"outputs": {"checkpoint": "best.pt"},
                "metrics": {"label": "repvgg_a0", "val_top1": 10.0, "deploy_val_top1": 10.0}}
    return {"train": StageRecord("train", train_dir, "key", manifest)}


def attempt(upstream, folder: Path, resume: bool, lines: list[str]) -> dict:
    ctx = StageContext("repq", load_recipe(None), SETTINGS, folder, folder.parent, upstream, lines.append,
                       resume=resume)
    return repq_stage(ctx)


def state_dicts(folder: Path) -> dict:
    return {p.parent.name: torch.load(p, weights_only=True)["state_dict"] for p in sorted(folder.glob("*/repq.pt"))}


def test_an_interrupted_repq_stage_keeps_finished_fine_tunes_and_resumes_the_current_one(
        upstream, tmp_path, monkeypatch):
    whole = attempt(upstream, tmp_path / "whole", False, [])
    expected = state_dicts(tmp_path / "whole")
    assert sorted(expected) == ["repvgg_a0_repq_bnest_corrected_w4a4", "repvgg_a0_repq_bnest_corrected_w8a8"]

    real_loss, calls = finetune_module.finetune_loss, [0]

    def loss_then_kill(*args):
        calls[0] += 1
        if calls[0] == 5 + 4:  # 0.2 x 25 batches = 5 steps each: the 4-bit fine-tune's 4th, after its state at 2
            raise Killed
        return real_loss(*args)

    monkeypatch.setattr(finetune_module, "finetune_loss", loss_then_kill)
    folder = tmp_path / "attempt"
    with pytest.raises(Killed):
        attempt(upstream, folder, False, [])
    assert sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*.pt")) == [
        "repvgg_a0_repq_bnest_corrected_w4a4/finetune_state.pt", "repvgg_a0_repq_bnest_corrected_w8a8/repq.pt"]
    monkeypatch.setattr(finetune_module, "finetune_loss", real_loss)
    lines = []
    resumed = attempt(upstream, folder, True, lines)
    assert any("W8A8: fine-tuned before the interruption, kept" in line for line in lines)
    assert any("W4A4: resuming the fine-tune" in line and "at step 2/5" in line for line in lines)
    assert not list(folder.glob("*/finetune_state.pt"))
    got = state_dicts(folder)
    assert got.keys() == expected.keys()
    for name, state in expected.items():
        assert all(torch.equal(state[k], got[name][k]) for k in state), name
    assert resumed["metrics"]["ladder"] == whole["metrics"]["ladder"]
