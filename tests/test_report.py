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


def test_ladder_gives_the_drop_to_the_engine_and_each_steps_change():
    steps, rows = ladder_table(LADDER)
    assert steps == ["train", "fused", "fakequant", "qdq_onnx", "engine"]
    ptq, repq = rows
    assert (ptq["method"], ptq["train"], ptq["engine"]) == ("PTQ max", 90.0, 79.0)
    assert ptq["drop"] == {"from": "train", "to": "engine", "value": pytest.approx(90.0 - 79.0)}
    assert [(a, b) for a, b, _ in ptq["changes"]] == [("fused", "fakequant"), ("fakequant", "qdq_onnx"),
                                                      ("qdq_onnx", "engine")]
    assert [c for *_, c in ptq["changes"]] == pytest.approx([80.0 - 90.0, 79.5 - 80.0, 79.0 - 79.5])
    assert "qdq_onnx" not in repq and repq["drop"]["value"] == pytest.approx(90.0 - 88.0)
    assert [c for *_, c in repq["changes"]] == pytest.approx([89.5 - 90.0, 88.0 - 89.5])


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
    import torch
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
    assert ("| RepQ | 90.00 | 90.00 | 89.50 | - | 88.00 | 2.00 | fused -> fake-quant -0.50; "
            "fake-quant -> engine -1.50 |") in markdown
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


def markdown_table(markdown: str, heading: str) -> list[dict[str, str]]:
    """The rows of the table under ``## heading`` as {header: cell}."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    return [dict(zip(cells[0], row, strict=True)) for row in cells[2:]]


def test_report_of_a_fake_quant_dip_the_engine_recovers_and_of_the_fp32_rows(tmp_path):
    """Stage records as the stages write them: PTQ percentile dips by one image (0.56 points of 180) in fake-quant,
    and its ONNX file and engine are back at FP32's 99.44; the engine stage scored the FP32 ONNX file too."""
    from repq.engines.report import collect_run_metrics
    from repq.pipeline.stages import StageRecord

    fp32, dip = 179 / 180 * 100, 178 / 180 * 100
    float_row, ptq = "FP32 repvgg_a0", "repvgg_a0 PTQ percentile"
    stage_metrics = {
        "train": {"ladder": [{"step": "train", "method": float_row, "top1": fp32},
                             {"step": "fused", "method": float_row, "top1": fp32}]},
        "ptq": {"ladder": [{"step": "train", "method": ptq, "top1": fp32},
                           {"step": "fused", "method": ptq, "top1": fp32},
                           {"step": "fakequant", "method": ptq, "top1": dip}]},
        "engine": {"ladder": [{"step": "qdq_onnx", "method": ptq, "top1": fp32},
                              {"step": "engine", "method": ptq, "top1": fp32},
                              {"step": "qdq_onnx", "method": float_row, "top1": fp32},
                              {"step": "engine", "method": float_row, "top1": fp32}],
                   "methods": [{"method": float_row, "bits": 32, "engine": "onnxruntime", "top1": fp32},
                               {"method": ptq, "bits": 8, "engine": "onnxruntime", "top1": fp32}]},
        "bench": {"methods": [{"method": m, "bits": b, "engine": "onnxruntime", "latency_ms": 1.04,
                               "latency_batch": 1, "throughput": 278.0, "throughput_batch": 32}
                              for m, b in ((float_row, 32), (ptq, 8))]},
    }
    records = {name: StageRecord(name, tmp_path / name, "k", {"metrics": m, "wall_s": 1.0})
               for name, m in stage_metrics.items()}
    paths = write_report(collect_run_metrics(records), tmp_path / "out")
    markdown = paths["markdown"].read_text()
    ladder = {row["Method"]: row for row in markdown_table(markdown, "Parity ladder")}
    methods = {row["Method"]: row for row in markdown_table(markdown, "Methods")}

    # The loss that reaches the engine is none; the fake-quant dip is shown as a step change, with its recovery.
    row = ladder[ptq]
    assert row["Drop FP32 -> engine (pts)"] == "0.00"
    assert row["Step changes (pts)"] == f"fused -> fake-quant {dip - fp32:+.2f}; fake-quant -> ONNX {fp32 - dip:+.2f}"
    assert row["fake-quant (PyTorch)"] == f"{dip:.2f}" and row["engine"] == f"{fp32:.2f}"
    assert "Largest loss" not in markdown
    # FP32 rows: their ONNX and engine cells are the FP32 file's own score, the one the methods table shows.
    row = ladder[float_row]
    assert row["ONNX (ONNX Runtime)"] == row["engine"] == methods[float_row]["Top-1 %"] == f"{fp32:.2f}"
    assert row["fake-quant (PyTorch)"] == "-" and row["Step changes (pts)"] == "none"
    # Every timing figure says its batch: here in the header, as every row shares it.
    assert methods[float_row]["Latency (ms, batch 1)"] == "1.04"
    assert methods[float_row]["Throughput (img/s, batch 32)"] == "278"
