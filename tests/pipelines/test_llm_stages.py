"""quantize, evaluate and benchmark for language models, on a tiny random Llama.

One int8 ONNX Runtime GenAI build is shared by the evaluate and benchmark tests (the quantize
stage runs once per module); the int4 build is judged NOT KEPT. Every model runs on one thread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from pipelines.core import (
    Artifact,
    DatasetRef,
    PipelineContext,
    PipelineError,
    StageResult,
    StageStatus,
)
from pipelines.llm.agreement import greedy_agreement as agreement
from pipelines.llm.runtime import open_text_model
from pipelines.stages.llm_benchmark import LlmBenchmark
from pipelines.stages.llm_evaluate import LlmEvaluate
from pipelines.stages.llm_quantize import MODEL_DIR, LlmQuantize
from tests.llm_fixtures import CORPUS, tiny_gpt2, tiny_llama

TEXTS = "7"
CASES = "8"
ALL_TEST = {"train": 0.0, "validation": 0.0, "test": 1.0, "seed": 0}
QUICK_BENCH: dict[str, Any] = {
    "prompt_lengths": [8, 500],
    "concurrency": [1, 4],
    "new_tokens": 6,
    "warmup": 1,
    "iterations": 2,
    "min_seconds": 0.02,
    "max_windows": 3,
    "agreement": 1.0,
    "threads": 1,
}


class Progress:
    """Records the progress lines a stage reports."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []

    def __call__(self, fraction: float, message: str) -> None:
        assert 0.0 <= fraction <= 1.0 + 1e-9
        self.lines.append((fraction, message))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm-stages")


@pytest.fixture(scope="module")
def llama(root: Path) -> Path:
    return tiny_llama(root / "llama")


@pytest.fixture(scope="module")
def cases_file(root: Path, llama: Path) -> Path:
    """Two test cases: one whose expected text is the checkpoint's own greedy output (it passes
    for the checkpoint), one that nothing passes."""
    with open_text_model(_source(llama), threads=1) as model:
        prompt = "the quick brown fox"
        made = model.generate([model.encode(prompt)], 8)[0]
        expected = model.decode(made.tokens)
    rows = [
        {"prompt": prompt, "expected": expected, "check": "exact", "tags": ["echo"]},
        {"prompt": "0 1 2 3", "expected": "zzz never", "check": "contains"},
    ]
    path = root / "cases.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _source(folder: Path) -> Artifact:
    return Artifact(
        key="input",
        path=str(folder),
        format="hf_checkpoint",
        precision="fp32",
        inputs=[],
        outputs=[],
    )


def _ctx(root: Path, name: str, folder: Path, datasets: dict[str, DatasetRef] | None = None):
    workdir = root / name
    workdir.mkdir()
    return PipelineContext.start(
        workdir, _source(folder), task="text-generation", datasets=datasets or {}
    )


@pytest.fixture(scope="module")
def texts_ref(root: Path) -> DatasetRef:
    path = root / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    return DatasetRef(id=TEXTS, path=str(path), format="jsonl", splits=dict(ALL_TEST))


@pytest.fixture(scope="module")
def int8_run(root: Path, llama: Path) -> tuple[PipelineContext, StageResult, Progress]:
    ctx = _ctx(root, "int8", llama)
    progress = Progress()
    result = LlmQuantize().run(ctx, "01-quantize", {"threads": 1}, progress)
    return ctx, result, progress


def test_int8_makes_a_loadable_ort_genai_version_held_to_perplexity(
    int8_run: tuple[PipelineContext, StageResult, Progress],
) -> None:
    ctx, result, progress = int8_run
    assert result.status == StageStatus.SUCCEEDED, result.message
    assert ctx.current == "01-quantize" and result.outputs == ["01-quantize"]
    made = ctx.current_artifact
    assert (made.format, made.precision, made.parent) == ("ort_genai", "int8", "input")
    folder = Path(made.path)
    assert folder == ctx.workdir / "01-quantize" / MODEL_DIR
    assert (folder / "genai_config.json").is_file() and (folder / "model.onnx").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".partial")]
    m = result.metrics
    assert m["perplexity"] > 1 and m["parent_perplexity"] > 1
    assert m["ppl_increase"] == pytest.approx(m["perplexity"] / m["parent_perplexity"] - 1)
    assert abs(m["ppl_increase"]) < 0.02 and m["ppl_tokens"] > 50
    assert made.metrics == m
    assert made.meta["settings"]["precision"] == "int8"
    # Under INT8 the LM head is quantized with the body by default (keep_lm_head: int4 only).
    assert not any(o.startswith("nodes_to_exclude") for o in made.meta["builder_options"])
    assert made.meta["perplexity"]["dataset_id"] is None
    assert "built-in English sample" in result.message and "int8" in result.message
    assert any(line.startswith("model builder:") for _, line in progress.lines)
    with open_text_model(made, threads=1) as model:
        assert model.generate([model.encode("the quick")], 4)[0].ttft_s > 0


def test_a_rise_over_max_ppl_increase_is_not_kept(root: Path, llama: Path) -> None:
    ctx = _ctx(root, "int4", llama)
    settings = {"precision": "int4", "max_ppl_increase": -1, "block_size": 16, "threads": 1}
    result = LlmQuantize().run(ctx, "01-quantize", settings, Progress())
    assert result.status == StageStatus.NOT_KEPT
    assert result.message.startswith("not kept: perplexity")
    assert result.details["parent"] == "input" and result.details["settings"]["block_size"] == 16
    assert result.outputs == [] and ctx.current == "input" and list(ctx.artifacts) == ["input"]
    assert not (ctx.workdir / "01-quantize" / MODEL_DIR).exists()
    assert {"perplexity", "parent_perplexity", "ppl_increase"} <= set(result.metrics)


def test_fp16_on_a_dataset_stays_a_checkpoint(
    root: Path, llama: Path, texts_ref: DatasetRef
) -> None:
    ctx = _ctx(root, "fp16", llama, {TEXTS: texts_ref})
    settings = {"precision": "fp16", "dataset_id": int(TEXTS), "threads": 1}
    result = LlmQuantize().run(ctx, "01-quantize", settings, Progress())
    assert result.status == StageStatus.SUCCEEDED, result.message
    made = ctx.current_artifact
    assert (made.format, made.precision) == ("hf_checkpoint", "fp16")
    assert json.loads((Path(made.path) / "config.json").read_text())["dtype"] == "float16"
    assert (Path(made.path) / "tokenizer.json").is_file()
    assert f"{len(CORPUS)} texts of the test split of dataset {TEXTS}" in result.message
    assert made.meta["perplexity"]["dataset_id"] == int(TEXTS)
    assert abs(result.metrics["ppl_increase"]) < 0.02


def test_quantize_refuses_bad_settings_and_models(root: Path, llama: Path) -> None:
    ctx = _ctx(root, "bad", llama)
    stage = LlmQuantize()
    for bad in ({"precision": "int2"}, {"block_size": 33}, {"method": "gptq"}, {"typo": 1}):
        with pytest.raises(ValidationError):
            stage.run(ctx, "01-q", bad, Progress())
    with pytest.raises(PipelineError, match="dataset 99"):
        stage.run(ctx, "01-q", {"dataset_id": 99}, Progress())
    gpt2 = _ctx(root, "gpt2-work", tiny_gpt2(root / "gpt2"))
    with pytest.raises(PipelineError, match="does not convert GPT2LMHeadModel.*bf16 or fp16"):
        stage.run(gpt2, "01-q", {"precision": "int4"}, Progress())
    ctx.current_artifact.precision = "bf16"
    with pytest.raises(PipelineError, match="already bf16"):
        stage.run(ctx, "01-q", {"precision": "bf16"}, Progress())
    ctx.current_artifact.format = "ort_genai"
    with pytest.raises(PipelineError, match="needs a hf_checkpoint"):
        stage.run(ctx, "01-q", {}, Progress())
    assert LlmQuantize.precision_for(None, "int8")[1] is not None
    assert LlmQuantize.precision_for(None, "fp32") == ("int8", None)
    assert LlmQuantize.produces_for(LlmQuantize.Settings(precision="bf16")) == "hf_checkpoint"
    assert list((root / "bad").iterdir()) == []  # refused before anything was written


def test_evaluate_measures_the_version_beside_its_parent(
    int8_run: tuple[PipelineContext, StageResult, Progress],
    texts_ref: DatasetRef,
    cases_file: Path,
) -> None:
    ctx, _, _ = int8_run
    ctx.datasets[TEXTS] = texts_ref
    ctx.datasets[CASES] = DatasetRef(
        id=CASES, path=str(cases_file), format="jsonl", splits=dict(ALL_TEST)
    )
    settings = {
        "dataset_id": int(TEXTS),
        "test_cases_dataset_id": int(CASES),
        "max_new_tokens": 8,
        "agreement_prompts": 3,
        "agreement_tokens": 16,
        "threads": 1,
    }
    result = LlmEvaluate().run(ctx, "02-evaluate", settings, Progress())
    m = result.metrics
    assert m["parent_test_case_accuracy"] == 0.5 and m["parent_test_case_accuracy.echo"] == 1.0
    assert 0.0 <= m["test_case_accuracy"] <= 0.5 and m["test_cases"] == 2
    assert m["perplexity"] > 1 and m["parent_perplexity"] > 1
    assert abs(m["ppl_increase"]) < 0.02
    assert 0.0 <= m["greedy_agreement"] <= 1.0 and m["agreement_prompts"] == 3
    assert 0.0 <= m["greedy_prefix_tokens"] <= 16
    assert ctx.current_artifact.metrics["greedy_agreement"] == m["greedy_agreement"]
    assert ctx.current_artifact.meta["evaluation"]["parent"] == "input"
    assert "parent" in result.message and "test cases" in result.message


def test_evaluate_without_a_parent_or_dataset(root: Path, llama: Path) -> None:
    ctx = _ctx(root, "alone", llama)
    result = LlmEvaluate().run(ctx, "01-evaluate", {"threads": 1}, Progress())
    assert result.metrics["perplexity"] > 1
    assert not any(k.startswith(("parent_", "greedy")) for k in result.metrics)
    assert "no parent model" in result.message and "built-in English sample" in result.message
    with pytest.raises(PipelineError, match="dataset 5"):
        LlmEvaluate().run(ctx, "01-evaluate", {"test_cases_dataset_id": 5}, Progress())


def test_agreement_counts_positions_and_prefixes() -> None:
    assert agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]], 4) == (0.75, 2.0)
    assert agreement([[1, 2]], [[1, 2, 3, 4]], 4) == (0.5, 2.0)  # stopped early: differs
    assert agreement([[1, 2, 3], [5]], [[1, 2, 3], [6]], 2) == (2 / 3, 1.0)
    assert agreement([], [], 4) == (1.0, 0.0)


def test_benchmark_times_the_version_and_its_parent_interleaved(
    int8_run: tuple[PipelineContext, StageResult, Progress],
) -> None:
    ctx, _, _ = int8_run
    progress = Progress()
    result = LlmBenchmark().run(ctx, "03-benchmark", QUICK_BENCH, progress)
    m = result.metrics
    for name in ("ttft_p50_ms", "ttft_p99_ms", "tpot_ms", "tokens_per_s.c1", "tokens_per_s.c4"):
        assert m[name] > 0 and m[f"parent.{name}"] > 0
    assert m["ttft_p50_ms"] == m["ttft_p50_ms.L8"] and "ttft_p50_ms.L127" in m
    assert m["ttft_p99_ms.L8"] >= m["ttft_p50_ms.L8"]
    # Ratios only between steady rows (see test_ratios_vs_the_parent_need_steady_rows).
    if rows_steady := all(r.converged for r in ctx.benchmarks if r.batch_size == 1):
        assert m["speedup_tokens_per_s_vs_parent"] == pytest.approx(
            m["tokens_per_s.c1"] / m["parent.tokens_per_s.c1"]
        )
    else:
        assert "no ratio vs the parent for unsteady tokens/s at c1" in result.message
    assert m["peak_rss_mb"] > 0 and m["model_rss_mb"] >= 0
    rows = {(r.artifact, r.batch_size): r for r in ctx.benchmarks}
    assert rows_steady == (rows[("input", 1)].converged and rows[("01-quantize", 1)].converged)
    assert set(rows) == {("01-quantize", 1), ("01-quantize", 4), ("input", 1), ("input", 4)}
    row = rows[("01-quantize", 4)]
    assert row.backend == "onnxruntime-genai" and rows[("input", 4)].backend == "torch"
    assert row.shapes == {"prompt": [4, 8], "output": [4, 6]}
    assert row.throughput == pytest.approx(m["tokens_per_s.c4"])
    assert 1 <= row.windows <= 3 and len(row.window_p50_ms) == row.windows
    assert "capped at the context of 128 tokens" in result.message
    assert "timed interleaved" in result.message
    assert progress.lines[-1][0] == pytest.approx(1.0)
    # A second run replaces the rows of the same model, backend and concurrency.
    LlmBenchmark().run(ctx, "03-benchmark", {**QUICK_BENCH, "compare_parent": False}, Progress())
    assert len(ctx.benchmarks) == 4


def test_ratios_vs_the_parent_need_steady_rows() -> None:
    from pipelines.stages.llm_benchmark import _metrics, _Target

    def target(key: str, rate: float, ttft: float, steady: bool) -> _Target:
        metrics = {"ttft_p50_ms.L8": ttft, "ttft_p99_ms.L8": 2 * ttft, "tpot_ms.c1": 1.0}
        metrics.update({"tokens_per_s.c1": rate, "tokens_per_s.c4": 3 * rate})
        metrics.update({"tpot_ms.c4": 2.0, "peak_rss_mb.c1": 10.0, "peak_rss_mb.c4": 12.0})
        found = _Target(Artifact(key, "", "ort_genai", "int8", [], []), None, 5.0, metrics)
        found.steady = {"L8": True, "c1": True, "c4": steady}
        return found

    notes: list[str] = []
    m = _metrics(
        [target("q", 300.0, 2.0, False), target("input", 100.0, 4.0, True)], [8], [1, 4], notes
    )
    assert m["speedup_tokens_per_s_vs_parent"] == m["speedup_tokens_per_s_vs_parent.c1"] == 3.0
    assert m["ttft_speedup_vs_parent.L8"] == 2.0 and m["ttft_p99_ms"] == 4.0
    assert m["peak_rss_mb"] == 12.0 and m["parent.tpot_ms"] == 1.0
    assert "speedup_tokens_per_s_vs_parent.c4" not in m
    assert notes == ["no ratio vs the parent for unsteady tokens/s at c4"]


def test_benchmark_refuses_bad_settings(root: Path, llama: Path) -> None:
    ctx = _ctx(root, "bench-bad", llama)
    for bad in ({"concurrency": [0]}, {"new_tokens": 1}, {"prompt_lengths": []}):
        with pytest.raises(ValidationError):
            LlmBenchmark().run(ctx, "01-b", bad, Progress())
    ctx.current_artifact.format = "onnx"
    with pytest.raises(PipelineError, match="benchmark needs"):
        LlmBenchmark().run(ctx, "01-b", {}, Progress())
