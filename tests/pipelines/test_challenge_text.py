"""Champion/challenger for language models: perplexity on a text split, or test-case accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.challenge import challenge
from pipelines.core import Artifact, DatasetRef, PipelineError
from pipelines.llm.perplexity import perplexity
from pipelines.llm.runtime import open_text_model
from tests.llm_fixtures import CORPUS as TEXTS
from tests.llm_fixtures import tiny_llama

ALL_TEST = {"train": 0.0, "validation": 0.0, "test": 1.0, "seed": 0}


def jsonl(path: Path, rows: list[dict]) -> DatasetRef:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DatasetRef(id=path.stem, path=str(path), format="jsonl", splits=dict(ALL_TEST))


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Artifact, Artifact]:
    root = tmp_path_factory.mktemp("challenge")
    a, b = tiny_llama(root / "a", seed=0), tiny_llama(root / "b", seed=1)
    return (
        Artifact("champion", str(a), "hf_checkpoint", "fp32", [], []),
        Artifact("challenger", str(b), "hf_checkpoint", "fp32", [], []),
    )


def test_language_models_are_judged_by_perplexity_on_a_text_split(models, tmp_path):
    champion, challenger = models
    texts = jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    result = challenge(champion, challenger, texts, "test", "text-generation")
    assert result.metric == "perplexity" and not result.higher_is_better
    assert result.rows == len(TEXTS)
    with open_text_model(champion, threads=1) as model:
        assert result.champion == pytest.approx(perplexity(model, TEXTS, 128), rel=1e-6)
    with open_text_model(challenger, threads=1) as model:
        assert result.challenger == pytest.approx(perplexity(model, TEXTS, 128), rel=1e-6)
    # The margin is relative: the share by which the challenger's perplexity is lower.
    gain = (result.champion - result.challenger) / result.champion
    assert result.improvement() == pytest.approx(gain)
    assert result.margin_won(gain - 1e-6) and not result.margin_won(gain + 1e-3)
    same = challenge(champion, champion, texts, "test", "text-generation")
    assert same.improvement() == 0.0 and same.margin_won(0.0) and not same.margin_won(0.01)


def test_on_test_cases_the_share_of_cases_passed_is_the_score(models, tmp_path):
    champion, challenger = models
    cases = jsonl(
        tmp_path / "cases.jsonl",
        [
            {"name": "any", "prompt": "the fox", "expected": ".*", "check": "regex"},
            {"name": "never", "prompt": "a b", "expected": "@@@@@@@@", "check": "contains"},
        ],
    )
    result = challenge(champion, challenger, cases, "test", "text-generation")
    assert result.metric == "test_case_accuracy" and result.higher_is_better
    assert (result.champion, result.challenger, result.rows) == (0.5, 0.5, 2)


def test_a_tensor_dataset_is_refused_for_a_language_model(models, tmp_path):
    rows = tmp_path / "rows.jsonl"
    ref = jsonl(rows, [{"x": [1.0, 2.0], "label": 1}])
    with pytest.raises(PipelineError, match="not a text dataset"):
        challenge(*models, ref, "test", "text-generation")
