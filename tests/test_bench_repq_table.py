"""bench/repq_table.py --start-from: a saved row continues with its learned steps, and a bad file is named."""

import importlib.util
from pathlib import Path

import pytest
import torch

from repq.quant.finetune import quantized_model
from repq.reparam.io import atomic_save
from repq.reparam.models import create_model

SPEC = importlib.util.spec_from_file_location("repq_table", Path(__file__).parents[1] / "bench" / "repq_table.py")
repq_table = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(repq_table)


def _wrapped() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.25)
    return quantized_model(model, method="bnest_corrected", w_bits=4, a_bits=4)


def test_a_saved_row_loads_with_its_steps_and_does_not_reinitialise_them(tmp_path):
    trained = _wrapped().train()
    trained(torch.randn(8, 3, 32, 32))  # the first batch initialises every step (MinError)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if name.endswith("step"):
                p.mul_(1.5)  # steps no first batch would give: a re-initialisation would show
    atomic_save(trained.state_dict(), tmp_path / "bnest_corrected_w4.pt")

    fresh = _wrapped()
    repq_table.load_state(fresh, str(tmp_path / "bnest_corrected_w4.pt"))
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), trained.eval()(x), rtol=0, atol=0)
    fresh.train()(torch.randn(8, 3, 32, 32))  # a training batch: must not re-measure the loaded steps
    trained_steps = {n: p for n, p in trained.named_parameters() if n.endswith("step")}
    assert len(trained_steps) > 20
    for name, p in fresh.named_parameters():
        if name.endswith("step"):
            assert torch.equal(p, trained_steps[name]), name


def test_a_truncated_state_is_a_one_line_error_naming_the_file(tmp_path):
    path = tmp_path / "bnest_corrected_w4.pt"
    atomic_save(_wrapped().state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SystemExit, match="cannot start from .*bnest_corrected_w4.pt"):
        repq_table.load_state(_wrapped(), str(path))


def test_zero_steps_needs_a_saved_row(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["repq_table.py", "--checkpoint", "x.pt", "--epochs", "0"])
    with pytest.raises(SystemExit):
        repq_table.main()
    assert "pass --start-from a saved row" in capsys.readouterr().err


def test_a_state_of_another_method_is_refused_with_the_file_to_pass(tmp_path):
    path = tmp_path / "merged_w4.pt"
    atomic_save(quantized_model(create_model("repvgg_a0", num_classes=10, cifar=True, width_mult=0.25),
                                method="merged", w_bits=4, a_bits=4).state_dict(), path)
    with pytest.raises(SystemExit, match="cannot start from .*merged_w4.pt.*pass the METHOD_wBITS.pt"):
        repq_table.load_state(_wrapped(), str(path))


def test_an_unknown_method_is_refused_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["repq_table.py", "--checkpoint", "x.pt", "--methods", "bn,bnest_typo"])
    with pytest.raises(SystemExit):
        repq_table.main()
    assert "unknown method 'bnest_typo'" in capsys.readouterr().err


def test_an_interrupted_row_continues_only_with_resume(tmp_path, monkeypatch, capsys):
    """--methods bnest is the old name of bnest_corrected: its row's state file is bnest_corrected's."""
    (tmp_path / "bnest_corrected_w4.state.pt").write_bytes(b"state")
    monkeypatch.setattr("sys.argv", ["repq_table.py", "--checkpoint", "x.pt", "--methods", "bnest", "--bits", "4",
                                     "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        repq_table.main()
    assert "bnest_corrected_w4.state.pt holds an interrupted fine-tune: pass --resume" in capsys.readouterr().err
