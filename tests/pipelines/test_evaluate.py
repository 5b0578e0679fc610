"""Task metrics on hand-computed arrays, predict on real ONNX/TorchScript files, and evaluate."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.core import (
    Artifact,
    Cancelled,
    DatasetRef,
    PipelineContext,
    PipelineError,
    StageConfigError,
    StageStatus,
    TensorSpec,
)
from pipelines.datasets import inspect_dataset
from pipelines.demo import DIGITS_INPUT, build_digits_classifier, write_digits_dataset
from pipelines.engines import clear_engine_cache, predict
from pipelines.engines import rows as engine_rows
from pipelines.metrics import primary_metric, retention, task_metrics
from pipelines.onnx_io import read_tensor_specs
from pipelines.stages import REGISTRY, Evaluate, EvaluateSettings, stage_schemas, validate_pipeline
from pipelines.stages.evaluate import runnable_parent


def noop(fraction: float, message: str) -> None:
    """A progress callback that ignores its calls."""


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models on a small shared CPU: one thread is several times faster than two fighting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def export(module: nn.Module, path: Path, batch: int, dynamic: bool, name: str = "x") -> Path:
    axes = {name: {0: "batch"}, "out": {0: "batch"}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(batch, 64),),
            str(path),
            input_names=[name],
            output_names=["out"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return path


def onnx_artifact(
    path: Path, key: str = "input", parent: str | None = None, precision: str = "fp32"
) -> Artifact:
    inputs, outputs = read_tensor_specs(path)
    return Artifact(
        key=key,
        path=str(path),
        format="onnx",
        precision=precision,
        inputs=inputs,
        outputs=outputs,
        parent=parent,
    )


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    return nn.Linear(64, 10).eval(), tmp_path_factory.mktemp("linear")


# -- metrics --------------------------------------------------------------------------------------


def test_it_names_each_tasks_primary_metric() -> None:
    assert primary_metric("classification") == ("accuracy", True)
    assert primary_metric("regression") == ("mse", False)
    assert primary_metric("embedding") == ("cosine", True)
    assert primary_metric("other") == ("mse", False)
    assert primary_metric("something-new") == ("mse", False)


def test_it_computes_accuracy_and_top_k_by_hand() -> None:
    logits = np.array(
        [
            [0.1, 0.7, 0.2, 0.0],  # ranks: 1, 2, 0, 3  -> label 1 is top-1
            [0.5, 0.1, 0.3, 0.2],  # label 2 is 2nd
            [0.1, 0.2, 0.3, 0.4],  # label 0 is 4th
            [0.9, 0.0, 0.05, 0.05],  # label 0 is top-1
        ]
    )
    labels = np.array([1, 2, 0, 0])

    result = task_metrics("classification", logits, labels, top_k=(1, 2, 3, 4, 5))

    assert result == {"accuracy": 0.5, "top2": 0.75, "top3": 0.75}  # k >= 4 classes skipped


def test_it_reads_float_and_one_hot_labels_and_a_single_logit() -> None:
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert task_metrics("classification", logits, np.array([0.0, 1.0, 1.0]))["accuracy"] == 2 / 3
    one_hot = np.array([[1, 0], [0, 1], [0, 1]])
    assert task_metrics("classification", logits, one_hot)["accuracy"] == 2 / 3
    single = np.array([[-1.5], [2.0], [0.3]])  # logits: class 1 when > 0
    assert task_metrics("classification", single, np.array([0, 1, 0]))["accuracy"] == 2 / 3
    probs = np.array([0.2, 0.9, 0.6])  # probabilities: class 1 when > 0.5
    assert task_metrics("classification", probs, np.array([0, 1, 1]))["accuracy"] == 1.0


def test_it_refuses_labels_outside_the_models_classes() -> None:
    with pytest.raises(PipelineError, match=r"labels range over 0\.\.12 but the model outputs 10"):
        task_metrics("classification", np.zeros((2, 10)), np.array([0, 12]))
    with pytest.raises(PipelineError, match="gave 2 outputs for 3 labels"):
        task_metrics("classification", np.zeros((2, 10)), np.array([0, 1, 2]))


def test_it_measures_agreement_with_a_reference() -> None:
    child = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    parent = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    result = task_metrics("classification", child, None, reference=parent)
    assert result == {"agreement": 0.75}


def test_it_computes_regression_errors_by_hand() -> None:
    outputs = np.array([[1.0], [2.0], [4.0]])
    targets = np.array([1.0, 3.0, 2.0])  # reshaped to [3, 1]

    result = task_metrics("regression", outputs, targets)

    assert result["mse"] == pytest.approx((0 + 1 + 4) / 3)
    assert result["mae"] == pytest.approx((0 + 1 + 2) / 3)
    assert task_metrics("other", outputs, targets) == result
    ref = task_metrics("regression", outputs, None, reference=np.array([[1.0], [2.0], [2.0]]))
    assert ref == {"ref_mse": pytest.approx(4 / 3), "ref_mae": pytest.approx(2 / 3)}
    with pytest.raises(PipelineError, match="outputs 1 value"):
        task_metrics("regression", outputs, np.zeros((3, 2)))


def test_it_computes_embedding_cosine_by_hand() -> None:
    outputs = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    targets = np.array([[2.0, 0.0], [1.0, 0.0], [0.0, -1.0]])  # cos = 1, 1/sqrt(2), -1

    result = task_metrics("embedding", outputs, targets)

    assert result["cosine"] == pytest.approx((1 + 1 / math.sqrt(2) - 1) / 3)
    assert task_metrics("embedding", outputs, None, reference=outputs * 3) == {
        "cosine": pytest.approx(1.0)
    }
    zero = task_metrics("embedding", np.zeros((1, 2)), np.ones((1, 2)))
    assert zero["cosine"] == 0.0  # no division by zero


def test_it_needs_targets_or_a_reference() -> None:
    with pytest.raises(PipelineError, match="need targets"):
        task_metrics("regression", np.zeros((2, 1)), None)


def test_it_computes_retention_in_both_directions() -> None:
    assert retention(0.97, 0.98, higher_is_better=True) == pytest.approx(0.97 / 0.98)
    assert retention(0.2, 0.1, higher_is_better=False) == pytest.approx(0.5)  # error doubled
    assert retention(0.05, 0.1, higher_is_better=False) == pytest.approx(2.0)  # error halved
    assert retention(0.0, 0.0, higher_is_better=True) == 1.0
    assert retention(0.0, 0.0, higher_is_better=False) == 1.0
    assert retention(0.0, 0.5, higher_is_better=True) == 0.0
    assert math.isinf(retention(0.5, 0.0, higher_is_better=True))
    assert math.isinf(retention(0.0, 0.3, higher_is_better=False))


# -- predict --------------------------------------------------------------------------------------


def test_it_predicts_with_onnx_at_any_batch_size(linear: tuple[nn.Module, Path]) -> None:
    module, folder = linear
    artifact = onnx_artifact(export(module, folder / "dyn.onnx", 2, dynamic=True))
    x = np.random.default_rng(0).standard_normal((37, 64)).astype(np.float32)
    fractions: list[float] = []

    out = predict(artifact, {"x": x}, batch_size=8, progress=fractions.append)

    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    assert out.shape == (37, 10)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert len(fractions) == 5 and fractions[-1] == 1.0 and fractions == sorted(fractions)


def test_it_predicts_with_a_fixed_batch_onnx_model(linear: tuple[nn.Module, Path]) -> None:
    module, folder = linear
    artifact = onnx_artifact(export(module, folder / "fixed4.onnx", 4, dynamic=False))
    assert artifact.inputs[0].shape == [4, 64]
    x = np.random.default_rng(1).standard_normal((10, 64))  # float64: cast to the model's float32

    out = predict(artifact, {"x": x}, batch_size=64)  # runs at 4, the last batch padded

    with torch.inference_mode():
        expected = module(torch.from_numpy(x).float()).numpy()
    assert out.shape == (10, 10)
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("fixed", [False, True])
def test_it_predicts_with_torchscript(linear: tuple[nn.Module, Path], fixed: bool) -> None:
    module, folder = linear
    path = folder / f"ts_{fixed}.pt"
    torch.jit.script(module).save(str(path))
    spec = TensorSpec("x", [3 if fixed else "batch", 64], "float32")
    artifact = Artifact("input", str(path), "torchscript", "fp32", [spec], [])
    x = np.random.default_rng(2).standard_normal((7, 64)).astype(np.float32)

    out = predict(artifact, {"x": x}, batch_size=5)

    with torch.inference_mode():
        expected = module(torch.from_numpy(x)).numpy()
    assert out.shape == (7, 10)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_it_caches_loaded_models_per_file(linear: tuple[nn.Module, Path]) -> None:
    module, folder = linear
    artifact = onnx_artifact(export(module, folder / "cached.onnx", 2, dynamic=True))
    clear_engine_cache()
    x = np.zeros((2, 64), np.float32)

    predict(artifact, {"x": x})
    first = list(engine_rows._cache.values())
    predict(artifact, {"x": x})

    assert len(first) == 1 and list(engine_rows._cache.values()) == first


def test_it_refuses_formats_it_cannot_run(tmp_path: Path) -> None:
    # predict runs every tensor engine (TensorRT included, where there is a GPU): a format no
    # engine runs is refused by name, before its file is looked for.
    engine = Artifact("02-compile", str(tmp_path / "model.gguf"), "gguf", "fp16", [], [])
    with pytest.raises(PipelineError, match="no engine runs gguf models"):
        predict(engine, {})


def test_it_names_a_missing_input(linear: tuple[nn.Module, Path]) -> None:
    module, folder = linear
    artifact = onnx_artifact(export(module, folder / "named.onnx", 2, dynamic=True))
    with pytest.raises(PipelineError, match=r"needs input\(s\) \['x'\]"):
        predict(artifact, {"image": np.zeros((1, 64), np.float32)})


# -- the evaluate stage ---------------------------------------------------------------------------


def test_it_registers_evaluate_with_a_dataset_id_setting() -> None:
    assert REGISTRY["evaluate"] is Evaluate
    assert Evaluate.accepts == ("onnx", "torchscript") and Evaluate.produces is None
    schema = next(s for s in stage_schemas() if s["name"] == "evaluate")["settings"]
    assert "dataset_id" in schema["required"]
    assert schema["properties"]["split"]["default"] == "validation"

    planned = validate_pipeline(
        "torchscript",
        [
            {"name": "export_onnx"},
            {"name": "evaluate", "settings": {"dataset_id": 3, "split": "test"}},
            {"name": "quantize"},
            {"name": "evaluate", "settings": {"dataset_id": 3, "top_k": [5, 1, 5]}},
        ],
    )
    assert [p.name for p in planned] == ["export_onnx", "evaluate", "quantize", "evaluate"]
    assert isinstance(planned[3].settings, EvaluateSettings)
    assert planned[3].settings.top_k == [1, 5]
    with pytest.raises(StageConfigError, match="dataset_id: Field required"):
        validate_pipeline("onnx", [{"name": "evaluate"}])
    with pytest.raises(StageConfigError, match="batch_size"):
        validate_pipeline(
            "onnx", [{"name": "evaluate", "settings": {"dataset_id": 1, "batch_size": 0}}]
        )


@dataclass
class Digits:
    ts: Path
    fp32: Path
    int8: Path
    ref: DatasetRef


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    """The demo classifier: TorchScript -> ONNX fp32 -> ONNX int8 (dynamic), and its dataset."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = tmp_path_factory.mktemp("digits_eval")
    ts_path = folder / "digits.pt"
    build_digits_classifier(ts_path, epochs=8)
    fp32 = export(torch.jit.load(str(ts_path)).eval(), folder / "fp32.onnx", 2, True, "input")
    int8 = folder / "int8.onnx"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing" hint
    try:
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    data = folder / "digits.npz"
    write_digits_dataset(data, "npz")
    schema = inspect_dataset(data, "digits.npz").schema
    return Digits(
        ts_path, fp32, int8, DatasetRef(id="3", path=str(data), format="npz", schema=schema)
    )


def digits_ctx(digits: Digits, workdir: Path) -> PipelineContext:
    """Context: input (TorchScript) -> 01-export_onnx (fp32) -> 02-quantize (int8, current)."""
    source = Artifact("input", str(digits.ts), "torchscript", "fp32", DIGITS_INPUT, [])
    ctx = PipelineContext.start(
        workdir,
        source,
        task="classification",
        datasets={"3": digits.ref},
    )
    ctx.add_artifact(onnx_artifact(digits.fp32, "01-export_onnx", "input"))
    ctx.add_artifact(onnx_artifact(digits.int8, "02-quantize", "01-export_onnx", precision="int8"))
    return ctx


def test_it_evaluates_an_int8_model_against_its_fp32_parent(digits: Digits, tmp_path: Path) -> None:
    ctx = digits_ctx(digits, tmp_path)
    calls: list[tuple[float, str]] = []

    result = Evaluate().run(
        ctx, "03-evaluate", {"dataset_id": 3}, lambda f, m: calls.append((f, m))
    )

    assert result.status is StageStatus.SUCCEEDED
    m = result.metrics
    assert m["accuracy"] > 0.85 and m["parent_accuracy"] > 0.85
    assert m["retention"] == pytest.approx(m["accuracy"] / m["parent_accuracy"])
    assert 0.9 < m["retention"] < 1.1
    assert m["top5"] >= m["accuracy"] and m["eval_rows"] == 180.0
    assert 0.9 <= m["agreement"] <= 1.0
    assert all(isinstance(v, float) for v in m.values())
    # Written into the evaluated (current, int8) artifact, strings in meta only.
    assert ctx.current == "02-quantize"
    assert ctx.artifacts["02-quantize"].metrics["retention"] == m["retention"]
    assert ctx.artifacts["02-quantize"].metrics["accuracy"] == m["accuracy"]
    evaluation = ctx.artifacts["02-quantize"].meta["evaluation"]
    assert evaluation["parent"] == "01-export_onnx" and evaluation["split"] == "validation"
    assert "accuracy" not in ctx.artifacts["01-export_onnx"].metrics
    assert result.message.startswith(f"accuracy {m['accuracy']:.4f} on 180 validation rows; ")
    assert f"parent {m['parent_accuracy']:.4f}" in result.message
    assert f"retention {m['retention'] * 100:.1f}%" in result.message
    fractions = [f for f, _ in calls]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    ctx.save()  # the metrics are JSON-safe
    reloaded = PipelineContext.load(tmp_path)
    assert reloaded is not None
    assert reloaded.artifacts["02-quantize"].metrics["retention"] == m["retention"]


def test_it_evaluates_a_model_without_a_runnable_parent(digits: Digits, tmp_path: Path) -> None:
    source = Artifact("input", str(digits.ts), "torchscript", "fp32", DIGITS_INPUT, [])
    ctx = PipelineContext.start(
        tmp_path,
        source,
        task="classification",
        datasets={"3": digits.ref},
    )

    result = Evaluate().run(ctx, "01-evaluate", {"dataset_id": 3, "split": "test"}, noop)

    assert result.metrics["accuracy"] > 0.85 and "retention" not in result.metrics
    assert result.message.endswith("no parent model to compare with")
    assert ctx.artifacts["input"].meta["evaluation"]["split"] == "test"


def test_it_skips_ancestors_it_cannot_run(digits: Digits, tmp_path: Path) -> None:
    ctx = digits_ctx(digits, tmp_path)
    engine = Artifact("03-compile", str(tmp_path / "x.plan"), "tensorrt", "fp16", [], [])
    engine.parent = "02-quantize"
    ctx.add_artifact(engine)
    child = onnx_artifact(digits.fp32, "04-child", "03-compile")
    ctx.add_artifact(child)

    parent = runnable_parent(ctx, child)

    assert parent is not None and parent.key == "02-quantize"


def test_it_explains_a_missing_dataset_and_a_wrong_format(digits: Digits, tmp_path: Path) -> None:
    ctx = digits_ctx(digits, tmp_path)
    with pytest.raises(PipelineError, match="dataset 7 .* was not provided to this job"):
        Evaluate().run(ctx, "03-evaluate", {"dataset_id": 7}, noop)
    ctx.add_artifact(Artifact("03-compile", "x.plan", "tensorrt", "fp16", [], [], "02-quantize"))
    with pytest.raises(PipelineError, match="evaluate needs a onnx or torchscript model"):
        Evaluate().run(ctx, "04-evaluate", {"dataset_id": 3}, noop)


def test_it_stops_when_cancelled(digits: Digits, tmp_path: Path) -> None:
    ctx = digits_ctx(digits, tmp_path)

    def cancel(fraction: float, message: str) -> None:
        if fraction > 0.1:
            raise Cancelled()

    with pytest.raises(Cancelled):
        Evaluate().run(ctx, "03-evaluate", {"dataset_id": 3, "batch_size": 16}, cancel)
    assert "accuracy" not in ctx.current_artifact.metrics


def test_it_compares_embeddings_with_the_parent_without_targets(
    linear: tuple[nn.Module, Path], tmp_path: Path
) -> None:
    module, folder = linear
    ts_path = folder / "embed.pt"
    torch.jit.script(module).save(str(ts_path))
    spec = TensorSpec("x", ["batch", 64], "float32")
    data = tmp_path / "vectors.npz"
    np.savez(data, x=np.random.default_rng(3).standard_normal((40, 64)).astype(np.float32))
    ref = DatasetRef(id="5", path=str(data), format="npz")
    ctx = PipelineContext.start(
        tmp_path,
        Artifact("input", str(ts_path), "torchscript", "fp32", [spec], []),
        "embedding",
        {"5": ref},
    )
    ctx.add_artifact(onnx_artifact(export(module, folder / "embed.onnx", 2, True), "01-x", "input"))

    result = Evaluate().run(ctx, "02-evaluate", {"dataset_id": 5, "split": "all"}, noop)

    assert result.metrics["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert result.metrics["retention"] == pytest.approx(1.0, abs=1e-5)
    assert result.metrics["eval_rows"] == 40.0
    assert "parent_cosine" not in result.metrics


def test_it_needs_targets_or_a_parent(linear: tuple[nn.Module, Path], tmp_path: Path) -> None:
    module, folder = linear
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((10, 64), np.float32))
    artifact = onnx_artifact(export(module, folder / "lonely.onnx", 2, True))
    ctx = PipelineContext.start(
        tmp_path, artifact, "regression", {"5": DatasetRef("5", str(data), "npz")}
    )
    with pytest.raises(PipelineError, match="dataset 5 has no target column"):
        Evaluate().run(ctx, "01-evaluate", {"dataset_id": 5}, noop)
