"""run_pipeline end to end, resuming, failures and cancellation; run_local and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pipelines.__main__ import main
from pipelines.core import (
    CONTEXT_FILE,
    Cancelled,
    PipelineContext,
    PipelineError,
    StageConfigError,
    StageResult,
    StageStatus,
)
from pipelines.pipeline import SKIPPED_MESSAGE, run_local, run_pipeline
from pipelines.stages import REGISTRY, PlannedStage, validate_pipeline
from pipelines.staging import PARTIAL_PREFIX

from .conftest import ModelFile

QUICK_BENCHMARK: dict[str, Any] = {"batch_sizes": [1, 2], "warmup": 1, "iterations": 5}
FULL: list[dict[str, Any]] = [
    {"name": "export_onnx"},
    {"name": "quantize"},
    {"name": "compile"},
    {"name": "benchmark", "settings": QUICK_BENCHMARK},
]


def plan(stages: list[dict[str, Any]] = FULL, source_format: str = "torchscript") -> list[Any]:
    return validate_pipeline(source_format, stages)


def file_stamps(workdir: Path) -> dict[str, tuple[int, int]]:
    """(mtime in ns, inode) of every file but the context: a rewrite changes at least one."""
    return {
        str(p.relative_to(workdir)): (p.stat().st_mtime_ns, p.stat().st_ino)
        for p in workdir.rglob("*")
        if p.is_file() and p.name != CONTEXT_FILE
    }


class Recorder:
    """Collects progress calls and on_stage_done calls."""

    def __init__(self) -> None:
        self.progress: list[tuple[int, float, str]] = []
        self.done: list[StageResult] = []

    def on_progress(self, index: int, fraction: float, message: str) -> None:
        self.progress.append((index, fraction, message))

    def on_done(self, result: StageResult, ctx: PipelineContext) -> None:
        # The context handed over already holds the result (so the caller may read it there).
        assert ctx.results[result.stage_id] == result
        self.done.append(result)


def test_it_runs_the_full_pipeline_with_a_parent_chain(ts_mlp: ModelFile, make_ctx) -> None:
    ctx = make_ctx(ts_mlp)
    rec = Recorder()

    results = run_pipeline(ctx, plan(), rec.on_progress, rec.on_done)

    assert [r.status for r in results] == [StageStatus.SUCCEEDED] * 4
    assert [r.stage_id for r in results] == [
        "01-export_onnx",
        "02-quantize",
        "03-compile",
        "04-benchmark",
    ]
    a = ctx.artifacts
    assert a["01-export_onnx"].parent == "input"
    assert a["02-quantize"].parent == "01-export_onnx"
    assert a["03-compile"].parent == "02-quantize"
    assert (a["02-quantize"].precision, a["03-compile"].precision) == ("int8", "int8")
    assert a["03-compile"].backend == "onnxruntime"
    assert ctx.current == "03-compile"  # benchmark leaves the compiled model current
    # Every artifact (the upload included) at both batch sizes.
    assert len(ctx.benchmarks) == 4 * 2

    assert [r.stage_id for r in rec.done] == [r.stage_id for r in results]
    assert {i for i, _, _ in rec.progress} == {0, 1, 2, 3}
    assert all(0.0 <= f <= 1.0 for _, f, _ in rec.progress)
    assert [i for i, _, _ in rec.progress] == sorted(i for i, _, _ in rec.progress)

    saved = PipelineContext.load(ctx.workdir)
    assert saved is not None
    assert saved.current == "03-compile"
    assert saved.artifacts["03-compile"].parent == "02-quantize"
    assert {k: r.status for k, r in saved.results.items()} == {
        r.stage_id: StageStatus.SUCCEEDED for r in results
    }
    assert len(saved.benchmarks) == 8


def test_it_skips_finished_stages_without_rewriting_their_files(
    ts_mlp: ModelFile, make_ctx
) -> None:
    ctx = make_ctx(ts_mlp)
    first = run_pipeline(ctx, plan())
    before = file_stamps(ctx.workdir)
    assert "03-compile/model.onnx" in before

    # As a job delivered again would: a fresh context loaded from disk.
    again = PipelineContext.load(ctx.workdir)
    assert again is not None
    again.current = "input"  # even a stale pointer is put right by the skipped stages
    rec = Recorder()
    second = run_pipeline(again, plan(), rec.on_progress, rec.on_done)

    assert [r.status for r in second] == [StageStatus.SKIPPED] * 4
    assert all(r.message == SKIPPED_MESSAGE for r in second)
    assert [r.outputs for r in second] == [r.outputs for r in first]
    # on_stage_done gets the original results, so the caller can register their outputs.
    assert [r.status for r in rec.done] == [StageStatus.SUCCEEDED] * 4
    assert file_stamps(ctx.workdir) == before
    assert again.current == "03-compile"
    assert len(again.benchmarks) == 8
    # The saved context still says SUCCEEDED: a third delivery skips again.
    saved = PipelineContext.load(ctx.workdir)
    assert saved is not None
    assert all(r.status is StageStatus.SUCCEEDED for r in saved.results.values())


def test_it_runs_again_from_the_stage_whose_output_is_gone(ts_mlp: ModelFile, make_ctx) -> None:
    ctx = make_ctx(ts_mlp)
    run_pipeline(ctx, plan())
    export_stamp = file_stamps(ctx.workdir)["01-export_onnx/model.onnx"]
    Path(ctx.artifacts["02-quantize"].path).unlink()

    results = run_pipeline(ctx, plan())

    assert [r.status for r in results] == [StageStatus.SKIPPED] + [StageStatus.SUCCEEDED] * 3
    assert Path(ctx.artifacts["02-quantize"].path).is_file()
    assert file_stamps(ctx.workdir)["01-export_onnx/model.onnx"] == export_stamp
    # Re-measured rows replace the earlier ones instead of piling up.
    assert len(ctx.benchmarks) == 8


def test_it_runs_a_stage_again_when_its_settings_changed(onnx_mlp: ModelFile, make_ctx) -> None:
    ctx = make_ctx(onnx_mlp)
    run_pipeline(ctx, plan([{"name": "compile"}], "onnx"))
    changed = plan([{"name": "compile", "settings": {"graph_optimization_level": "basic"}}], "onnx")

    (result,) = run_pipeline(ctx, changed)

    assert result.status is StageStatus.SUCCEEDED
    assert ctx.current_artifact.meta["graph_optimization_level"] == "basic"


class Boom:
    """A stage that crashes with a plain exception (a bug, not a user error)."""

    def run(self, ctx: PipelineContext, stage_id: str, settings: Any, progress: Any) -> StageResult:
        progress(0.5, "about to fail")
        raise ValueError("boom")


def test_it_saves_a_failed_result_when_a_stage_raises(
    onnx_mlp: ModelFile, make_ctx, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = make_ctx(onnx_mlp)
    planned = plan([{"name": "quantize"}, {"name": "compile"}], "onnx")
    monkeypatch.setitem(REGISTRY, "compile", Boom)
    done: list[str] = []

    with pytest.raises(ValueError, match="boom"):
        run_pipeline(ctx, planned, on_stage_done=lambda r, c: done.append(r.stage_id))

    saved = PipelineContext.load(ctx.workdir)
    assert saved is not None
    assert saved.results["01-quantize"].status is StageStatus.SUCCEEDED
    failed = saved.results["02-compile"]
    assert failed.status is StageStatus.FAILED
    assert failed.message == "ValueError: boom"
    assert failed.seconds >= 0
    assert done == ["01-quantize"]

    # Fixed and delivered again: the finished stage is skipped, the failed one runs.
    monkeypatch.undo()
    results = run_pipeline(saved, planned)
    assert [r.status for r in results] == [StageStatus.SKIPPED, StageStatus.SUCCEEDED]


def test_it_saves_a_pipeline_error_message_as_it_is(ts_mlp: ModelFile, make_ctx) -> None:
    ctx = make_ctx(ts_mlp)
    ctx.artifacts["input"].inputs[0].shape = ["batch", 3, 32, 32]

    with pytest.raises(PipelineError) as caught:
        run_pipeline(ctx, plan())

    saved = json.loads((ctx.workdir / CONTEXT_FILE).read_text())
    result = saved["results"]["01-export_onnx"]
    assert result["status"] == "failed"
    assert result["message"] == str(caught.value)
    assert result["message"].startswith("the model rejected an input of shape [2, 3, 32, 32]")
    assert set(saved["results"]) == {"01-export_onnx"}


def test_it_publishes_nothing_from_a_stage_that_dies_while_writing(
    onnx_mlp: ModelFile, make_ctx, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime.quantization as quantization

    def half_write(model_input: str, model_output: str, **kwargs: Any) -> None:
        Path(model_output).write_bytes(b"\x08\x07 half a model")
        raise MemoryError("killed")

    monkeypatch.setattr(quantization, "quantize_dynamic", half_write)
    ctx = make_ctx(onnx_mlp)
    # What a worker killed earlier left behind in this stage's folder.
    leftover = ctx.stage_dir("01-quantize") / f"{PARTIAL_PREFIX}old"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"junk")

    with pytest.raises(PipelineError, match="int8 quantization failed: killed"):
        run_pipeline(ctx, plan([{"name": "quantize"}], "onnx"))

    assert list((ctx.workdir / "01-quantize").iterdir()) == []
    assert ctx.current == "input"


def test_it_lets_cancelled_propagate(ts_mlp: ModelFile, make_ctx) -> None:
    ctx = make_ctx(ts_mlp)

    def progress(index: int, fraction: float, message: str) -> None:
        if index == 1:
            raise Cancelled()

    with pytest.raises(Cancelled):
        run_pipeline(ctx, plan(), progress)

    saved = PipelineContext.load(ctx.workdir)
    assert saved is not None
    assert set(saved.results) == {"01-export_onnx"}  # no FAILED record for a cancellation
    assert saved.current == "01-export_onnx"
    assert not (ctx.workdir / "02-quantize" / "model.onnx").exists()


def test_it_serialises_planned_stages_for_a_queue(ts_mlp: ModelFile) -> None:
    planned = plan()
    as_json = json.dumps([p.to_dict() for p in planned])
    again = validate_pipeline("torchscript", json.loads(as_json))
    assert again == planned
    assert isinstance(again[0], PlannedStage)


# -- run_local and the command line ---------------------------------------------------------------


def test_it_runs_locally_with_a_progress_bar(
    onnx_mlp: ModelFile,
    onnx_fixed_batch: ModelFile,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stages: list[dict[str, Any]] = [
        {"name": "quantize"},
        {"name": "benchmark", "settings": QUICK_BENCHMARK},
    ]

    ctx = run_local(onnx_mlp.path, "onnx", None, stages, tmp_path / "work")

    assert [r.status for r in ctx.results.values()] == [StageStatus.SUCCEEDED] * 2
    assert ctx.artifacts["input"].inputs[0].shape == ["batch", 64]  # read from the file
    err = capsys.readouterr().err
    assert "2/2 benchmark" in err and "stages" in err

    with pytest.raises(StageConfigError, match="use another workdir"):
        run_local(onnx_fixed_batch.path, "onnx", None, stages, tmp_path / "work")


def test_it_needs_inputs_for_a_torchscript_model(ts_mlp: ModelFile, tmp_path: Path) -> None:
    with pytest.raises(StageConfigError, match="give the model's inputs"):
        run_local(ts_mlp.path, "torchscript", None, None, tmp_path / "work", show_progress=False)


def test_it_prints_results_and_benchmarks_from_the_command_line(
    ts_mlp: ModelFile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stages = [{"name": "export_onnx"}, {"name": "benchmark", "settings": QUICK_BENCHMARK}]
    code = main(
        [
            "run",
            str(ts_mlp.path),
            "--format",
            "torchscript",
            "--workdir",
            str(tmp_path / "cli"),
            "--inputs",
            '[{"name": "x", "shape": ["batch", 64], "dtype": "float32"}]',
            "--stages",
            json.dumps(stages),
            "--no-progress",
        ]
    )

    out = capsys.readouterr().out
    assert code == 0
    assert "01-export_onnx  succeeded" in out
    assert "p50 ms" in out
    assert out.count("onnxruntime") >= 2  # one benchmark row per batch size
    assert os.path.isfile(tmp_path / "cli" / "01-export_onnx" / "model.onnx")


def test_it_exits_2_with_the_reason_for_a_bad_pipeline(
    onnx_mlp: ModelFile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stages_file = tmp_path / "stages.json"
    stages_file.write_text('[{"name": "export_onnx"}]')
    code = main(
        ["run", str(onnx_mlp.path), "--format", "onnx", "--workdir", str(tmp_path / "w")]
        + ["--stages", f"@{stages_file}"]
    )
    assert code == 2
    assert "stage 1 (export_onnx) needs a torchscript model" in capsys.readouterr().err


def test_it_exits_1_when_a_stage_fails(
    ts_mlp: ModelFile, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["run", str(ts_mlp.path), "--format", "torchscript", "--workdir", str(tmp_path / "w")]
        + ["--inputs", '[{"name": "x", "shape": ["batch", 7], "dtype": "float32"}]']
        + ["--no-progress"]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "stage failed: the model rejected an input of shape [2, 7] float32" in captured.err
    assert "01-export_onnx  failed" in captured.out


def test_it_runs_dataset_stages_from_the_command_line(tmp_path, capsys) -> None:
    from pipelines.__main__ import main
    from pipelines.demo import build_digits_classifier, write_digits_dataset

    model = tmp_path / "digits.pt"
    build_digits_classifier(model, epochs=5)
    data = tmp_path / "digits.csv"
    write_digits_dataset(data, "csv")
    stages = [
        {"name": "export_onnx"},
        {"name": "evaluate", "settings": {"dataset_id": 7, "split": "test"}},
    ]
    code = main([
        "run", str(model), "--format", "torchscript", "--task", "classification",
        "--inputs", '[{"name": "input", "shape": ["batch", 64], "dtype": "float32"}]',
        "--dataset", f"7={data}:label", "--workdir", str(tmp_path / "run"),
        "--stages", json.dumps(stages), "--no-progress",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "accuracy" in out and "on 180 test rows" in out


def test_it_refuses_a_malformed_dataset_argument(tmp_path) -> None:
    from pipelines.__main__ import main

    with pytest.raises(SystemExit, match="expected ID=PATH"):
        main(
            ["run", "m.pt", "--format", "torchscript", "--workdir", str(tmp_path), "--dataset", "x"]
        )
