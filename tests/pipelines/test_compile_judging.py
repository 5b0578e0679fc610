"""compile judges what it built against its source, whatever the backend, and keeps only a
build that answers like it.

The backend that disagrees is the onnxruntime one swapped for a function that writes a damaged
model (TensorRT cannot run here; it goes through the same judgement in the stage).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch

from pipelines.backends import CompiledModel
from pipelines.core import PipelineContext, StageStatus, TensorSpec
from pipelines.judging import DEFAULT_DIM, fixed_dims
from pipelines.stages import Compile
from pipelines.stages import compile as compile_stage

from .conftest import ModelFile
from .test_judging import damaged_copy, onnx_artifact

STAGE = "01-compile"


def noop(fraction: float, message: str) -> None:
    """A progress callback that ignores its calls."""


def ctx_for(path: Path, workdir: Path, task: str) -> PipelineContext:
    workdir.mkdir(parents=True, exist_ok=True)
    return PipelineContext.start(workdir, onnx_artifact(path), task=task)


class _Pool(torch.nn.Module):
    """[batch, seq, 8] -> Linear(8, 4) -> mean over seq -> [batch, 4]: any seq length runs."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).mean(dim=1)


@pytest.fixture(scope="module")
def seq_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(6)
    path = tmp_path_factory.mktemp("compile_judging") / "seq.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Pool().eval(),
            (torch.randn(2, 3, 8),),
            str(path),
            input_names=["x"],
            output_names=["output"],
            dynamic_axes={"x": {0: "batch", 1: "seq"}, "output": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


def damaging_backend(source, out_dir, settings, progress, *, cache_root) -> CompiledModel:
    """A backend whose build runs, with the right shapes, but ranks the classes otherwise."""
    damaged_copy(Path(source.path), out_dir / "model.onnx")
    return CompiledModel(filename="model.onnx", format="onnx", backend="onnxruntime")


def test_it_judges_an_onnxruntime_build_and_records_the_judgement(
    onnx_mlp: ModelFile, tmp_path: Path
) -> None:
    ctx = ctx_for(onnx_mlp.path, tmp_path / "w", "embedding")
    result = Compile().run(ctx, STAGE, {"backend": "onnxruntime"}, noop)

    assert result.status is StageStatus.SUCCEEDED and ctx.current == STAGE
    judged = ctx.current_artifact.meta["judgement"]
    assert judged["judged_on"] == "generated" and judged["metric"] == "cosine"
    assert judged["value"] > 0.9999 and judged["rows"] == 128
    # The judgement's difference over every row replaces the backend's one-row comparison.
    assert 0.0 <= result.metrics["max_abs_diff"] == judged["max_abs_diff"] < 1e-4
    assert ctx.current_artifact.metrics["judged_min_cosine"] == judged["value"]
    assert "; min cosine 1.0000 on 128 generated rows (mean 1.0000)" in result.message


@pytest.mark.parametrize(
    ("task", "reason"),
    [("classification", "top-1 agreement "), ("regression", "min cosine ")],
)
def test_a_build_that_disagrees_with_its_source_is_not_kept(
    onnx_mlp: ModelFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str, reason: str
) -> None:
    monkeypatch.setitem(compile_stage.BACKENDS, "onnxruntime", damaging_backend)
    ctx = ctx_for(onnx_mlp.path, tmp_path / "w", task)
    result = Compile().run(ctx, STAGE, {"backend": "onnxruntime"}, noop)

    assert result.status is StageStatus.NOT_KEPT and result.outputs == []
    assert ctx.current == "input" and list(ctx.artifacts) == ["input"]
    assert list((ctx.workdir / STAGE).iterdir()) == []  # nothing published
    threshold = "99.0%" if task == "classification" else "0.9990"
    assert result.details["not_kept"].startswith(reason)
    assert result.details["not_kept"].endswith(f" < {threshold}")
    assert result.message.startswith(f"not kept: {result.details['not_kept']}; {reason}")
    assert "the onnxruntime build is not registered (set keep_below_threshold" in result.message
    assert result.details["settings"]["backend"] == "onnxruntime"


def test_a_build_under_its_threshold_is_kept_when_told_to(
    onnx_mlp: ModelFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(compile_stage.BACKENDS, "onnxruntime", damaging_backend)
    ctx = ctx_for(onnx_mlp.path, tmp_path / "w", "classification")
    settings = {"backend": "onnxruntime", "keep_below_threshold": True}
    result = Compile().run(ctx, STAGE, settings, noop)
    assert result.status is StageStatus.SUCCEEDED and ctx.current == STAGE
    assert "% < 99.0%, kept because keep_below_threshold is set" in result.message
    assert ctx.current_artifact.meta["judgement"]["value"] < 0.5


def test_it_judges_named_dims_at_their_dim_ranges_opt_size_else_a_stated_default(
    seq_onnx: Path, tmp_path: Path
) -> None:
    ctx = ctx_for(seq_onnx, tmp_path / "w", "embedding")
    Compile().run(ctx, STAGE, {"dim_ranges": {"seq": [1, 5, 10]}}, noop)
    judged = ctx.current_artifact.meta["judgement"]
    assert judged["shapes"] == {"x": [128, 5, 8]}
    assert judged["dims"] == {"seq": 5} and judged["dims_from"] == {"seq": "dim_ranges (opt)"}

    ctx = ctx_for(seq_onnx, tmp_path / "w2", "embedding")
    Compile().run(ctx, STAGE, {}, noop)
    judged = ctx.current_artifact.meta["judgement"]
    assert judged["dims"] == {"seq": DEFAULT_DIM} and judged["dims_from"] == {"seq": "default"}


def test_a_dim_the_build_fixed_is_judged_at_its_fixed_size() -> None:
    parent = [TensorSpec("x", ["batch", "seq", 8], "float32"), TensorSpec("m", ["batch"], "int64")]
    built = [TensorSpec("x", ["batch", 12, 8], "float32"), TensorSpec("m", ["batch"], "int64")]
    assert fixed_dims(parent, built) == {"seq": 12}
    assert fixed_dims(parent, parent) == {}


def test_a_source_that_cannot_run_generated_inputs_leaves_the_build_unjudged(
    onnx_mlp: ModelFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def copy_backend(source, out_dir, settings, progress, *, cache_root) -> CompiledModel:
        shutil.copy(source.path, out_dir / "model.onnx")
        return CompiledModel(filename="model.onnx", format="onnx", backend="onnxruntime")

    monkeypatch.setitem(compile_stage.BACKENDS, "onnxruntime", copy_backend)
    ctx = ctx_for(onnx_mlp.path, tmp_path / "w", "classification")
    ctx.current_artifact.inputs = [TensorSpec("x", ["batch", 32], "float32")]  # it takes 64
    result = Compile().run(ctx, STAGE, {"backend": "onnxruntime"}, noop)
    assert result.status is StageStatus.SUCCEEDED and ctx.current == STAGE
    assert ctx.current_artifact.meta["judgement"]["judged_on"] is None
    assert "not judged: the parent cannot run the judging inputs" in result.message
