"""benchmark (text-generation): time to first token, time per output token, tokens/s and memory,
the current model and its parent measured interleaved in the same run.

Both models are loaded together and every measurement times them in round-robin windows
(:func:`pipelines.latency.measure_interleaved`, the order rotated each round) until each one's last
three windows agree: models timed one after the other on a busy worker do not compare, models
timed in alternating windows share the machine's mood, so their ratio holds.

* **TTFT** at each of ``prompt_lengths`` (default 32 and 128 tokens; capped at the context): one
  prompt, one greedy token: prefill plus the first token. p50 and p99 of the pooled windows.
* **Concurrency** ``c`` in ``concurrency`` (default 1, 4, 16): ``c`` prompts of the first prompt
  length decoded together for ``new_tokens`` tokens each (end of sequence ignored, so every call
  makes the same work): output tokens/s, and the time per output token (the median time from
  one token to the next inside the timed calls). One :class:`~pipelines.core.BenchmarkRow` per
  model and concurrency: batch_size = c, p50/p99 of the whole call, throughput = output
  tokens/s, shapes ``{"prompt": [c, L], "output": [c, new_tokens]}``.
* **Memory**: ``model_rss_mb`` the RSS growth of loading each model, ``peak_rss_mb`` the process's
  peak while a concurrency was timed (both models loaded).

Prompts are tokens of the built-in English sample, repeated to length, the same ids for both
models. A ratio against the parent (``speedup_tokens_per_s_vs_parent``, ``ttft_speedup_vs_parent``)
is reported only when both rows are steady; the message names the unsteady ones.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator

from pipelines.core import (
    Artifact,
    BenchmarkRow,
    ModelFormat,
    PipelineContext,
    PipelineError,
    ProgressFn,
    StageSettings,
)
from pipelines.latency import WindowSettings, peak_rss_mb, reset_peak_rss, rss_mb
from pipelines.stages.base import Stage, StageOutcome

__all__ = ["LlmBenchmark", "LlmBenchmarkSettings"]

Length = Annotated[int, Field(ge=1, le=1_048_576)]
Concurrency = Annotated[int, Field(ge=1, le=256)]


class LlmBenchmarkSettings(StageSettings):
    """Settings of benchmark for a language model."""

    prompt_lengths: list[Length] = Field(
        default_factory=lambda: [32, 128],
        min_length=1,
        max_length=8,
        description=(
            "Prompt lengths (tokens) whose time to first token is measured; the first is also "
            "the prompt length of the concurrency runs. Capped at the model's context."
        ),
    )
    concurrency: list[Concurrency] = Field(
        default_factory=lambda: [1, 4, 16],
        min_length=1,
        max_length=8,
        description="Prompts decoded together; output tokens/s is measured at each.",
    )
    new_tokens: int = Field(
        64, ge=2, le=4096, description="Tokens generated per prompt in the concurrency runs."
    )
    warmup: int = Field(1, ge=0, le=100, description="Untimed calls before timing each model.")
    iterations: int = Field(
        3, ge=1, le=1000, description="Timed calls per window (the last three windows pooled)."
    )
    min_seconds: float = Field(
        0.2,
        ge=0.0,
        le=600.0,
        description=(
            "Each window also lasts at least this long, so a fast call (a short prompt's first "
            "token) is sampled many times, a slow one at least iterations times."
        ),
    )
    agreement: float = Field(
        0.10,
        ge=0.0,
        le=1.0,
        description="Windows go on until the last three's p50 agree within this fraction.",
    )
    max_windows: int = Field(6, ge=1, le=100, description="Most windows per measurement.")
    compare_parent: bool = Field(
        True, description="Also measure the model it was made from, interleaved."
    )
    threads: int | None = Field(
        None, ge=1, le=512, description="CPU threads (default: the worker's engine threads)."
    )

    @field_validator("prompt_lengths", "concurrency")
    @classmethod
    def _unique(cls, value: list[int]) -> list[int]:
        return list(dict.fromkeys(value))

    def windows(self) -> WindowSettings:
        return WindowSettings(
            warmup=self.warmup,
            iterations=self.iterations,
            min_seconds=self.min_seconds,
            agreement=self.agreement,
            max_windows=self.max_windows,
        )


@dataclass
class _Target:
    """One loaded model and the numbers measured on it."""

    artifact: Artifact
    model: Any
    model_rss: float
    metrics: dict[str, float] = field(default_factory=dict)
    steady: dict[str, bool] = field(default_factory=dict)


def _prompt_ids(model: Any, length: int, count: int) -> list[list[int]]:
    """``count`` different prompts of ``length`` tokens, cut from the built-in sample."""
    from pipelines.llm.perplexity import BUILTIN_SAMPLE

    ids = model.encode(" ".join(BUILTIN_SAMPLE))
    if not ids:
        raise PipelineError("the model's tokenizer encodes the sample text to no tokens")
    need = length + count
    stream = (ids * (need // len(ids) + 1))[:need]
    return [stream[i : i + length] for i in range(count)]


def _shapes(s: LlmBenchmarkSettings, context: int) -> tuple[list[int], int, int, list[str]]:
    """(TTFT prompt lengths, concurrency prompt length, new tokens, notes), within ``context``."""
    notes = []
    ttft = list(dict.fromkeys(min(n, context - 1) for n in s.prompt_lengths))
    if ttft != s.prompt_lengths:
        notes.append(f"prompt lengths capped at the context of {context} tokens: {ttft}")
    new = min(s.new_tokens, context // 2)
    length = min(s.prompt_lengths[0], context - new)
    if (new, length) != (s.new_tokens, s.prompt_lengths[0]):
        notes.append(f"concurrency runs use {length}-token prompts and {new} new tokens")
    return ttft, length, new, notes


class LlmBenchmark(Stage[LlmBenchmarkSettings]):
    """TTFT, time per output token, tokens/s at several concurrencies and memory, vs the parent."""

    name: ClassVar[str] = "benchmark"
    description: ClassVar[str] = (
        "Measure a language model's time to first token (p50/p99) at stated prompt lengths, "
        "time per output token, output tokens/s at concurrency 1, 4 and 16 and peak memory, "
        "with the model it was made from timed interleaved in the same run."
    )
    Settings: ClassVar[type[StageSettings]] = LlmBenchmarkSettings
    accepts: ClassVar[tuple[str, ...]] = (
        ModelFormat.HF_CHECKPOINT.value,
        ModelFormat.ORT_GENAI.value,
        ModelFormat.LORA_ADAPTER.value,
    )
    produces: ClassVar[str | None] = None

    def _run(
        self, ctx: PipelineContext, stage_id: str, s: LlmBenchmarkSettings, progress: ProgressFn
    ) -> StageOutcome:
        from pipelines.llm.runtime import open_in_context, text_parent

        current = ctx.current_artifact
        parent = text_parent(ctx, current) if s.compare_parent else None
        chosen = [current] + ([parent] if parent is not None else [])
        targets: list[_Target] = []
        try:
            for artifact in chosen:
                progress(0.02 * len(targets), f"loading {artifact.key}")
                before = rss_mb()
                model = open_in_context(ctx, artifact, threads=s.threads)
                after = rss_mb()
                grown = after - before if before is not None and after is not None else 0.0
                targets.append(_Target(artifact, model, max(grown, 0.0)))
            context = min(t.model.context_length for t in targets)
            ttft_lengths, length, new, notes = _shapes(s, context)
            steps = len(ttft_lengths) + len(s.concurrency)
            done = 0
            for n in ttft_lengths:
                self._ttft(targets, n, s)
                done += 1
                progress(0.05 + 0.95 * done / steps, _said(targets, f"ttft_p50_ms.L{n}", "ms"))
            rows: list[BenchmarkRow] = []
            for c in s.concurrency:
                rows += self._throughput(targets, c, length, new, s)
                done += 1
                progress(0.05 + 0.95 * done / steps, _said(targets, f"tokens_per_s.c{c}", "tok/s"))
        finally:
            for target in targets:
                target.model.close()

        metrics = _metrics(targets, ttft_lengths, s.concurrency, notes)
        unsteady = sorted({f"{r.artifact} c{r.batch_size}" for r in rows if not r.converged})
        if unsteady:
            notes.append(
                f"not steady (windows disagreed by more than {s.agreement:.0%}): "
                + ", ".join(unsteady)
            )
        done_keys = {(r.artifact, r.backend, r.batch_size) for r in rows}
        ctx.benchmarks[:] = [
            r for r in ctx.benchmarks if (r.artifact, r.backend, r.batch_size) not in done_keys
        ] + rows
        message = _message(targets, metrics, ttft_lengths, s.concurrency, length, new)
        if notes:
            message += "; " + "; ".join(notes)
        return StageOutcome(metrics=metrics, message=message)

    @staticmethod
    def _ttft(targets: list[_Target], length: int, s: LlmBenchmarkSettings) -> None:
        """Time to first token at ``length``, every target timed together."""
        prompt = _prompt_ids(targets[0].model, length, 1)
        calls: dict[str, Callable[[], object]] = {}
        for target in targets:
            model = target.model
            calls[target.artifact.key] = (
                lambda m=model: m.generate(prompt, 1, stop_at_eos=False)  # type: ignore[misc]
            )
        stats = s.windows().measure_interleaved(calls)
        for target in targets:
            st = stats[target.artifact.key]
            target.metrics[f"ttft_p50_ms.L{length}"] = st.p50_ms
            target.metrics[f"ttft_p99_ms.L{length}"] = st.p99_ms
            target.steady[f"L{length}"] = st.converged

    @staticmethod
    def _throughput(
        targets: list[_Target], c: int, length: int, new: int, s: LlmBenchmarkSettings
    ) -> list[BenchmarkRow]:
        """``c`` prompts decoded together for ``new`` tokens, every target timed together."""
        prompts = _prompt_ids(targets[0].model, length, c)
        steps: dict[str, list[list[float]]] = {t.artifact.key: [] for t in targets}
        calls: dict[str, Callable[[], object]] = {}
        for target in targets:
            key, model = target.artifact.key, target.model

            def call(m: Any = model, times: list[list[float]] = steps[key]) -> object:
                made = m.generate(prompts, new, stop_at_eos=False)
                times.append(made[0].token_times_s)
                return made

            calls[key] = call
        reset_peak_rss()
        stats = s.windows().measure_interleaved(calls)
        peak = peak_rss_mb()
        rows = []
        for target in targets:
            key = target.artifact.key
            st = stats[key]
            tokens_per_s = st.throughput(c * new)
            # The warm-up calls come first: leave them out of the per-token times.
            timed = [t for call in steps[key][s.warmup :] or steps[key] for t in call]
            tpot = statistics.median(timed) * 1000.0 if timed else 0.0
            target.metrics[f"tokens_per_s.c{c}"] = tokens_per_s
            target.metrics[f"tpot_ms.c{c}"] = tpot
            target.metrics[f"peak_rss_mb.c{c}"] = peak or 0.0
            target.steady[f"c{c}"] = st.converged
            rows.append(
                BenchmarkRow(
                    artifact=key,
                    backend=target.model.backend,
                    batch_size=c,
                    p50_ms=st.p50_ms,
                    p95_ms=st.p95_ms,
                    p99_ms=st.p99_ms,
                    throughput=tokens_per_s,
                    iterations=st.iterations,
                    p90_ms=st.p90_ms,
                    windows=st.windows,
                    converged=st.converged,
                    peak_rss_mb=round(peak, 2) if peak is not None else 0.0,
                    model_rss_mb=round(target.model_rss, 2),
                    shapes={"prompt": [c, length], "output": [c, new]},
                    window_p50_ms=[round(v, 6) for v in st.window_p50_ms],
                    spread=round(st.spread, 4),
                )
            )
        return rows


def _said(targets: list[_Target], name: str, unit: str) -> str:
    return ", ".join(f"{t.artifact.key} {t.metrics.get(name, 0.0):.4g} {unit}" for t in targets)


def _metrics(
    targets: list[_Target], lengths: list[int], concurrency: list[int], notes: list[str]
) -> dict[str, float]:
    """The current model's numbers, the parent's under ``parent.``, and their ratios."""
    for target in targets:
        own = target.metrics
        own["ttft_p50_ms"] = own[f"ttft_p50_ms.L{lengths[0]}"]
        own["ttft_p99_ms"] = own[f"ttft_p99_ms.L{lengths[0]}"]
        own["tpot_ms"] = own[f"tpot_ms.c{concurrency[0]}"]
        own["peak_rss_mb"] = max(own[f"peak_rss_mb.c{c}"] for c in concurrency)
        own["model_rss_mb"] = target.model_rss
    current = targets[0]
    metrics = dict(current.metrics)
    if len(targets) < 2:
        return metrics
    parent = targets[1]
    metrics.update({f"parent.{k}": v for k, v in parent.metrics.items()})
    skipped = []
    for c in concurrency:
        if current.steady[f"c{c}"] and parent.steady[f"c{c}"]:
            ours, theirs = (
                current.metrics[f"tokens_per_s.c{c}"],
                parent.metrics[f"tokens_per_s.c{c}"],
            )
            if theirs > 0:
                metrics[f"speedup_tokens_per_s_vs_parent.c{c}"] = ours / theirs
        else:
            skipped.append(f"tokens/s at c{c}")
    for n in lengths:
        if current.steady[f"L{n}"] and parent.steady[f"L{n}"]:
            ours = current.metrics[f"ttft_p50_ms.L{n}"]
            if ours > 0:
                metrics[f"ttft_speedup_vs_parent.L{n}"] = parent.metrics[f"ttft_p50_ms.L{n}"] / ours
        else:
            skipped.append(f"TTFT at {n} tokens")
    first = f"speedup_tokens_per_s_vs_parent.c{concurrency[0]}"
    if first in metrics:
        metrics["speedup_tokens_per_s_vs_parent"] = metrics[first]
    if skipped:
        notes.append("no ratio vs the parent for unsteady " + ", ".join(skipped))
    return metrics


def _message(
    targets: list[_Target],
    metrics: dict[str, float],
    lengths: list[int],
    concurrency: list[int],
    length: int,
    new: int,
) -> str:
    current = targets[0].artifact.key
    ttft = ", ".join(f"{metrics[f'ttft_p50_ms.L{n}']:.3g} ms at {n}" for n in lengths)
    rates = ", ".join(f"{metrics[f'tokens_per_s.c{c}']:.4g} at c{c}" for c in concurrency)
    message = (
        f"{current}: TTFT p50 {ttft} tokens; {metrics['tpot_ms']:.3g} ms per output token; "
        f"output tokens/s {rates} ({length}-token prompts, {new} new tokens); peak RSS "
        f"{metrics['peak_rss_mb']:.0f} MiB"
    )
    if len(targets) > 1:
        parent = targets[1].artifact.key
        ratio = metrics.get("speedup_tokens_per_s_vs_parent")
        vs = f"x{ratio:.2f} the tokens/s of {parent}" if ratio is not None else f"vs {parent}"
        message += f"; {vs}, timed interleaved"
    else:
        message += "; no parent model to compare with"
    return message
