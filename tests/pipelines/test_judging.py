"""Every produced version judged: pipelines.judging, and quantize with no dataset named.

A model whose int8 weights collapse (one huge weight row sets the per-tensor scale, so every
other weight rounds to 0) answers like its parent in fp32 and like a constant in int8: the
default pipeline (no dataset) must refuse it, with a stage status that says so.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from pipelines.core import Artifact, PipelineContext, StageStatus, TensorSpec
from pipelines.judging import (
    DEFAULT_DIM,
    Unjudgeable,
    generated_inputs,
    judge,
    reference_outputs,
    score_candidate,
    top1_agreement,
)
from pipelines.onnx_io import read_tensor_specs
from pipelines.pipeline import SKIPPED_MESSAGE, run_pipeline
from pipelines.stages import Quantize, validate_pipeline

from .conftest import ModelFile

STAGE = "01-quantize"
# h2's sensitivity search could rescue the collapsed model; these tests are about the verdict.
NO_SEARCH = {"sensitivity_search": False}


def noop(fraction: float, message: str) -> None:
    """A progress callback that ignores its calls."""


def onnx_artifact(path: Path, key: str = "input") -> Artifact:
    inputs, outputs = read_tensor_specs(path)
    return Artifact(key, str(path), "onnx", "fp32", inputs, outputs)


def export_collapsing(path: Path) -> Path:
    """Linear 64-33, ReLU, Linear 33-10 as ONNX (input "x"); hidden unit 32 has weights of 50
    that the output ignores. fp32 answers as the first 32 units say; per-tensor int8 rounds
    them all to 0, so the int8 model answers a constant."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 33), torch.nn.ReLU(), torch.nn.Linear(33, 10)
    ).eval()
    with torch.no_grad():
        model[0].weight[:32] = torch.randn(32, 64) * 0.05
        model[0].weight[32] = 50.0
        model[2].weight[:, 32] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(2, 64),),
            str(path),
            input_names=["x"],
            output_names=["output"],
            dynamic_axes={"x": {0: "batch"}, "output": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


@pytest.fixture(scope="module")
def collapsing_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_collapsing(tmp_path_factory.mktemp("judging") / "collapsing.onnx")


def damaged_copy(source: Path, target: Path) -> Path:
    """``source`` with the last weight matrix reversed along its output axis: it runs, with
    the same shapes, but ranks the classes otherwise."""
    model = onnx.load(str(source))
    last = [t for t in model.graph.initializer if len(t.dims) == 2][-1]
    array = numpy_helper.to_array(last)
    axis = 0 if array.shape[0] == 10 else 1
    last.CopyFrom(numpy_helper.from_array(np.flip(array, axis=axis).copy(), last.name))
    onnx.save(model, str(target))
    return target


def ctx_for(path: Path, workdir: Path, task: str) -> PipelineContext:
    workdir.mkdir(parents=True, exist_ok=True)
    return PipelineContext.start(workdir, onnx_artifact(path), task=task)


# -- pipelines.judging ----------------------------------------------------------------------------


def test_it_generates_rows_of_the_declared_shapes_with_small_ids() -> None:
    specs = [
        TensorSpec("ids", ["batch", "seq"], "int64"),
        TensorSpec("mask", ["batch", "seq"], "float32"),
        TensorSpec("extra", [1, 4, "width"], "float32"),  # a fixed first dim is still the row
    ]
    arrays, dims = generated_inputs(specs, rows=12, dim_sizes={"width": 3})
    assert {k: a.shape for k, a in arrays.items()} == {
        "ids": (12, DEFAULT_DIM),
        "mask": (12, DEFAULT_DIM),
        "extra": (12, 4, 3),
    }
    assert dims == {"seq": DEFAULT_DIM, "width": 3}
    assert arrays["ids"].dtype == np.int64 and 0 <= arrays["ids"].min() <= arrays["ids"].max() < 10
    with pytest.raises(Unjudgeable, match="scalar"):
        generated_inputs([TensorSpec("t", [], "float32")])


def test_it_scores_a_classifier_on_agreement_and_other_models_on_min_cosine(
    onnx_mlp: ModelFile, tmp_path: Path
) -> None:
    parent = onnx_artifact(onnx_mlp.path)
    same = judge(parent, onnx_artifact(onnx_mlp.path, "copy"), "classification")
    assert same.metric == "agreement" and same.value == same.agreement == 1.0
    assert same.min_cosine == pytest.approx(1.0) and same.max_abs_diff < 1e-5
    assert same.rows == 128 and same.shapes == {"x": [128, 64]}
    assert same.judged_on == "generated" and same.passes(0.99)
    assert same.describe() == "top-1 agreement 100.0% on 128 generated rows"

    damaged = onnx_artifact(damaged_copy(onnx_mlp.path, tmp_path / "damaged.onnx"), "damaged")
    bad = judge(parent, damaged, "classification")
    assert bad.metric == "agreement" and bad.value < 0.5 and not bad.passes(0.99)
    assert bad.verdict(0.99).startswith("top-1 agreement ") and bad.verdict(0.99).endswith(
        "% < 99.0%"
    )
    cos = judge(parent, damaged, "embedding")
    assert cos.metric == "cosine" and cos.agreement is None and cos.value == cos.min_cosine
    assert cos.min_cosine <= cos.mean_cosine < 0.9
    assert cos.verdict(0.99) == f"min cosine {cos.value:.4f} < 0.9900"
    assert cos.meta()["judged_on"] == "generated" and cos.meta()["metric"] == "cosine"
    assert set(cos.metrics()) == {
        "judged_cosine",
        "judged_min_cosine",
        "judged_mean_cosine",
        "judged_rows",
    }

    # A search scores many candidates against one run of the parent.
    reference = reference_outputs(parent)
    assert score_candidate(reference, damaged, "classification") == bad.value
    assert score_candidate(parent, damaged, "classification") == bad.value


def test_a_near_tie_the_parent_barely_breaks_is_forgiven_a_clear_flip_is_not() -> None:
    parent = np.array([[5.0, 4.99, 0.0], [5.0, 1.0, 0.0], [0.2, 0.9, 0.1], [0.7, 0.4, 0.2]])
    # Row 0: the candidate picks class 1, which the parent scores 0.01 under its top (0.2% of the
    # row's range): a tie. Row 1: a clear flip. Row 2 agrees; row 3 agrees.
    candidate = np.array([[4.0, 4.5, 0.0], [1.0, 5.0, 0.0], [0.1, 0.8, 0.0], [0.9, 0.1, 0.0]])
    assert top1_agreement(parent, candidate) == (0.75, 0.5)
    # A single score per row is a binary classifier: a probability split at 0.5.
    assert top1_agreement(np.array([[0.9], [0.2]]), np.array([[0.6], [0.7]])) == (0.5, 0.5)
    # [rows, positions, classes]: every position counts.
    tokens = np.zeros((2, 3, 4))
    tokens[..., 1] = 1.0
    flipped = tokens.copy()
    flipped[0, 0] = [0, 0, 1, 0]
    assert top1_agreement(tokens, flipped) == (5 / 6, 5 / 6)


def test_it_judges_on_dataset_rows_when_given(onnx_mlp: ModelFile) -> None:
    rows = {"x": np.random.default_rng(3).standard_normal((40, 64)).astype(np.float32)}
    parent = onnx_artifact(onnx_mlp.path)
    found = judge(parent, parent, "other", inputs=rows, judged_on="dataset 7 (validation)")
    assert found.rows == 40 and found.judged_on == "dataset 7 (validation)"
    assert found.describe().startswith("min cosine 1.0000 on 40 rows of dataset 7 (validation)")


def test_a_parent_that_cannot_run_the_generated_inputs_leaves_it_unjudged(
    ts_mlp: ModelFile,
) -> None:
    wrong = ts_mlp.fresh_artifact()
    wrong.inputs = [TensorSpec("x", ["batch", 32], "float32")]  # the model takes 64 features
    with pytest.raises(Unjudgeable, match="the parent cannot run the judging inputs"):
        judge(wrong, ts_mlp.fresh_artifact(), "classification")


# -- quantize with no dataset ---------------------------------------------------------------------


def test_quantize_without_a_dataset_refuses_a_collapsed_classifier_as_not_kept(
    collapsing_onnx: Path, tmp_path: Path
) -> None:
    ctx = ctx_for(collapsing_onnx, tmp_path / "w", "classification")
    result = Quantize().run(ctx, STAGE, NO_SEARCH, noop)

    assert result.status is StageStatus.NOT_KEPT and result.outputs == []
    assert ctx.current == "input" and list(ctx.artifacts) == ["input"]
    assert not (ctx.workdir / STAGE / "model.onnx").exists()
    agreement = result.metrics["judged_agreement"]
    assert agreement < 0.9
    reason = f"top-1 agreement {agreement * 100:.1f}% < 99.0%"
    assert result.message.startswith(f"not kept: {reason}; top-1 agreement ")
    assert "on 128 generated rows, no dataset named" in result.message
    assert "int8_dynamic model is not registered (set keep_below_threshold" in result.message
    assert result.details["not_kept"] == reason and result.details["parent"] == "input"
    assert result.details["judgement"]["judged_on"] == "generated"


def test_quantize_without_a_dataset_holds_other_tasks_to_min_cosine(
    collapsing_onnx: Path, tmp_path: Path
) -> None:
    ctx = ctx_for(collapsing_onnx, tmp_path / "w", "regression")
    result = Quantize().run(ctx, STAGE, NO_SEARCH, noop)
    assert result.status is StageStatus.NOT_KEPT
    assert result.details["not_kept"].startswith("min cosine ")
    assert result.details["not_kept"].endswith(" < 0.9900")

    # A looser min_cosine lets the same model through, its judgement recorded.
    cosine = result.metrics["judged_min_cosine"]
    ctx = ctx_for(collapsing_onnx, tmp_path / "w2", "regression")
    result = Quantize().run(ctx, STAGE, {**NO_SEARCH, "min_cosine": cosine - 0.01}, noop)
    assert result.status is StageStatus.SUCCEEDED and result.outputs == [STAGE]


def test_quantize_keeps_a_model_under_the_threshold_when_told_to_and_says_so(
    collapsing_onnx: Path, tmp_path: Path
) -> None:
    ctx = ctx_for(collapsing_onnx, tmp_path / "w", "classification")
    settings = {**NO_SEARCH, "keep_below_threshold": True}
    result = Quantize().run(ctx, STAGE, settings, noop)
    assert result.status is StageStatus.SUCCEEDED and ctx.current == STAGE
    assert "% < 99.0%, kept because keep_below_threshold is set" in result.message
    assert ctx.current_artifact.meta["judgement"]["value"] < 0.9


def test_quantize_without_a_dataset_records_the_judgement_of_a_model_it_keeps(
    onnx_mlp: ModelFile, tmp_path: Path
) -> None:
    ctx = ctx_for(onnx_mlp.path, tmp_path / "w", "classification")
    result = Quantize().run(ctx, STAGE, {}, noop)

    assert result.status is StageStatus.SUCCEEDED and ctx.current == STAGE
    judged = ctx.current_artifact.meta["judgement"]
    assert judged["judged_on"] == "generated" and judged["metric"] == "agreement"
    assert (
        judged["value"] >= 0.99 and judged["rows"] == 128 and judged["shapes"] == {"x": [128, 64]}
    )
    assert ctx.current_artifact.metrics["judged_agreement"] == judged["value"]
    assert result.metrics["judged_agreement"] == judged["value"]
    assert "top-1 agreement " in result.message and "on 128 generated rows" in result.message


# -- a not-kept stage in a pipeline --------------------------------------------------------------


def test_a_pipeline_goes_on_with_the_parent_and_a_redelivery_keeps_the_verdict(
    collapsing_onnx: Path, tmp_path: Path
) -> None:
    stages = [
        {"name": "quantize", "settings": NO_SEARCH},
        {"name": "compile", "settings": {"backend": "onnxruntime"}},
    ]
    ctx = ctx_for(collapsing_onnx, tmp_path / "w", "classification")
    planned = validate_pipeline("onnx", stages)
    first = run_pipeline(ctx, planned)
    assert [r.status for r in first] == [StageStatus.NOT_KEPT, StageStatus.SUCCEEDED]
    compiled = ctx.artifacts[first[1].outputs[0]]
    assert compiled.parent == "input"  # compile ran on the parent

    # Delivered again: the not-kept stage is done (not run again), and its parent is current
    # when the next stage's output is gone and it runs again.
    Path(compiled.path).unlink()
    seen: list[StageStatus] = []
    again = run_pipeline(
        PipelineContext.load(ctx.workdir) or ctx,
        planned,
        on_stage_done=lambda result, _ctx: seen.append(result.status),
    )
    assert again[0].status is StageStatus.SKIPPED and again[0].message == SKIPPED_MESSAGE
    assert seen[0] is StageStatus.NOT_KEPT  # the runner is handed the original verdict
    assert again[1].status is StageStatus.SUCCEEDED
    reloaded = PipelineContext.load(ctx.workdir)
    assert reloaded is not None and reloaded.artifacts[again[1].outputs[0]].parent == "input"

    # Other settings are another judgement: the stage runs again.
    kept = validate_pipeline(
        "onnx", [{"name": "quantize", "settings": {**NO_SEARCH, "keep_below_threshold": True}}]
    )
    assert run_pipeline(reloaded, kept)[0].status is StageStatus.SUCCEEDED
