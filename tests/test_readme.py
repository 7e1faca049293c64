"""The README's Python example runs as written: a user's own model (torchvision ResNet-18 with ACNet blocks) and
data loader through PTQ, RepQ fine-tuning, export and an ONNX Runtime engine."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch, capsys):
    script = tmp_path / "example.py"
    script.write_text(python_example())
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert (tmp_path / "resnet18_acb.ort.onnx").is_file()
    scores = dict(re.findall(r"^(FP32|PTQ entropy \(fake-quant\)|RepQ INT8 on ONNX Runtime) \{'top1': ([\d.]+)",
                             out, re.M))
    assert set(scores) == {"FP32", "PTQ entropy (fake-quant)", "RepQ INT8 on ONNX Runtime"}, out
    # Trained, not at chance (10%); PTQ close to FP32; the RepQ-fine-tuned INT8 engine loses nothing (it trains
    # half an epoch more, so it may gain). 297 images: 0.34 points each.
    fp32, ptq, engine = (float(scores[k]) for k in ("FP32", "PTQ entropy (fake-quant)", "RepQ INT8 on ONNX Runtime"))
    assert fp32 > 60 and abs(ptq - fp32) < 5 and engine >= fp32 - 2, scores
    assert "LatencyStats(batch_size=1" in out and "LatencyStats(batch_size=32" in out
