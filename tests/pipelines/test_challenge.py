"""Champion/challenger scoring on real models and a real dataset (no server)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.challenge import challenge
from pipelines.core import DatasetRef, PipelineError
from pipelines.engines import predict


@pytest.fixture(scope="module")
def digits(digits_labelled_csv: Path) -> DatasetRef:
    return DatasetRef(id="7", path=str(digits_labelled_csv), format="csv", target="label")


def test_it_scores_a_trained_challenger_above_an_untrained_champion(
    trained_digits, onnx_mlp, digits
):
    # An untrained ONNX MLP serves; the TorchScript digits classifier challenges it.
    result = challenge(onnx_mlp.artifact, trained_digits.artifact, digits, "test", "classification")
    assert result.metric == "accuracy" and result.higher_is_better
    assert result.split == "test" and 150 <= result.rows <= 200  # a tenth of 1797 rows
    assert result.challenger > 0.9 and result.champion < 0.5
    assert result.margin_won(0.1)
    assert not result.margin_won(result.challenger - result.champion + 0.01)

    # The other way round the challenger loses, whatever the margin.
    reverse = challenge(
        trained_digits.artifact, onnx_mlp.artifact, digits, "test", "classification"
    )
    assert (reverse.champion, reverse.challenger) == (result.challenger, result.champion)
    assert not reverse.margin_won(0.0)


def test_an_error_metric_counts_lower_as_better(onnx_mlp, ts_mlp, tmp_path):
    # Regression targets are exactly the ONNX model's outputs: its mse is 0, the other's is not.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 64)).astype(np.float32)
    y = predict(onnx_mlp.artifact, {"x": x})
    path = tmp_path / "targets.npz"
    np.savez(path, x=x, y=y)
    ref = DatasetRef(id="8", path=str(path), format="npz", target="y")

    kept = challenge(onnx_mlp.artifact, ts_mlp.artifact, ref, "all", "regression")
    assert kept.metric == "mse" and not kept.higher_is_better
    assert kept.champion == pytest.approx(0.0, abs=1e-9) and kept.challenger > 0.01
    assert kept.improvement() < 0 and not kept.margin_won(0.0)

    won = challenge(ts_mlp.artifact, onnx_mlp.artifact, ref, "all", "regression")
    assert won.improvement() == pytest.approx(kept.challenger) and won.margin_won(0.01)


def test_it_refuses_a_dataset_without_labels(onnx_mlp, ts_mlp, tmp_path):
    path = tmp_path / "unlabelled.npz"
    np.savez(path, x=np.zeros((20, 64), dtype=np.float32))
    ref = DatasetRef(id="9", path=str(path), format="npz")
    with pytest.raises(PipelineError, match="no target column"):
        challenge(onnx_mlp.artifact, ts_mlp.artifact, ref, "all", "classification")


def test_it_refuses_an_empty_split(onnx_mlp, ts_mlp, digits):
    no_test = DatasetRef(
        id="7", path=digits.path, format="csv", target="label",
        splits={"train": 0.9, "validation": 0.1, "test": 0.0, "seed": 0},
    )  # fmt: skip
    with pytest.raises(PipelineError, match="dataset 7: its test split is empty"):
        challenge(onnx_mlp.artifact, ts_mlp.artifact, no_test, "test", "classification")
