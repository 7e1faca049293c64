"""`repq run` with the real stages on the embedded digits, tiny settings: every stage runs, the parity ladder is
consistent, the report is written, and a rerun redoes nothing."""

import json
import subprocess
import sys

import pytest

# Enough training (no warm-up) that the model has left chance: the parity checks compare top-1 on 180 images,
# and near-tied logits of an untrained model flip with float rounding.
TINY = ["model.width_mult=0.125", "stages.train.epochs=2", "stages.train.max_steps_per_epoch=20",
        "stages.train.warmup_epochs=0", "stages.train.batch_size=64", "stages.substitute.epochs=1",
        "stages.ptq.sweep={method: [max]}", "stages.ptq.calib_size=64", "stages.repq.method=bnest_corrected",
        "stages.repq.epochs=0.05", "stages.repq.batch_size=64", "stages.repq.distill=0.5",
        "stages.repq.recalibrate_bn=2", "stages.repq.freeze_bn_at=0.5", "stages.bench.batch_sizes=[1,4]",
        "stages.bench.warmup=1", "stages.bench.iters=3", "stages.doctor.calib_size=16",
        "stages.doctor.engines=[tensorrt]", "stages.ptq.budget=50"]


def repq_run(out, *extra):
    return subprocess.run([sys.executable, "-m", "repq", "run", "--out", str(out), *TINY, *extra],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    done = repq_run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    (out.parent / f"{out.name}.log").write_text(done.stdout + done.stderr)
    return out


def test_every_stage_runs_and_the_report_is_written(run_dir):
    for stage in ("train", "substitute", "ptq", "doctor", "repq", "export", "engine", "bench"):
        assert (run_dir / stage / "manifest.json").is_file(), stage
    for name in ("report.md", "report.html", "metrics.json"):
        assert (run_dir / name).is_file()


def test_the_repq_stage_takes_its_bn_schedule_from_the_recipe(run_dir):
    log = (run_dir.parent / f"{run_dir.name}.log").read_text()
    assert "BN statistics frozen" in log and "re-estimated over 2 batches first" in log


def test_the_parity_ladder_is_consistent(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ladder = {}
    for entry in metrics["ladder"]:
        ladder.setdefault(entry.get("method"), {})[entry["step"]] = entry["top1"]
    ptq = ladder["qarepvgg_a0 PTQ max"]
    assert set(ptq) == {"train", "fused", "fakequant", "qdq_onnx", "engine"}
    assert ptq["train"] == pytest.approx(ptq["fused"], abs=1.0)  # the fused model is the same function
    # The TensorRT-placement file in ONNX Runtime computes the fake-quant model (to float rounding).
    assert ptq["qdq_onnx"] == pytest.approx(ptq["fakequant"], abs=1.2)
    repq = ladder["qarepvgg_a0 RepQ-BNEst(corrected) W8A8"]
    assert repq["qdq_onnx"] == pytest.approx(repq["fakequant"], abs=1.2)
    rows = {(r["method"], r["engine"]) for r in metrics["methods"] if "latency_ms" in r and "top1" in r}
    assert ("qarepvgg_a0 PTQ max", "onnxruntime") in rows and ("FP32 qarepvgg_a0", "onnxruntime") in rows


def test_the_report_has_the_doctor_of_each_trained_model_and_the_fallback(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["doctor"]) == {"repvgg_a0", "qarepvgg_a0"}
    for diagnosis in metrics["doctor"].values():
        assert diagnosis["images"] == 16 and len(diagnosis["layers"]) == 23
        assert set(diagnosis["engine_divergence"]) == {"tensorrt"}
    fallback = metrics["fallback"]
    assert set(fallback) == {"repvgg_a0 PTQ max", "qarepvgg_a0 PTQ max"}
    for record in fallback.values():  # 50 points: met with every layer quantized, by the first candidate
        assert record["float_layers"] == [] and record["evaluations"] == 2 and record["budget"] == 50
    html = (run_dir / "report.html").read_text()
    for heading in ("Doctor: where INT8 loses accuracy (repvgg_a0)", "Doctor: where INT8 loses accuracy "
                    "(qarepvgg_a0)", "Fallback under a budget (repvgg_a0 PTQ max)"):
        assert heading in html
    for plot in ("doctor_repvgg_a0", "doctor_qarepvgg_a0", "fallback"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 1000


def test_a_rerun_redoes_nothing(run_dir):
    again = repq_run(run_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    log = again.stdout + again.stderr
    assert "running" not in log.replace("repq run", "")
    assert log.count("cached - skipping") == 8


def test_every_artifact_the_run_wrote_is_accepted_by_repq_eval(run_dir, capsys):
    """Each model file (training checkpoints, PTQ models of the substituted QARepVGG, RepQ fine-tunes) and each
    ONNX file scores through `repq eval` on the data it was made with, on the split the run scored: the ORT
    INT8 file gives the engine stage's own top-1."""
    from repq.pipeline.cli import main

    files = sorted(p for p in run_dir.rglob("*") if p.suffix in (".pt", ".onnx") and ".tmp" not in p.name
                   and "state" not in p.name)
    assert {p.parent.name for p in files} >= {"train", "substitute", "ptq", "export"} and len(files) > 10
    scores = {}
    for path in files:
        assert main(["eval", str(path), "--data", "digits", "--json"]) == 0, path
        result = json.loads(capsys.readouterr().out)
        assert result["images"] == 180 and "held out" in result["split"], path
        scores[path.name] = result["top1"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    engine = {r["method"]: r["top1"] for r in metrics["methods"] if r.get("engine") == "onnxruntime" and "top1" in r}
    assert scores["qarepvgg_a0_ptq_max.ort.onnx"] == pytest.approx(engine["qarepvgg_a0 PTQ max"], abs=1e-3)


def test_repq_engine_and_export_work_on_the_runs_files_with_the_default_data(run_dir, capsys, tmp_path):
    """`repq engine --data digits` scores the file on the digits split it records (no 5,000-image default);
    `repq export` exports a PTQ model of the substituted network (rebuilt with its transforms)."""
    from repq.pipeline.cli import main

    file = run_dir / "export" / "qarepvgg_a0_ptq_max.ort.onnx"
    assert main(["engine", str(file), "--data", "digits", "--batches", "1", "--runs", "2", "--warmup", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"]["images"] == 180
    out = tmp_path / "again.ort.onnx"
    assert main(["export", "--quantized", str(run_dir / "ptq" / "qarepvgg_a0_ptq_max.pt"), "--target",
                 "onnxruntime", "--out", str(out)]) == 0
    assert main(["eval", str(out), "--data", "digits", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1])["top1"] == pytest.approx(result["accuracy"]["top1"], abs=1e-3)
