"""The engine table drives dispatch: every row names a class that exists and reads the row's options, one
`open_engine` opens any of them, the CLI's choices come from the table, and the report names the batch size of
every timing figure."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from repq.engines.engine import Engine, input_image_shape, onnx_is_quantized, open_engine
from repq.engines.targets import PLACEMENTS, TARGETS, EngineTarget, get_target
from repq.errors import RepqError

PROTOCOL = ("__call__", "evaluate", "benchmark", "describe")


@pytest.fixture(scope="module")
def qdq_file(tmp_path_factory):
    from test_openvino import build_net

    return build_net(tmp_path_factory.mktemp("table") / "net.trt.onnx", quantized=True)


# ---------------------------------------------------------------- the table


@pytest.mark.parametrize("name", list(TARGETS))
def test_every_row_names_an_engine_class_that_reads_its_options(name):
    row = TARGETS[name]
    assert row.name == name and row.placement in PLACEMENTS and row.description
    cls = row.engine_class()  # imports the module; no engine package is needed for that
    parameters = inspect.signature(cls.__init__).parameters
    unread = [option for option in row.options if option not in parameters]
    assert not unread, f"{name}: options {unread} are not arguments of {cls.__name__}"
    for option, default in row.options.items():  # a default of the table is a value the class accepts
        if default is not None and parameters[option].default is not inspect.Parameter.empty:
            assert type(default) is type(parameters[option].default) or isinstance(default, tuple), option
    for method in PROTOCOL:
        assert callable(getattr(cls, method, None)), f"{name}: {cls.__name__} lacks {method}"
    bench = inspect.signature(cls.benchmark).parameters
    assert list(bench)[1:3] == ["image_shape", "batch_sizes"], f"{name}: benchmark{tuple(bench)}"
    assert bench["warmup"].kind is bench["runs"].kind is inspect.Parameter.KEYWORD_ONLY
    reason = row.unavailable_reason()
    assert reason is None or (isinstance(reason, str) and "\n" not in reason and reason)


def test_every_placement_is_used_and_no_other_is_accepted():
    assert {row.placement for row in TARGETS.values()} == set(PLACEMENTS)
    with pytest.raises(ValueError, match="placement"):
        EngineTarget("x", "nowhere", ".x.onnx", False, "repq.engines.onnxruntime:OrtEngine")
    assert get_target("openvino").placement == "tensorrt"  # OpenVINO reads the TensorRT-placement file


def test_select_keeps_the_options_a_row_reads():
    assert get_target("onnxruntime").select(threads=2, precision="int8", batch_sizes=(1,)) == {"threads": 2}
    assert get_target("tensorrt").select(threads=2, precision="int8", workspace_gb=None) == {"precision": "int8"}


# ---------------------------------------------------------------- open_engine


def test_open_engine_runs_onnxruntime_like_pytorch(model, fp32_file):
    engine = open_engine(fp32_file, "onnxruntime", threads=1)
    assert isinstance(engine, Engine) and engine.describe()["engine"] == "onnxruntime"
    assert engine.threads == 1 and input_image_shape(engine) == (3, 8, 8)  # the file's fixed H/W
    images = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        np.testing.assert_allclose(engine(images.numpy()), model(images).numpy(), atol=1e-5)
    stats = engine.benchmark((3, 8, 8), [1, 2], warmup=1, runs=3)
    assert [s.batch_size for s in stats] == [1, 2]


@pytest.mark.parametrize("name", [n for n, row in TARGETS.items() if not row.needs_gpu])
def test_every_cpu_engine_opens_through_the_table_and_agrees_with_pytorch(name, model, fp32_file):
    row = get_target(name)
    if row.unavailable_reason(fp32_file):
        pytest.skip(row.unavailable_reason(fp32_file))
    engine = open_engine(fp32_file, name)
    assert isinstance(engine, row.engine_class())
    images = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        expected = model(images).numpy()
    np.testing.assert_allclose(engine(images.numpy()), expected, rtol=1e-4, atol=1e-5)
    labels = expected.argmax(1)
    assert engine.evaluate([(images.numpy(), labels)])["top1"] == 100.0
    (stats,) = engine.benchmark((3, 8, 8), [4], warmup=0, runs=2)
    assert stats.batch_size == 4 and stats.runs == 2


def test_open_engine_errors_are_one_line(fp32_file, tmp_path):
    cases = [
        (lambda: open_engine(fp32_file, "onnxrunt"), "did you mean 'onnxruntime'"),
        (lambda: open_engine(fp32_file, "onnxruntime", precision="int8"), "has no option precision"),
        (lambda: open_engine(tmp_path / "missing.onnx", "onnxruntime"), "does not exist"),
    ]
    for call, message in cases:
        with pytest.raises(RepqError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_tensorrt_without_tensorrt_or_a_gpu_is_refused_with_the_reason(qdq_file):
    reason = get_target("tensorrt").unavailable_reason(qdq_file)
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: the refusal path cannot run")
    with pytest.raises(RepqError) as err:
        open_engine(qdq_file, "tensorrt", precision="int8", batch_sizes=(1, 4))
    assert str(err.value) == f"tensorrt cannot run net.trt.onnx here: {reason}"
    assert not list(qdq_file.parent.glob("*.plan"))


def test_openvino_int8_files_are_refused_where_its_int8_kernels_are_inexact(qdq_file, fp32_file, monkeypatch):
    import repq.engines.openvino

    if repq.engines.openvino.openvino_available() is not None:
        pytest.skip(repq.engines.openvino.openvino_available())
    monkeypatch.setattr(repq.engines.openvino, "openvino_int8_problem", lambda: "inexact INT8 kernels here")
    assert onnx_is_quantized(qdq_file) and not onnx_is_quantized(fp32_file)
    with pytest.raises(RepqError, match="openvino cannot run net.trt.onnx here: inexact INT8 kernels here"):
        open_engine(qdq_file, "openvino")
    assert open_engine(fp32_file, "openvino").describe()["engine"] == "openvino"


# ---------------------------------------------------------------- the CLI reads the table


def _sub_parser(command):
    import argparse
    import importlib

    parser = argparse.ArgumentParser()
    importlib.import_module(f"repq.pipeline.commands.{command}").add_arguments(parser)
    return parser


def test_cli_engine_choices_and_help_come_from_the_table():
    for command, flag in (("engine", "--target"), ("bench", "--engine")):
        parser = _sub_parser(command)
        action = next(a for a in parser._actions if flag in a.option_strings)
        assert list(action.choices) == list(TARGETS), command
        assert all(row.description in action.help for row in TARGETS.values()), command


def test_repq_engine_and_bench_on_every_cpu_target(fp32_file, tmp_path, capsys):
    from repq.pipeline.cli import main

    for name, row in TARGETS.items():
        if row.needs_gpu or row.unavailable_reason(fp32_file):
            continue
        out = tmp_path / f"{name}.json"
        argv = ["engine", "--target", name, str(fp32_file), "--batches", "1", "3", "--runs", "2", "--warmup", "0",
                "--threads", "1", "--json", str(out)]
        assert main(argv) == 0
        result = json.loads(out.read_text())
        assert result["target"] == name and result["engine"]["engine"] == name
        assert result["engine"]["threads"] == 1
        assert [s["batch_size"] for s in result["latency"]] == [1, 3]
    capsys.readouterr()
    cpu = [n for n, row in TARGETS.items() if not row.needs_gpu and not row.unavailable_reason(fp32_file)]
    assert main(["bench", str(fp32_file), "--engine", *cpu, "--batches", "2", "--runs", "2", "--warmup", "0",
                 "--image-size", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [(r["engine"], r["batch_size"]) for r in rows] == [(n, 2) for n in cpu]


def test_repq_engine_on_tensorrt_without_it_says_why_in_one_line(qdq_file, capsys):
    from repq.pipeline.cli import main

    reason = get_target("tensorrt").unavailable_reason(qdq_file)
    if reason is None:
        pytest.skip("TensorRT and a GPU are present: the refusal path cannot run")
    assert main(["engine", "--target", "tensorrt", str(qdq_file), "--runs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: tensorrt cannot run net.trt.onnx here: {reason}"
    assert main(["bench", str(qdq_file), "--engine", "tensorrt"]) == 2  # nothing could run: the reason
    assert reason in capsys.readouterr().err


# ---------------------------------------------------------------- the report names every timing's batch


def _methods_markdown(tmp_path, methods):
    from repq.engines.report import write_report

    paths = write_report({"run": {"name": "t"}, "ladder": [], "methods": methods}, tmp_path)
    lines = paths["markdown"].read_text().splitlines()
    start = lines.index("## Methods")
    return [line for line in lines[start:] if line.startswith("|")][:2 + len(methods)]


def test_methods_table_headers_carry_the_batch_of_each_timing(tmp_path):
    methods = [
        {"method": "FP32 a0", "bits": 32, "engine": "onnxruntime", "latency_ms": 1.25, "latency_batch": 1,
         "throughput": 958.4, "throughput_batch": 32},
        {"method": "a0 PTQ max", "bits": 8, "engine": "onnxruntime", "latency_ms": 0.5, "latency_batch": 1,
         "throughput": 2500.0, "throughput_batch": 32},
    ]
    header, _, first, second = _methods_markdown(tmp_path, methods)
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert "Latency (ms, batch 1)" in cells and "Throughput (img/s, batch 32)" in cells
    assert not any("latency/throughput" in c.lower() for c in cells)
    assert "| 1.25 | 958 |" in first and "| 0.500 | 2500 |" in second


def test_methods_table_cells_carry_the_batch_when_rows_differ(tmp_path):
    methods = [
        {"method": "A", "engine": "onnxruntime", "latency_ms": 2.0, "latency_batch": 1, "throughput": 900.0,
         "throughput_batch": 32},
        {"method": "B", "engine": "tensorrt", "latency_ms": 0.25, "latency_batch": 8, "throughput": 9000.0,
         "throughput_batch": 32},
        {"method": "C", "engine": "openvino", "batch_size": "1/16", "latency_ms": 3.0, "throughput": 500.0},  # old
    ]
    header, _, a, b, c = _methods_markdown(tmp_path, methods)
    assert "| Latency (ms) | Throughput (img/s) |" in header  # batches differ: named in each cell instead
    assert "| 2.00 @ batch 1 | 900 @ batch 32 |" in a and "| 0.250 @ batch 8 | 9000 @ batch 32 |" in b
    assert "| 3.00 @ batch 1 | 500 @ batch 16 |" in c


# ---------------------------------------------------------------- timing several engines alike


def test_interleaved_latency_pools_rounds_and_alternates_engines():
    from repq.engines.timing import interleaved_latency

    calls = []

    def timer(name, base):
        def run(batch):
            calls.append((name, batch))
            return [base * batch * (len(calls) % 2 + 1)]  # every other call twice as slow
        return run

    rounds = []
    stats = interleaved_latency({"a": timer("a", 0.001), "b": timer("b", 0.002)}, [1, 4], rounds=2,
                                on_round=rounds.append)
    assert calls == [("a", 1), ("a", 4), ("b", 1), ("b", 4)] * 2 and rounds == [1, 2]
    # call k (from 1) takes base * batch * (k % 2 + 1): a@1 ran as calls 1 and 5 -> 2 ms twice;
    # a@4 as calls 2 and 6 -> 4 ms twice; b@1 as calls 3 and 7 -> 4 ms twice.
    assert stats[("a", 1)].runs == 2 and stats[("a", 1)].median_ms == pytest.approx(2.0)
    assert stats[("a", 4)].median_ms == pytest.approx(4.0) and stats[("a", 4)].fps == pytest.approx(1000.0)
    assert stats[("b", 1)].median_ms == pytest.approx(4.0)
    with pytest.raises(RepqError):
        interleaved_latency({"a": timer("a", 1)}, [1], rounds=0)


@pytest.mark.parametrize("name", [n for n, row in TARGETS.items() if not row.needs_gpu])
def test_every_cpu_engine_times_one_batch_with_the_shared_timer(name, fp32_file):
    row = get_target(name)
    if row.unavailable_reason(fp32_file):
        pytest.skip(row.unavailable_reason(fp32_file))
    times = open_engine(fp32_file, name, threads=1).times((3, 8, 8), 2, warmup=1, runs=4)
    assert len(times) == 4 and all(t > 0 for t in times)
