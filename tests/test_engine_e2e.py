"""Every engine of the table through a whole `repq run` (one shared run with every target, tiny settings):
each engine's rows reach the report with the accuracy the engine itself gives on the same files (`repq eval`,
independently opened), timed at named batch sizes; an engine that cannot run here is listed as skipped with its
table row's reason and the run completes."""

import json
import subprocess
import sys

import pytest

from repq.engines.targets import TARGETS

# test_pipeline_e2e's tiny settings, without the stages the engines do not need (substitution, RepQ): the files
# the engines run are the FP32 model and its PTQ (max) INT8 model, exported for every placement. The model is
# barely trained, which does not matter here: each engine's accuracy is compared with itself.
TINY = ["model.width_mult=0.125", "stages.train.epochs=1", "stages.train.max_steps_per_epoch=15",
        "stages.train.warmup_epochs=0", "stages.train.batch_size=64", "stages.substitute.enabled=false",
        "stages.repq.enabled=false", "stages.ptq.sweep={method: [max]}", "stages.ptq.calib_size=64",
        "stages.bench.batch_sizes=[1,4]", "stages.bench.warmup=1", "stages.bench.iters=3",
        f"stages.export.targets={json.dumps(list(TARGETS))}", f"stages.engine.targets={json.dumps(list(TARGETS))}"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    done = subprocess.run([sys.executable, "-m", "repq", "run", "--out", str(out), *TINY],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_engine_of_the_table_passes_a_whole_run(run_dir, metrics, name):
    from repq.quant.artifacts import score_artifact

    row = TARGETS[name]
    export = run_dir / "export"
    files = {f: e for f, e in metrics["stages"]["export"]["metrics"]["files"].items()
             if e["placement"] in ("float", row.placement)}
    assert any(e["placement"] == "float" for e in files.values()) and len(files) >= 2
    rows = {r["method"]: r for r in metrics["methods"] if r.get("engine") == name}
    skipped = metrics["stages"]["engine"]["metrics"]["skipped"]
    for file, entry in files.items():
        reason = row.unavailable_reason(export / file)
        if reason:  # e.g. TensorRT without TensorRT or a GPU: listed with the reason, no row
            assert f"{name}: {file} ({reason})" in skipped
            assert entry["method"] not in rows
            continue
        result = rows[entry["method"]]
        # the report's accuracy is the engine's own: the same file, opened again by `repq eval` on the same split
        own = score_artifact(export / file, "digits", engine=name, batch_size=256, progress=False)
        assert own["images"] == result["images"]
        assert result["top1"] == pytest.approx(own["top1"], abs=1e-3), (file, result, own)
        assert (result["latency_batch"], result["throughput_batch"]) == (1, 4)
        assert result["latency_ms"] > 0 and result["throughput"] > 0
        fp16_baseline = row.name == "tensorrt" and entry["placement"] == "float"
        assert result["bits"] == (16 if fp16_baseline else entry["bits"])
    if row.needs_gpu and row.unavailable_reason() is not None:
        assert not rows


def test_the_report_names_the_batch_of_every_timing(run_dir):
    report = (run_dir / "report.md").read_text()
    assert "Latency (ms, batch 1)" in report and "Throughput (img/s, batch 4)" in report
    assert "latency/throughput" not in report.lower()
    timings = json.loads((run_dir / "metrics.json").read_text())["stages"]["bench"]["metrics"]["timings"]
    assert {t["batch_size"] for t in timings} == {1, 4}  # metrics.json keeps every batch size
