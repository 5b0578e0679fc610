"""The stages one by one on real small models, the pipeline check, and latency measurement."""

from __future__ import annotations

import logging
import typing
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pipelines.core import (
    Artifact,
    Cancelled,
    PipelineContext,
    PipelineError,
    StageConfigError,
    StageStatus,
    TensorSpec,
)
from pipelines.latency import measure_latency
from pipelines.onnx_io import cpu_session, first_error_line, read_tensor_specs
from pipelines.stages import (
    BACKENDS,
    MAX_STAGES,
    REGISTRY,
    Benchmark,
    Compile,
    CompileSettings,
    ExportOnnx,
    Quantize,
    default_pipeline,
    stage_schemas,
    validate_pipeline,
)
from pipelines.staging import PARTIAL_PREFIX

from .conftest import ModelFile


def noop(fraction: float, message: str) -> None:
    """A progress callback that ignores its calls."""


# -- export_onnx ----------------------------------------------------------------------------------


def test_it_exports_torchscript_to_onnx_matching_torch_outputs(ts_mlp: ModelFile, make_ctx) -> None:
    ctx = make_ctx(ts_mlp)
    result = ExportOnnx().run(ctx, "01-export_onnx", {}, noop)

    assert result.status is StageStatus.SUCCEEDED
    assert result.outputs == ["01-export_onnx"]
    artifact = ctx.current_artifact
    assert artifact.key == "01-export_onnx" and artifact.parent == "input"
    assert artifact.format == "onnx" and artifact.precision == "fp32"
    assert Path(artifact.path).is_file()
    onnx.checker.check_model(artifact.path)
    # The declared dynamic batch is still dynamic, read back from the graph.
    assert artifact.inputs[0].name == "x"
    assert artifact.inputs[0].shape == ["batch", 64]
    assert artifact.outputs[0].name == "output"
    assert artifact.outputs[0].shape == ["batch", 10]
    assert 0.0 <= result.metrics["max_abs_diff"] < 1e-4

    # A batch size other than the example's (2) runs and matches the eager model.
    x = np.random.default_rng(7).standard_normal((5, 64)).astype(np.float32)
    (got,) = cpu_session(artifact.path).run(None, {"x": x})
    with torch.no_grad():
        expected = ts_mlp.module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_it_exports_a_cnn_with_a_dynamic_batch(ts_cnn: ModelFile, make_ctx) -> None:
    ctx = make_ctx(ts_cnn)
    ExportOnnx().run(ctx, "01-export_onnx", {"opset": 13}, noop)

    artifact = ctx.current_artifact
    assert artifact.inputs[0].shape == ["batch", 1, 8, 8]
    assert artifact.meta["opset"] == 13
    model = onnx.load(artifact.path)
    assert {op.version for op in model.opset_import if op.domain in ("", "ai.onnx")} == {13}
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    (got,) = cpu_session(artifact.path).run(None, {"image": x})
    with torch.no_grad():
        np.testing.assert_allclose(
            got, ts_cnn.module(torch.from_numpy(x)).numpy(), rtol=1e-4, atol=1e-5
        )


def test_it_fixes_the_batch_when_dynamic_batch_is_off(ts_mlp: ModelFile, make_ctx) -> None:
    ctx = make_ctx(ts_mlp)
    ExportOnnx().run(ctx, "01-export_onnx", {"dynamic_batch": False, "batch_size": 3}, noop)

    assert ctx.current_artifact.inputs[0].shape == [3, 64]
    assert ctx.current_artifact.outputs[0].shape == [3, 10]


def test_it_rejects_a_wrong_declared_shape_with_an_actionable_message(
    ts_mlp: ModelFile, make_ctx
) -> None:
    ctx = make_ctx(ts_mlp)
    ctx.artifacts["input"].inputs[0].shape = ["batch", 32]

    with pytest.raises(PipelineError) as caught:
        ExportOnnx().run(ctx, "01-export_onnx", {}, noop)

    message = str(caught.value)
    assert message.startswith("the model rejected an input of shape [2, 32] float32")
    assert "check the input shape given at upload" in message
    assert "mat1 and mat2 shapes cannot be multiplied" in message
    assert "TorchScript interpreter" not in message  # the boilerplate line is not the cause
    # Nothing was published and the context still points at the upload.
    assert not (ctx.workdir / "01-export_onnx" / "model.onnx").exists()
    assert ctx.current == "input" and list(ctx.artifacts) == ["input"]


def test_it_names_several_outputs_output_0_and_so_on(
    ts_mlp: ModelFile, make_ctx, tmp_path: Path
) -> None:
    class Pair(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x.sum(dim=1)

    path = tmp_path / "pair.pt"
    torch.jit.script(Pair()).save(str(path))
    model = ModelFile(path, Pair(), ts_mlp.fresh_artifact())
    model.artifact.path = str(path)
    ctx = make_ctx(model)

    ExportOnnx().run(ctx, "01-export_onnx", {}, noop)

    outputs = ctx.current_artifact.outputs
    assert [o.name for o in outputs] == ["output_0", "output_1"]
    assert outputs[1].shape == ["batch"]


def test_it_finds_the_cause_line_of_a_torchscript_error() -> None:
    error = RuntimeError(
        "The following operation failed in the TorchScript interpreter.\n"
        "Traceback of TorchScript (most recent call last):\n"
        '  File "x.py", line 1, in forward\n'
        "RuntimeError: shapes do not match\n"
    )
    assert first_error_line(error) == "RuntimeError: shapes do not match"
    assert first_error_line(ValueError("first\nsecond")) == "first"


# -- quantize -------------------------------------------------------------------------------------


def test_it_quantizes_to_a_smaller_int8_model_with_close_outputs(
    onnx_mlp: ModelFile, make_ctx
) -> None:
    ctx = make_ctx(onnx_mlp)
    result = Quantize().run(ctx, "01-quantize", {}, noop)

    artifact = ctx.current_artifact
    assert artifact.precision == "int8" and artifact.parent == "input"
    assert result.metrics["quantized_nodes"] >= 2
    ratio = result.metrics["size_ratio"]
    assert ratio < 0.5
    assert ratio == pytest.approx(Path(artifact.path).stat().st_size / onnx_mlp.path.stat().st_size)
    assert artifact.meta["preprocessed"] is True
    assert any("Integer" in node.op_type for node in onnx.load(artifact.path).graph.node)

    x = np.random.default_rng(3).standard_normal((256, 64)).astype(np.float32)
    (fp32,) = cpu_session(onnx_mlp.path).run(None, {"x": x})
    (int8,) = cpu_session(artifact.path).run(None, {"x": x})
    agreement = float(np.mean(fp32.argmax(axis=1) == int8.argmax(axis=1)))
    assert agreement >= 0.9


def test_it_refuses_to_quantize_an_int8_model_twice(onnx_mlp: ModelFile, make_ctx) -> None:
    ctx = make_ctx(onnx_mlp)
    Quantize().run(ctx, "01-quantize", {}, noop)

    with pytest.raises(PipelineError, match="already int8"):
        Quantize().run(ctx, "02-quantize", {}, noop)
    assert ctx.current == "01-quantize"
    assert not (ctx.workdir / "02-quantize" / "model.onnx").exists()


def test_it_quantizes_the_raw_model_when_preprocessing_fails(
    onnx_mlp: ModelFile, make_ctx, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    import onnxruntime.quantization.shape_inference as shape_inference

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("symbolic shape inference failed")

    monkeypatch.setattr(shape_inference, "quant_pre_process", broken)
    ctx = make_ctx(onnx_mlp)
    with caplog.at_level(logging.WARNING, logger="pipelines.quantization.int8"):
        result = Quantize().run(ctx, "01-quantize", {}, noop)

    assert ctx.current_artifact.meta["preprocessed"] is False
    assert ctx.current_artifact.precision == "int8"
    assert "pre-processing failed" in result.message
    assert "symbolic shape inference failed" in caplog.text


def test_it_reports_when_op_types_quantize_nothing(onnx_mlp: ModelFile, make_ctx) -> None:
    ctx = make_ctx(onnx_mlp)
    with pytest.raises(PipelineError, match=r"nothing was quantized.*Conv.*Gemm"):
        Quantize().run(ctx, "01-quantize", {"op_types": ["Conv"]}, noop)


# -- compile --------------------------------------------------------------------------------------


def test_it_compiles_to_a_loadable_optimized_model(onnx_mlp: ModelFile, make_ctx) -> None:
    import onnxruntime

    ctx = make_ctx(onnx_mlp)
    result = Compile().run(ctx, "01-compile", {"graph_optimization_level": "extended"}, noop)

    artifact = ctx.current_artifact
    assert artifact.backend == "onnxruntime" and artifact.precision == "fp32"
    assert artifact.parent == "input" and artifact.format == "onnx"
    assert artifact.meta["onnxruntime_version"] == onnxruntime.__version__
    assert artifact.meta["providers"] == ["CPUExecutionProvider"]
    assert artifact.path != str(onnx_mlp.path)
    # Gemm + Relu fuse into FusedGemm at "extended": the graph really was optimised.
    ops = [node.op_type for node in onnx.load(artifact.path).graph.node]
    assert "FusedGemm" in ops
    assert result.metrics["nodes_after"] < result.metrics["nodes_before"]

    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    (expected,) = cpu_session(onnx_mlp.path).run(None, {"x": x})
    (got,) = cpu_session(artifact.path).run(None, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_it_keeps_compile_backends_and_their_setting_in_step() -> None:
    allowed = typing.get_args(CompileSettings.model_fields["backend"].annotation)
    assert set(allowed) == {"auto", *BACKENDS}  # auto picks one of them on the worker


# -- benchmark ------------------------------------------------------------------------------------


def test_it_benchmarks_every_artifact_at_every_batch_size(ts_mlp: ModelFile, make_ctx) -> None:
    ctx = make_ctx(ts_mlp)
    ExportOnnx().run(ctx, "01-export_onnx", {}, noop)
    calls: list[tuple[float, str]] = []

    result = Benchmark().run(
        ctx,
        "02-benchmark",
        {"batch_sizes": [1, 4], "warmup": 1, "iterations": 5, "min_seconds": 0},
        lambda f, m: calls.append((f, m)),
    )

    assert ctx.current == "01-export_onnx"  # benchmark leaves the current artifact alone
    assert result.outputs == []
    rows = {(r.artifact, r.batch_size): r for r in ctx.benchmarks}
    assert set(rows) == {(a, b) for a in ("input", "01-export_onnx") for b in (1, 4)}
    assert {r.backend for r in ctx.benchmarks if r.artifact == "input"} == {"torch"}
    assert {r.backend for r in ctx.benchmarks if r.artifact != "input"} == {"onnxruntime"}
    for row in ctx.benchmarks:
        assert 0 < row.p50_ms <= row.p95_ms <= row.p99_ms
        # The statistics pool the last three measurement windows of 5 samples each; a sample
        # of a sub-millisecond model is a loop of calls, and iterations count calls.
        assert row.throughput > 0 and row.iterations % (5 * min(row.windows, 3)) == 0
    assert result.metrics["input.b4.p50_ms"] == rows[("input", 4)].p50_ms
    assert result.metrics["01-export_onnx.b1.throughput"] == rows[("01-export_onnx", 1)].throughput
    assert len(calls) == 4 and calls[-1][0] == 1.0


def test_it_skips_batch_sizes_a_fixed_batch_model_cannot_take(
    onnx_fixed_batch: ModelFile, make_ctx
) -> None:
    ctx = make_ctx(onnx_fixed_batch)
    calls: list[float] = []
    result = Benchmark().run(
        ctx,
        "01-benchmark",
        {"batch_sizes": [1, 8, 32], "warmup": 0, "iterations": 5, "min_seconds": 0},
        lambda f, m: calls.append(f),
    )

    assert [r.batch_size for r in ctx.benchmarks] == [1]
    assert result.status is StageStatus.SUCCEEDED
    assert "skipped batch size 8, 32" in result.message and "fixed at 1" in result.message
    assert len(calls) == 3  # every (artifact, batch) pair reports, skipped ones included


def test_it_benchmarks_only_the_current_artifact_of_a_two_input_model(
    onnx_two_inputs: ModelFile, make_ctx
) -> None:
    ctx = make_ctx(onnx_two_inputs)
    Compile().run(ctx, "01-compile", {}, noop)

    Benchmark().run(
        ctx,
        "02-benchmark",
        {
            "batch_sizes": [2, 3],
            "warmup": 1,
            "iterations": 5,
            "targets": "current",
            "min_seconds": 0,
        },
        noop,
    )

    # The upload is always measured too, as the baseline of the speedups.
    assert [(r.artifact, r.batch_size) for r in ctx.benchmarks] == [
        ("input", 2),
        ("input", 3),
        ("01-compile", 2),
        ("01-compile", 3),
    ]


def test_it_stops_a_stage_at_once_when_progress_raises_cancelled(
    ts_mlp: ModelFile, make_ctx
) -> None:
    ctx = make_ctx(ts_mlp)

    def cancel(fraction: float, message: str) -> None:
        raise Cancelled()

    with pytest.raises(Cancelled):
        Benchmark().run(
            ctx, "01-benchmark", {"warmup": 0, "iterations": 5, "min_seconds": 0}, cancel
        )
    assert ctx.benchmarks == []


def test_it_measures_latency_after_warmup() -> None:
    calls: list[int] = []
    stats = measure_latency(lambda: calls.append(1), warmup=3, iterations=20)

    assert len(calls) == 23
    assert stats.iterations == 20
    assert 0 <= stats.min_ms <= stats.p50_ms <= stats.p95_ms <= stats.p99_ms <= stats.max_ms
    assert stats.throughput(8) == pytest.approx(8 * 20 / stats.total_s)
    with pytest.raises(ValueError):
        measure_latency(lambda: None, warmup=0, iterations=0)


# -- stage list and pipeline check ----------------------------------------------------------------


def test_it_describes_every_stage_with_a_settings_schema() -> None:
    schemas = {s["name"]: s for s in stage_schemas("tensor")}

    assert set(schemas) == {
        "export_onnx", "quantize", "compile", "benchmark", "evaluate", "finetune", "certify"
    }  # fmt: skip
    text = {s["name"]: s for s in stage_schemas("text-generation")}
    assert set(text) == {"from_gguf", "finetune", "quantize", "evaluate", "benchmark", "certify"}
    assert text["quantize"]["accepts"] == ["hf_checkpoint"]
    assert len(stage_schemas()) == len(schemas) + len(text)  # both families by default
    assert schemas["export_onnx"]["accepts"] == ["torchscript"]
    assert schemas["export_onnx"]["produces"] == "onnx"
    assert schemas["benchmark"]["produces"] is None
    opset = schemas["export_onnx"]["settings"]["properties"]["opset"]
    assert (opset["default"], opset["minimum"], opset["maximum"]) == (17, 13, 21)
    for schema in [*schemas.values(), *text.values()]:
        assert schema["description"]
        for prop in schema["settings"]["properties"].values():
            assert prop.get("description"), prop


@pytest.mark.parametrize("source_format", ["torchscript", "onnx"])
def test_it_validates_the_default_pipelines(source_format: str) -> None:
    planned = validate_pipeline(source_format, default_pipeline(source_format))

    names = [p.name for p in planned]
    expected = ["quantize", "compile", "benchmark"]
    if source_format == "torchscript":
        expected = ["export_onnx", *expected]
    assert names == expected
    assert planned[0].stage_id == f"01-{names[0]}"
    assert all(isinstance(p.settings, REGISTRY[p.name].Settings) for p in planned)


def test_it_leaves_quantize_out_of_the_default_pipeline_of_an_int8_model() -> None:
    assert [s["name"] for s in default_pipeline("onnx", "int8")] == ["compile", "benchmark"]


def test_it_applies_settings_and_defaults() -> None:
    planned = validate_pipeline(
        "torchscript",
        [{"name": "export_onnx", "settings": {"opset": 18}}, {"name": "benchmark"}],
    )
    assert planned[0].settings.opset == 18  # type: ignore[attr-defined]
    assert planned[0].settings.dynamic_batch is True  # type: ignore[attr-defined]
    assert planned[1].settings.batch_sizes == [1, 8, 32]  # type: ignore[attr-defined]
    assert planned[1].stage_id == "02-benchmark"
    assert planned[0].to_dict()["settings"]["opset"] == 18


def test_it_refuses_an_empty_pipeline() -> None:
    with pytest.raises(StageConfigError, match="no stages: add at least one of export_onnx"):
        validate_pipeline("onnx", [])


def test_it_refuses_an_unknown_stage_and_lists_the_known_ones() -> None:
    with pytest.raises(StageConfigError) as caught:
        validate_pipeline("onnx", [{"name": "quantise"}])
    message = str(caught.value)
    assert "stage 1: unknown stage 'quantise'" in message
    assert "did you mean 'quantize'" in message
    assert "known stages: export_onnx, quantize, compile, benchmark" in message


def test_it_turns_bad_settings_into_one_line_per_error() -> None:
    with pytest.raises(StageConfigError) as caught:
        validate_pipeline(
            "onnx",
            [
                {"name": "compile"},
                {"name": "quantize", "settings": {"mode": "int4", "per_chanel": True}},
                {"name": "benchmark", "settings": {"batch_sizes": [1, 5000], "iterations": 2}},
            ],
        )
    lines = str(caught.value).splitlines()
    assert any(
        line.startswith("stage 2 (quantize): mode: Input should be 'int8_dynamic', ")
        for line in lines
    )
    assert "stage 2 (quantize): per_chanel: Extra inputs are not permitted" in lines
    assert any(line.startswith("stage 3 (benchmark): batch_sizes.1: ") for line in lines)
    assert any(line.startswith("stage 3 (benchmark): iterations: ") for line in lines)
    assert len(lines) == 4


def test_it_refuses_a_stage_that_cannot_take_the_format_at_that_point() -> None:
    with pytest.raises(StageConfigError) as caught:
        validate_pipeline("torchscript", [{"name": "quantize"}, {"name": "compile"}])
    assert str(caught.value) == (
        "stage 1 (quantize) needs an onnx model but the model is torchscript at that point: "
        "add export_onnx or finetune before it"
    )


def test_it_refuses_export_of_a_model_that_is_already_onnx() -> None:
    with pytest.raises(StageConfigError, match=r"stage 2 \(export_onnx\) needs a torchscript"):
        validate_pipeline("onnx", [{"name": "benchmark"}, {"name": "export_onnx"}])


def test_it_refuses_a_second_quantize_before_anything_runs() -> None:
    with pytest.raises(StageConfigError, match=r"stage 2 \(quantize\): the model is already int8"):
        validate_pipeline("onnx", [{"name": "quantize"}, {"name": "quantize"}])


def test_it_refuses_more_than_the_maximum_number_of_stages() -> None:
    stages = [{"name": "benchmark"}] * (MAX_STAGES + 1)
    with pytest.raises(StageConfigError, match=f"has {MAX_STAGES + 1} stages; at most 20"):
        validate_pipeline("onnx", stages)
    assert len(validate_pipeline("onnx", stages[:MAX_STAGES])) == MAX_STAGES


def test_it_refuses_malformed_items_and_formats() -> None:
    with pytest.raises(StageConfigError, match="unknown model format 'keras'"):
        validate_pipeline("keras", [{"name": "benchmark"}])
    with pytest.raises(StageConfigError, match='stage 1: missing "name"'):
        validate_pipeline("onnx", [{"settings": {}}])
    with pytest.raises(StageConfigError, match=r"stage 1 \(benchmark\): unknown key\(s\) setting"):
        validate_pipeline("onnx", [{"name": "benchmark", "setting": {}}])
    with pytest.raises(StageConfigError, match="settings must be an object"):
        validate_pipeline("onnx", [{"name": "benchmark", "settings": [1]}])


def test_it_leaves_no_partial_folders_after_a_stage(onnx_mlp: ModelFile, make_ctx) -> None:
    ctx = make_ctx(onnx_mlp)
    Quantize().run(ctx, "01-quantize", {}, noop)
    names = [p.name for p in (ctx.workdir / "01-quantize").iterdir()]
    assert names == ["model.onnx"]
    assert not any(n.startswith(PARTIAL_PREFIX) for n in names)
    assert read_tensor_specs(ctx.current_artifact.path)[0][0].shape == ["batch", 64]


def test_it_keeps_timing_until_the_minimum_window_has_passed():
    import time

    started = time.perf_counter()
    stats = measure_latency(lambda: None, warmup=0, iterations=5, min_seconds=0.05)
    assert time.perf_counter() - started >= 0.05
    assert stats.iterations > 5
    assert stats.total_s >= 0.05


def _sequence_model(path: Path) -> Artifact:
    """x [batch, seq, 8] -> mean over the sequence -> y [batch, 8], as ONNX."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)
    graph = helper.make_graph([node], "seq", [x], [y], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return Artifact(
        key="input",
        path=str(path),
        format="onnx",
        precision="fp32",
        inputs=[TensorSpec("x", ["batch", "seq", 8], "float32")],
        outputs=[TensorSpec("y", ["batch", 8], "float32")],
    )


@pytest.mark.parametrize(("dims", "timed", "said"), [({}, 1, True), ({"seq": 16}, 16, False)])
def test_every_row_records_the_shapes_it_was_timed_at(
    tmp_path: Path, dims: dict, timed: int, said: bool
) -> None:
    workdir = tmp_path / "job"
    workdir.mkdir()
    ctx = PipelineContext.start(workdir, _sequence_model(tmp_path / "seq.onnx"))
    settings = {"batch_sizes": [2], "warmup": 1, "iterations": 5, "min_seconds": 0}
    result = Benchmark().run(ctx, "01-benchmark", {**settings, "dynamic_dims": dims}, noop)

    assert [r.shapes for r in ctx.benchmarks] == [{"x": [2, timed, 8]}]
    assert ("dynamic dims seq timed at 1" in result.message) is said, result.message
