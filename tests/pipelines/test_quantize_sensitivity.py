"""quantize's sensitivity search: the weight node whose int8 error is worst is kept in float.

The models are built here, tiny and with one deliberately sensitive node, so the search's choice
is known in advance and every test runs in seconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.core import Artifact, DatasetRef, PipelineContext
from pipelines.onnx_io import read_tensor_specs
from pipelines.quantization.sensitivity import excluded_cap, rank_nodes, search
from pipelines.stages import Quantize

from .test_quantize import export, noop

STAGE = "01-quantize"


@pytest.fixture(scope="module")
def outlier_column_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 -> 32 -> 32 -> 8 linear layers; the middle weight has one input column 1000x the
    others, and the unit that column reads is made 1000x smaller, so the function is the same.
    Int8 weights share their range with that column (per channel too: every output channel
    has one entry of it), so the other weights round to almost nothing: one node ruins it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 8)
    ).eval()
    with torch.no_grad():
        model[0].weight[0] /= 1000.0
        model[0].bias[0] /= 1000.0
        model[1].weight[:, 0] *= 1000.0
    return export(model, tmp_path_factory.mktemp("sensitive") / "outlier_column.onnx")


def embedding_ctx(tmp_path: Path, model: Path) -> PipelineContext:
    """An embedding task (judged on cosine to the parent), random rows as dataset "1"."""
    rows = tmp_path / "rows.npz"
    rng = np.random.default_rng(0)
    np.savez(rows, input=rng.standard_normal((200, 64)).astype(np.float32))
    inputs, outputs = read_tensor_specs(model)
    source = Artifact(
        key="input", path=str(model), format="onnx", precision="fp32", inputs=inputs,
        outputs=outputs,
    )  # fmt: skip
    datasets = {"1": DatasetRef(id="1", path=str(rows), format="npz")}
    work = tmp_path / "work"
    work.mkdir()
    return PipelineContext.start(work, source, task="embedding", datasets=datasets)


def _gemms(model: Path) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(model)).graph.node if n.op_type == "Gemm"]


def test_the_ranking_puts_the_node_with_the_outlier_column_first(
    outlier_column_onnx: Path,
) -> None:
    names = _gemms(outlier_column_onnx)
    feeds = {"input": np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)}
    ranked = rank_nodes(outlier_column_onnx, names, feeds, "dynamic", False, False)
    assert [r.name for r in ranked][0] == names[1]
    assert ranked[0].error > 5 * ranked[1].error, ranked


def test_the_search_keeps_the_sensitive_node_in_float_and_records_it(
    outlier_column_onnx: Path, tmp_path: Path
) -> None:
    """An embedding's dataset rows without targets: judged on them by the least per-row cosine
    (not a mean, which hides the rows int8 breaks), and the search holds min_cosine."""
    ctx = embedding_ctx(tmp_path, outlier_column_onnx)
    settings = {
        "mode": "int8_dynamic", "eval_dataset_id": 1, "max_excluded_fraction": 0.5,
        "min_cosine": 0.8,
    }  # fmt: skip
    result = Quantize().run(ctx, STAGE, settings, noop)

    sensitive = _gemms(outlier_column_onnx)[1]
    assert result.outputs == [STAGE] and ctx.current == STAGE, result.message
    judgement = ctx.current_artifact.meta["judgement"]
    assert judgement["judged_on"] == "dataset 1 (validation)" and judgement["metric"] == "cosine"
    assert judgement["value"] >= 0.8
    record = ctx.current_artifact.meta["sensitivity_search"]
    assert record["excluded_nodes"] == [sensitive]
    assert record["passed"] is True
    assert record["score_before"] < 0.5 and record["score_after"] >= 0.8
    assert record["steps"] == [{"excluded": 1, "score": record["score_after"]}]
    assert f"sensitivity search kept 1 of 3 weight nodes in float ({sensitive})" in result.message
    # The other two are still int8.
    assert result.metrics["quantized_nodes"] >= 2


def test_with_the_search_off_the_model_is_refused_as_before(
    outlier_column_onnx: Path, tmp_path: Path
) -> None:
    ctx = embedding_ctx(tmp_path, outlier_column_onnx)
    settings = {"mode": "int8_dynamic", "eval_dataset_id": 1, "sensitivity_search": False}
    result = Quantize().run(ctx, STAGE, settings, noop)

    assert result.outputs == [] and ctx.current == "input"
    assert result.message.startswith("not kept: min cosine"), result.message
    assert "sensitivity search" not in result.message


def test_the_search_grows_then_bisects_to_the_fewest_nodes_that_hold() -> None:
    made: list[int] = []

    def make(excluded: list[str]) -> Path:
        made.append(len(excluded))
        return Path(f"candidate-{len(excluded)}")

    def score(path: Path) -> float:  # holds once 3 or more nodes are kept in float
        return 0.995 if int(path.name.split("-")[1]) >= 3 else 0.9

    ranked = [f"n{i}" for i in range(10)]
    result = search(ranked, make, score, 0.99, cap=8)
    assert made == [1, 2, 4, 3]
    assert result.passed and result.excluded == ["n0", "n1", "n2"]

    capped = search(ranked, make, score, 0.99, cap=2)
    assert not capped.passed and len(capped.excluded) <= 2


def test_the_cap_never_keeps_every_node_in_float() -> None:
    assert excluded_cap(2, 1.0) == 1
    assert excluded_cap(24, 0.25) == 6
    assert excluded_cap(3, 0.1) == 1
    assert excluded_cap(0, 0.5) == 0


def test_with_no_dataset_the_search_holds_the_min_cosine_on_generated_inputs(
    outlier_column_onnx: Path, tmp_path: Path
) -> None:
    """No dataset named: the model is judged on generated inputs by its minimum per-row cosine
    to the parent, and the search keeps the node that breaks it in float until min_cosine holds."""
    ctx = embedding_ctx(tmp_path, outlier_column_onnx)
    # The minimum over 128 random rows of a random model is a harsh measure: 0.8 here.
    settings = {"mode": "int8_dynamic", "max_excluded_fraction": 0.5, "min_cosine": 0.8}
    result = Quantize().run(ctx, STAGE, settings, noop)

    sensitive = _gemms(outlier_column_onnx)[1]
    assert result.outputs == [STAGE] and ctx.current == STAGE, result.message
    judgement = ctx.current_artifact.meta["judgement"]
    assert judgement["judged_on"] == "generated" and judgement["metric"] == "cosine"
    assert judgement["value"] >= 0.8
    record = ctx.current_artifact.meta["sensitivity_search"]
    assert record["excluded_nodes"] == [sensitive] and record["passed"] is True
    assert record["score_before"] < 0.8 <= record["score_after"]


def test_with_no_dataset_and_the_search_off_the_model_is_not_kept(
    outlier_column_onnx: Path, tmp_path: Path
) -> None:
    ctx = embedding_ctx(tmp_path, outlier_column_onnx)
    settings = {"mode": "int8_dynamic", "sensitivity_search": False}
    result = Quantize().run(ctx, STAGE, settings, noop)

    assert result.outputs == [] and ctx.current == "input"
    assert result.message.startswith("not kept: min cosine"), result.message
