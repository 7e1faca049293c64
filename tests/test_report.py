"""The report: ladder and drop arithmetic against hand-computed values, self-contained HTML, a browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from repq.engines.report import add_drops, conv_weights, ladder_table, merge_methods, read_curve, write_report

LADDER = [
    {"step": "train", "top1": 90.0}, {"step": "fused", "top1": 90.0},
    {"step": "fakequant", "method": "PTQ max", "top1": 80.0},
    {"step": "qdq_onnx", "method": "PTQ max", "top1": 79.5},
    {"step": "engine", "method": "PTQ max", "top1": 79.0},
    {"step": "fakequant", "method": "RepQ", "top1": 89.5}, {"step": "engine", "method": "RepQ", "top1": 88.0},
]
METHODS = [
    {"method": "FP32", "bits": 32, "engine": "onnxruntime", "top1": 90.25},
    {"method": "PTQ max", "bits": 8, "engine": "onnxruntime", "top1": 79.0},
    {"method": "RepQ", "bits": 8, "engine": "onnxruntime", "top1": 88.0},
    # the bench stage's rows for the same methods: merged into the rows above
    {"method": "FP32", "bits": 32, "engine": "onnxruntime", "latency_ms": 3.0, "throughput": 900.0},
    {"method": "RepQ", "bits": 8, "engine": "onnxruntime", "latency_ms": 1.5, "throughput": 2000.0},
]


def test_ladder_names_the_step_with_the_largest_loss():
    steps, rows = ladder_table(LADDER)
    assert steps == ["train", "fused", "fakequant", "qdq_onnx", "engine"]
    ptq, repq = rows
    assert (ptq["method"], ptq["train"], ptq["engine"]) == ("PTQ max", 90.0, 79.0)
    assert ptq["lost_at"] == "fused -> fake-quant (-10.00)"  # 90 -> 80 beats 80 -> 79.5 -> 79
    assert "qdq_onnx" not in repq and repq["lost_at"] == "fake-quant -> engine (-1.50)"


def test_methods_merge_and_drops_against_fp32_on_the_same_engine():
    rows = add_drops(merge_methods(METHODS), LADDER)
    assert len(rows) == 3
    by = {r["method"]: r for r in rows}
    assert by["FP32"]["latency_ms"] == 3.0 and "int8_drop" not in by["FP32"]
    assert by["PTQ max"]["int8_drop"] == pytest.approx(11.25)
    assert by["RepQ"]["int8_drop"] == pytest.approx(2.25) and by["RepQ"]["throughput"] == 2000.0
    # no FP32 row: the drop is measured against the fused FP32 model of the ladder
    alone = add_drops([{"method": "RepQ", "bits": 8, "top1": 88.0}], LADDER)
    assert alone[0]["int8_drop"] == pytest.approx(2.0)


def test_conv_weights_are_the_fused_models_conv_kernels():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 2))
    weights = conv_weights(model)
    assert list(weights) == ["0", "2"]  # the Linear's 2-D weight is not a conv kernel
    np.testing.assert_array_equal(weights["2"], model[2].weight.detach().numpy().ravel())
    assert conv_weights({"state_dict": model.state_dict()}).keys() == weights.keys()


def _report(tmp_path):
    curve = tmp_path / "metrics.jsonl"
    curve.write_text("".join(json.dumps({"epoch": e, "train_loss": 2.0 / e, "val_top1": 50 + 10 * e}) + "\n"
                             for e in (1, 2, 3)) + '{"epoch": 4, "train_lo')  # a killed writer's last line
    rng = np.random.default_rng(0)
    weights = {"fused": {f"layer{i}": rng.standard_normal(500) * (i + 1) for i in range(6)}}
    run = {"name": "unit", "model": {"name": "repvgg_a0"}, "data": {"source": "digits"}, "seed": 0}
    metrics = {"run": run,
               "ladder": LADDER, "methods": add_drops(merge_methods(METHODS), LADDER),
               "stages": {"train": {"wall_s": 12.5, "metrics": {"val_top1": 90.0}}}, "total_wall_s": 12.5}
    paths = write_report(metrics, tmp_path / "out", weights=weights, curves={"train": read_curve(curve)})
    return metrics, paths


def test_report_files_are_complete_and_html_is_self_contained(tmp_path):
    metrics, paths = _report(tmp_path)
    assert json.loads(paths["metrics"].read_text()) == metrics
    html = paths["html"].read_text()
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r'(href|src)="(?!data:)', html)  # nothing to fetch: one file to mail around
    for source in sources:
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = paths["markdown"].read_text()
    assert "| PTQ max | 8 | onnxruntime | 79.00 | 11.25 |" in markdown
    assert "| RepQ | 90.00 | 90.00 | 89.50 | - | 88.00 | fake-quant -> engine (-1.50) |" in markdown
    for name in ("accuracy_latency", "weight_violins", "training_curves"):
        assert f"(plots/{name}.png)" in markdown and (tmp_path / "out" / "plots" / f"{name}.png").is_file()


def test_report_renders_in_a_real_headless_browser(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    from PIL import Image

    _, paths = _report(tmp_path)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1280,3200", paths["html"].resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    rows_with_ink = np.flatnonzero((np.abs(image - 255).sum(axis=2) > 60).any(axis=1))
    # The three plots decode and lay out below the tables: ink reaches far down the page.
    assert rows_with_ink.size and rows_with_ink.max() > 1800, rows_with_ink.max(initial=0)
    # The plots' colours (matplotlib's blue and orange) are on the page, not just black text on white.
    blue = (np.abs(image - np.array([31, 119, 180])).sum(axis=2) < 40).sum()
    orange = (np.abs(image - np.array([255, 127, 14])).sum(axis=2) < 40).sum()
    assert blue > 500 and orange > 30, (blue, orange)
