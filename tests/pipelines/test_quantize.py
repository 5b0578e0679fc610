"""quantize's modes (int8 dynamic/static, fp16, bf16), its retention gate and its precision rules.

The static int8 tests run on the demo digits classifier (a real trained model, exported to ONNX)
calibrated and evaluated on the digits dataset, so the accuracy numbers are real ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from pipelines.core import (
    Artifact,
    DatasetRef,
    PipelineContext,
    PipelineError,
    StageConfigError,
    StageStatus,
)
from pipelines.datasets import load_split
from pipelines.demo import build_digits_classifier, write_digits_dataset
from pipelines.onnx_io import cpu_session, read_tensor_specs
from pipelines.quantization.floats import convert_float
from pipelines.stages import Quantize, QuantizeSettings, default_pipeline, validate_pipeline
from pipelines.staging import PARTIAL_PREFIX

from .conftest import ModelFile

STAGE = "01-quantize"
MakeCtx = Callable[..., PipelineContext]


def noop(fraction: float, message: str) -> None:
    """A progress callback that ignores its calls."""


def export(module: torch.nn.Module, path: Path) -> Path:
    """ONNX with a dynamic batch, input "input" [batch, 64], output "output" (legacy exporter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(2, 64),),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("digits")


@pytest.fixture(scope="module")
def digits_onnx(digits_dir: Path) -> Path:
    """The demo digits classifier (Linear 64-128, ReLU, Linear 128-10), trained, as ONNX.

    One thread trains a model this small faster than several competing with other processes.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        accuracy = build_digits_classifier(digits_dir / "digits.pt")
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.9
    return export(torch.jit.load(str(digits_dir / "digits.pt")), digits_dir / "digits.onnx")


@pytest.fixture(scope="module")
def outlier_onnx(digits_dir: Path, digits_onnx: Path) -> Path:
    """The digits classifier plus one hidden unit 20x the pixel sum that the output ignores.

    The predictions are the same, but that unit sets the range of the hidden activations, which
    int8 shares per tensor: the small activations that carry the answer lose their precision.
    """
    trained = torch.jit.load(str(digits_dir / "digits.pt")).state_dict()
    hidden = trained["0.weight"].shape[0]
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden + 1), torch.nn.ReLU(), torch.nn.Linear(hidden + 1, 10)
    ).eval()
    with torch.no_grad():
        model[0].weight[:hidden] = trained["0.weight"]
        model[0].bias[:hidden] = trained["0.bias"]
        model[0].weight[hidden] = 20.0
        model[0].bias[hidden] = 0.0
        model[2].weight[:, :hidden] = trained["2.weight"]
        model[2].weight[:, hidden] = 0.0
        model[2].bias[:] = trained["2.bias"]
    return export(model, digits_dir / "outlier.onnx")


@pytest.fixture(scope="module")
def digits_csv(digits_dir: Path) -> Path:
    path = digits_dir / "digits.csv"
    write_digits_dataset(path, "csv")
    return path


@pytest.fixture
def make_ctx(tmp_path: Path, digits_csv: Path) -> MakeCtx:
    """A classification context over an ONNX file, the digits CSV as dataset "1"."""
    counter = iter(range(1_000))

    def make(
        path: Path,
        datasets: dict[str, DatasetRef] | None = None,
        precision: str = "fp32",
        task: str = "classification",
    ) -> PipelineContext:
        workdir = tmp_path / f"work{next(counter)}"
        workdir.mkdir()
        inputs, outputs = read_tensor_specs(path)
        source = Artifact(
            key="input",
            path=str(path),
            format="onnx",
            precision=precision,
            inputs=inputs,
            outputs=outputs,
        )
        if datasets is None:
            datasets = {"1": DatasetRef(id="1", path=str(digits_csv), format="csv", target="label")}
        return PipelineContext.start(workdir, source, task=task, datasets=datasets)

    return make


def stage_files(ctx: PipelineContext) -> list[str]:
    return sorted(p.name for p in (ctx.workdir / STAGE).iterdir())


def initializers(path: str | Path) -> dict[str, np.ndarray]:
    graph = onnx.load(str(path)).graph
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


# -- fp16 / bf16 ----------------------------------------------------------------------------------


def test_it_converts_to_fp16_at_about_half_the_size_with_close_outputs(
    onnx_mlp: ModelFile, make_ctx: MakeCtx
) -> None:
    ctx = make_ctx(onnx_mlp.path)
    result = Quantize().run(ctx, STAGE, {"mode": "fp16"}, noop)

    artifact = ctx.current_artifact
    assert result.outputs == [STAGE] and artifact.precision == "fp16"
    assert 0.45 < result.metrics["size_ratio"] < 0.6
    assert result.metrics["quantized_ops.Gemm"] == 2
    assert "fp16 conversion: 3 nodes in fp16" in result.message
    # The serving contract is unchanged: float32 in and out, casts at the edges, in graph order.
    assert [(s.name, s.dtype) for s in artifact.inputs] == [("x", "float32")]
    assert artifact.outputs[0].dtype == "float32"
    model = onnx.load(artifact.path)
    assert model.graph.node[0].op_type == "Cast" and model.graph.node[-1].op_type == "Cast"
    assert {t.data_type for t in model.graph.initializer} == {TensorProto.FLOAT16}
    assert 0 < result.metrics["max_abs_diff"] < 1e-2

    x = np.random.default_rng(5).standard_normal((64, 64)).astype(np.float32)
    (fp32,) = cpu_session(onnx_mlp.path).run(None, {"x": x})
    (fp16,) = cpu_session(artifact.path).run(None, {"x": x})
    assert fp16.dtype == np.float32
    np.testing.assert_allclose(fp16, fp32, atol=2e-2)


def test_it_makes_fp16_inputs_and_outputs_when_keep_io_types_is_off(
    onnx_mlp: ModelFile, make_ctx: MakeCtx
) -> None:
    ctx = make_ctx(onnx_mlp.path)
    Quantize().run(ctx, STAGE, {"mode": "fp16", "keep_io_types": False}, noop)

    artifact = ctx.current_artifact
    assert artifact.inputs[0].dtype == "float16" and artifact.outputs[0].dtype == "float16"
    assert "Cast" not in [n.op_type for n in onnx.load(artifact.path).graph.node]
    (out,) = cpu_session(artifact.path).run(None, {"x": np.ones((2, 64), np.float16)})
    assert out.dtype == np.float16


def test_it_runs_bf16_only_where_a_provider_can(onnx_mlp: ModelFile, make_ctx: MakeCtx) -> None:
    ctx = make_ctx(onnx_mlp.path)
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        Quantize().run(ctx, STAGE, {"mode": "bf16"}, noop)
        assert ctx.current_artifact.precision == "bf16"
        return
    # onnxruntime's CPU provider has no bf16 Gemm: the stage says so instead of writing a model
    # nothing here can run.
    with pytest.raises(PipelineError) as caught:
        Quantize().run(ctx, STAGE, {"mode": "bf16"}, noop)
    message = str(caught.value)
    assert message.startswith(
        "bf16 needs a backend that runs it, e.g. TensorRT or ORT's CUDA provider; this worker "
        "has CPU only"
    )
    assert "Could not find an implementation for Gemm" in message
    assert ctx.current == "input" and list(ctx.artifacts) == ["input"]
    assert stage_files(ctx) == []


def test_it_converts_weights_to_bfloat16_without_fp16_clipping() -> None:
    weight = np.array([[1e5, -3.3e-9], [0.1, 2.5]], np.float32)  # outside fp16's range and grain
    bias = np.array([0.5, -1e-7], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    fp32 = onnx.shape_inference.infer_shapes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    )
    before = fp32.SerializeToString()

    bf16 = convert_float(fp32, "bf16")

    assert fp32.SerializeToString() == before  # the source model is left as it was
    onnx.checker.check_model(bf16, full_check=True)
    inits = {t.name: t for t in bf16.graph.initializer}
    assert {t.data_type for t in inits.values()} == {TensorProto.BFLOAT16}
    bf16_type = helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16)
    for name, original in (("w", weight), ("b", bias)):
        got = numpy_helper.to_array(inits[name]).astype(np.float32)
        assert np.array_equal(got, original.astype(bf16_type).astype(np.float32)), name
    assert abs(float(numpy_helper.to_array(inits["w"]).astype(np.float32)[0, 0]) - 1e5) < 1e3
    assert {v.type.tensor_type.elem_type for v in [*bf16.graph.input, *bf16.graph.output]} == {
        TensorProto.FLOAT
    }
    assert [n.op_type for n in bf16.graph.node] == ["Cast", "MatMul", "Add", "Cast"]
    # The graph computes what the fp32 one does, to bf16's precision (onnx's reference runtime).
    from onnx.reference import ReferenceEvaluator

    x = np.array([[1.0, 2.0], [-0.5, 0.25]], np.float32)
    (expected,) = ReferenceEvaluator(fp32).run(None, {"x": x})
    (got,) = ReferenceEvaluator(bf16).run(None, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=2e-2)


# -- int8 static ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_it_quantizes_digits_to_symmetric_per_channel_qdq(
    method: str, digits_onnx: Path, make_ctx: MakeCtx
) -> None:
    ctx = make_ctx(digits_onnx)
    settings = {"mode": "int8_static", "calibration_dataset_id": 1, "calibrate_method": method}
    result = Quantize().run(ctx, STAGE, settings, noop)

    artifact = ctx.current_artifact
    assert result.outputs == [STAGE] and artifact.precision == "int8"
    assert artifact.meta["calibrate_method"] == method and artifact.meta["symmetric"] is True
    assert artifact.meta["calibration_rows"] == 256
    model = onnx.load(artifact.path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 5
    assert result.metrics["quantized_ops.Gemm"] == 2
    inits = initializers(artifact.path)
    weights = {"0.weight": 128, "2.weight": 10}  # name -> output channels
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        value, scale, zero_point = node.input
        assert not np.any(inits[zero_point]), f"{zero_point} is not 0"  # symmetric: TensorRT
        name = value.removesuffix("_quantized")
        if node.op_type == "DequantizeLinear" and name in weights:
            assert inits[value].dtype == np.int8
            assert inits[scale].shape == (weights[name],)  # one scale per output channel
        elif value in inits and inits[value].dtype == np.int32:
            assert inits[scale].ndim == 1  # biases follow their weights' channels
        else:
            assert inits[scale].shape == ()  # activations: one scale per tensor
    assert result.metrics["size_ratio"] < 0.45

    # Retention is recorded, and checked against an independent run on the same split.
    parent, child = result.metrics["parent_accuracy"], result.metrics["accuracy"]
    assert result.metrics["retention"] == pytest.approx(child / parent)
    assert result.metrics["retention"] >= 0.99
    data = load_split(ctx.datasets["1"], "validation", artifact.inputs)
    (scores,) = cpu_session(artifact.path).run(None, data.inputs)
    assert float(np.mean(scores.argmax(1) == data.targets)) == pytest.approx(child)
    assert parent > 0.9
    assert f"{method} calibration on 256 rows" in result.message
    assert "validation rows of dataset 1" in result.message


def test_it_calibrates_a_fixed_batch_model_in_batches_of_its_size(
    onnx_fixed_batch: ModelFile, make_ctx: MakeCtx
) -> None:
    ctx = make_ctx(onnx_fixed_batch.path)
    settings = {
        "mode": "int8_static",
        "calibration_dataset_id": 1,
        "calibration_samples": 10,
        "min_retention": 0.0,  # a random MLP: its accuracy on digits means nothing
    }
    result = Quantize().run(ctx, STAGE, settings, noop)

    assert result.outputs == [STAGE]
    assert ctx.current_artifact.meta["calibration_rows"] == 10
    assert ctx.current_artifact.inputs[0].shape == [1, 64]
    assert "QuantizeLinear" in [n.op_type for n in onnx.load(ctx.current_artifact.path).graph.node]


def test_it_names_both_shapes_when_the_calibration_rows_do_not_fit(
    digits_onnx: Path, make_ctx: MakeCtx, tmp_path: Path
) -> None:
    narrow = tmp_path / "narrow.csv"
    rng = np.random.default_rng(0)
    rows = [",".join([*(f"f{i}" for i in range(32)), "label"])]
    rows += [",".join([*(f"{v:.3f}" for v in rng.random(32)), str(i % 10)]) for i in range(40)]
    narrow.write_text("\n".join(rows) + "\n")
    ref = DatasetRef(id="7", path=str(narrow), format="csv", target="label")
    ctx = make_ctx(digits_onnx, datasets={"7": ref})

    with pytest.raises(PipelineError) as caught:
        Quantize().run(ctx, STAGE, {"mode": "int8_static", "calibration_dataset_id": 7}, noop)

    message = str(caught.value)
    assert message.startswith("calibration_dataset_id 7 cannot calibrate this model")
    assert "32 feature columns" in message and "[batch, 64]" in message
    assert ctx.current == "input" and stage_files(ctx) == []


def test_it_refuses_int8_static_without_a_calibration_dataset() -> None:
    with pytest.raises(StageConfigError) as caught:
        validate_pipeline("onnx", [{"name": "quantize", "settings": {"mode": "int8_static"}}])
    assert str(caught.value).startswith(
        "stage 1 (quantize): settings: int8_static needs calibration_dataset_id"
    )

    planned = validate_pipeline(
        "onnx",
        [{"name": "quantize", "settings": {"mode": "int8_static", "calibration_dataset_id": 3}}],
    )
    settings = planned[0].settings
    assert isinstance(settings, QuantizeSettings)
    assert settings.effective_eval_dataset_id == 3  # the calibration set doubles as eval set
    assert settings.effective_per_channel is True
    # A validated plan, stored with every setting written out, validates again as it is.
    assert validate_pipeline("onnx", [planned[0].to_dict()])[0].settings == settings


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"calibrate_method": "entropy"}, "calibrate_method only applies to mode int8_static"),
        ({"mode": "fp16", "per_channel": True}, "per_channel only applies to the int8 modes"),
        ({"keep_io_types": False}, "keep_io_types only applies to modes fp16 and bf16"),
        ({"eval_split": "test"}, "eval_split needs an evaluation dataset"),
        ({"eval_dataset_id": 2, "min_retention": 1.5}, "less than or equal to 1"),
    ],
)
def test_it_refuses_settings_that_do_not_apply(given: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        QuantizeSettings.model_validate(given)


# -- retention gate -------------------------------------------------------------------------------


def test_it_does_not_register_a_model_under_the_retention_threshold(
    outlier_onnx: Path, make_ctx: MakeCtx
) -> None:
    ctx = make_ctx(outlier_onnx)
    # The gate itself: the search that would keep the sensitive node in float is off.
    settings = {"mode": "int8_static", "calibration_dataset_id": 1, "sensitivity_search": False}
    result = Quantize().run(ctx, STAGE, settings, noop)

    assert result.status is StageStatus.NOT_KEPT and result.outputs == []
    assert ctx.current == "input" and list(ctx.artifacts) == ["input"]
    retention = result.metrics["retention"]
    assert retention < 0.99
    assert result.metrics["accuracy"] < result.metrics["parent_accuracy"]
    assert 0 < result.metrics["size_ratio"] < 0.5
    assert result.message.startswith(
        f"not kept: retention {retention * 100:.1f}% < 99.0%; accuracy "
    )
    assert "the int8_static model is not registered (set keep_below_threshold to keep it)" in (
        result.message
    )
    assert result.details["not_kept"] == f"retention {retention * 100:.1f}% < 99.0%"
    # Nothing that looks like an output, not even a partial folder.
    assert not (ctx.workdir / STAGE).exists() or stage_files(ctx) == []


def test_it_keeps_a_model_under_the_threshold_when_told_to(
    outlier_onnx: Path, make_ctx: MakeCtx
) -> None:
    ctx = make_ctx(outlier_onnx)
    settings = {
        "mode": "int8_static",
        "calibration_dataset_id": 1,
        "keep_below_threshold": True,
        "sensitivity_search": False,
    }
    result = Quantize().run(ctx, STAGE, settings, noop)

    assert result.outputs == [STAGE] and ctx.current == STAGE
    assert result.metrics["retention"] < 0.99
    assert ctx.current_artifact.metrics["retention"] == result.metrics["retention"]
    assert ctx.current_artifact.meta["evaluation"]["metric"] == "accuracy"
    assert "kept because keep_below_threshold is set" in result.message
    assert stage_files(ctx) == ["model.onnx"]


def test_it_registers_a_model_that_clears_a_lower_threshold(
    outlier_onnx: Path, make_ctx: MakeCtx
) -> None:
    ctx = make_ctx(outlier_onnx)
    settings = {"mode": "int8_static", "calibration_dataset_id": 1, "min_retention": 0.5}
    result = Quantize().run(ctx, STAGE, settings, noop)

    assert 0.5 <= result.metrics["retention"] < 0.99
    assert result.outputs == [STAGE] and "keep_below_threshold" not in result.message


def test_it_judges_unlabelled_data_on_agreement_with_the_parent(
    digits_onnx: Path, make_ctx: MakeCtx, tmp_path: Path
) -> None:
    from sklearn.datasets import load_digits

    unlabelled = tmp_path / "unlabelled.npz"
    with unlabelled.open("wb") as f:
        np.savez(f, input=(load_digits().data / 16.0).astype(np.float32))
    ref = DatasetRef(id="4", path=str(unlabelled), format="npz")

    ctx = make_ctx(digits_onnx, datasets={"4": ref})
    result = Quantize().run(ctx, STAGE, {"mode": "int8_dynamic", "eval_dataset_id": 4}, noop)
    assert result.metrics["parent_agreement"] == 1.0
    assert result.metrics["retention"] == result.metrics["agreement"] >= 0.95
    assert "agreement 1.0000 -> " in result.message

    # A regression model has nothing to compare with without targets: when the dataset was only
    # named for calibration the gate is skipped and the message says so.
    ctx = make_ctx(digits_onnx, datasets={"4": ref}, task="regression")
    settings = {"mode": "int8_static", "calibration_dataset_id": 4}
    result = Quantize().run(ctx, STAGE, settings, noop)
    assert result.outputs == [STAGE] and "retention" not in result.metrics
    assert "no retention check: evaluation dataset 4 has no target column" in result.message


# -- precision rules ------------------------------------------------------------------------------


def test_it_follows_the_precision_each_mode_leaves() -> None:
    def refusal(stages: list[dict[str, Any]], precision: str | None = None) -> str:
        with pytest.raises(StageConfigError) as caught:
            validate_pipeline("onnx", stages, precision)
        return str(caught.value)

    fp16 = {"name": "quantize", "settings": {"mode": "fp16"}}
    int8 = {"name": "quantize", "settings": {"mode": "int8_dynamic"}}
    assert refusal([fp16, int8]) == (
        "stage 2 (quantize): the model is fp16 at that point, and int8_dynamic starts from the "
        "fp32 model; quantize once, from fp32: remove this stage or the one that made it fp16"
    )
    assert refusal([int8, fp16]).startswith(
        "stage 2 (quantize): the model is int8 at that point, and fp16"
    )
    assert refusal([fp16, fp16]) == (
        "stage 2 (quantize): the model is already fp16 at that point; remove this stage"
    )
    static = {"mode": "int8_static", "calibration_dataset_id": 1}
    bf16_message = refusal([{"name": "quantize", "settings": static}], "bf16")
    assert "the model is bf16 at that point, and int8_static starts from" in bf16_message
    assert [p.name for p in validate_pipeline("onnx", [fp16, {"name": "compile"}])] == [
        "quantize",
        "compile",
    ]
    # An upload that is already half precision gets no int8 quantize by default either.
    assert "quantize" not in [s["name"] for s in default_pipeline("onnx", "fp16")]


def test_it_refuses_at_run_time_to_quantize_a_half_precision_model(
    onnx_mlp: ModelFile, make_ctx: MakeCtx
) -> None:
    ctx = make_ctx(onnx_mlp.path, precision="fp16")
    with pytest.raises(PipelineError, match="'input' is fp16, and int8_dynamic starts from"):
        Quantize().run(ctx, STAGE, {}, noop)
    assert ctx.current == "input"
    assert not any(p.name.startswith(PARTIAL_PREFIX) for p in ctx.workdir.rglob("*"))


# -- the stored file is never written beside -----------------------------------------------------


@pytest.mark.parametrize("preprocessing", ["works", "fails"])
def test_it_never_writes_beside_the_stored_model(
    digits_onnx: Path,
    make_ctx: MakeCtx,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    preprocessing: str,
) -> None:
    # onnxruntime's quantizer writes "<model>-inferred.onnx" beside the file it is given and
    # deletes it after: two jobs on one stored parent collided there.
    stored = tmp_path / "media" / "models" / "team-1" / "stored.onnx"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(digits_onnx.read_bytes())
    before = sorted(stored.parent.iterdir())
    written: list[Path] = []
    real = onnx.shape_inference.infer_shapes_path

    def spy(model_path: str, output_path: str = "", *args: Any, **kwargs: Any) -> None:
        written.append(Path(output_path or model_path).resolve())
        real(model_path, output_path, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", spy)
    if preprocessing == "fails":  # the case that handed the quantizer the stored file itself
        monkeypatch.setattr("pipelines.quantization.int8.preprocess", lambda *args: None)

    result = Quantize().run(make_ctx(stored), STAGE, {"mode": "int8_dynamic"}, noop)

    assert result.status is StageStatus.SUCCEEDED, result.message
    assert written, "the quantizer inferred shapes somewhere"
    assert all(stored.parent.resolve() not in p.parents for p in written), written
    assert sorted(stored.parent.iterdir()) == before


# -- transformers: only the weight-bearing ops by default -----------------------------------------


class _EncoderBlock(torch.nn.Module):
    """One pre-norm transformer block over 8 tokens of 8 features: LayerNorm, Softmax, GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(x.shape[0], 8, 8)
        h = self.norm(tokens)
        tokens = tokens + self.attn(h, h, h, need_weights=False)[0]
        tokens = tokens + self.mlp(self.norm(tokens))
        return tokens.reshape(x.shape[0], 64)


@pytest.fixture(scope="module")
def encoder_onnx(digits_dir: Path) -> Path:
    torch.manual_seed(0)
    return export(_EncoderBlock().eval(), digits_dir / "encoder.onnx")


def _quantized_producers(path: str) -> set[str]:
    """The op types whose outputs were quantized (each feeds a QuantizeLinear), static Q/DQ."""
    model = onnx.load(path)
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    return {
        producer.get(n.input[0], "graph input")
        for n in model.graph.node
        if n.op_type == "QuantizeLinear"
    }


@pytest.mark.parametrize(("op_types", "attention_float"), [(None, True), (["*"], False)])
def test_int8_quantizes_only_the_weight_ops_of_a_transformer_by_default(
    encoder_onnx: Path, make_ctx: MakeCtx, op_types: list[str] | None, attention_float: bool
) -> None:
    ctx = make_ctx(encoder_onnx)
    settings: dict[str, Any] = {"mode": "int8_static", "calibration_dataset_id": 1}
    if op_types is not None:
        settings["op_types"] = op_types
    result = Quantize().run(ctx, STAGE, settings, noop)
    assert (
        result.metrics.get("quantized_ops.MatMul", 0) + result.metrics.get("quantized_ops.Gemm", 0)
        >= 2
    ), result.metrics
    # Attention's softmax feeds an activation-by-activation MatMul: by default that one stays
    # float, so its input (the softmax's output) is never quantized.
    producers = _quantized_producers(ctx.current_artifact.path)
    assert ("Softmax" not in producers) is attention_float, producers


def test_pre_processing_never_writes_into_the_working_directory(tmp_path, monkeypatch):
    """onnxruntime's symbolic shape inference, when it cannot infer every shape, saves
    ``sym_shape_infer_temp.onnx`` in the working directory: the worker's, the project root.
    Pre-processing runs inside the job's scratch folder."""
    import torch

    from pipelines.quantization.int8 import preprocess

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(
        model.eval(),
        (torch.randn(2, 8),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}},
        dynamo=False,
    )
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.chdir(cwd)
    # Make the inference give up on any model, as it does on some real exports.
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    infer = SymbolicShapeInference._infer_impl

    def incomplete(self, *args, **kwargs):
        infer(self, *args, **kwargs)
        return False

    monkeypatch.setattr(SymbolicShapeInference, "_infer_impl", incomplete)
    source = Artifact(
        key="input", path=str(path), format="onnx", precision="fp32", inputs=[], outputs=[]
    )

    assert preprocess(source, scratch, external=False) is not None  # done without it

    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("mode", ["int8_dynamic", "int8_static"])
def test_a_model_with_external_data_quantizes_from_any_working_directory(
    tmp_path, monkeypatch, mode
):
    """onnx refuses to write ``<output>.data`` when a file of that name exists in the working
    directory (it checks there, not beside the model): a user who ran it where torch had
    exported ``model.onnx`` and ``model.onnx.data`` got "External data file exists"."""
    import onnx

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    single = export(model.eval(), tmp_path / "single.onnx")
    folder = tmp_path / "exported"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save_model(
        onnx.load(str(single)),
        str(path),
        save_as_external_data=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    monkeypatch.chdir(folder)  # where the user exported it: model.onnx.data is here
    inputs, outputs = read_tensor_specs(path)
    source = Artifact(
        key="input", path=str(path), format="onnx", precision="fp32", inputs=inputs,
        outputs=outputs,
    )  # fmt: skip
    rows = tmp_path / "rows.npz"
    np.savez(rows, input=np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    work = tmp_path / "work"
    work.mkdir()
    ctx = PipelineContext.start(
        work, source, task="embedding",
        datasets={"1": DatasetRef(id="1", path=str(rows), format="npz")},
    )  # fmt: skip
    settings = {"mode": mode, "keep_below_threshold": True}
    if mode == "int8_static":
        settings["calibration_dataset_id"] = 1

    result = Quantize().run(ctx, "01-quantize", settings, noop)

    assert result.outputs == ["01-quantize"], result.message
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model.onnx.data"]
