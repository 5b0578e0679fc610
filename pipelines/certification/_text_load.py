"""A language model under concurrent streaming load through the platform's serving process: the
API success rate (the basic criterion) and output tokens/s per card (the performance criterion).

The load runs once (``stream_requests`` streamed completions, ``stream_concurrency`` at once,
``stream_max_tokens`` each, the golden prompts as text, temperature 0) from a client process
(:mod:`.text_load_client`) against the serving process the suite keeps up (same app, loader and
engine as ``manage.py serve``, on loopback). Two checks judge it:

* **api_success**: streams that succeeded (a 200 and a well-formed stream ending in ``[DONE]``)
  >= ``min_success_rate`` (99.9%), and decode failures (an error event, a stream cut off,
  invalid UTF-8, no finish_reason) < ``max_decode_failure_rate`` (0.1%) of the streams.
* **qps** (for a language model, output tokens/s per card): every successful stream's completion
  tokens over the run's wall time, divided by the profile's cards (a GPU; a CPU socket) >=
  ``min_output_tokens_per_card``; TTFT p99 <= ``ttft_p99_budget_ms``; the p99 of the streams'
  time per output token <= ``tpot_budget_ms``; failed streams <= ``max_error_rate``; the
  process's peak RSS during the load (the serving engine runs in it) <= ``max_memory_fraction``
  of the device's memory.

Both are NOT_RUN where no serving process is registered (``python -m pipelines``).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.certification._checks import SERVING_NOT_RUN
from pipelines.certification._load_checks import _run_client
from pipelines.certification._state import CheckRecord, NotRun
from pipelines.certification._text_state import TextSuiteState
from pipelines.certification.profiles import cards_of
from pipelines.core import PipelineError
from pipelines.latency import peak_rss_mb, reset_peak_rss

__all__ = ["check_stream_qps", "check_stream_success", "percentiles_ms"]

CLIENT = "pipelines.certification.text_load_client"
MAX_FAILURES_LISTED = 20


def percentiles_ms(values: list[float], prefix: str) -> dict[str, float]:
    """p50, p90, p99 and max of ``values`` (seconds) in ms, keyed ``<prefix>_p50_ms`` etc."""
    if not values:
        return {}
    ms = np.asarray(values, dtype=np.float64) * 1000.0
    found = {f"{prefix}_p{q}_ms": round(float(np.percentile(ms, q)), 3) for q in (50, 90, 99)}
    found[f"{prefix}_max_ms"] = round(float(ms.max()), 3)
    return found


def _load(s: TextSuiteState) -> dict[str, Any]:
    """The streaming load's result, run on first use (PipelineError when it could not run)."""
    if s.load is not None:
        return s.load
    if s.load_error:
        raise PipelineError(f"the streaming load did not run: {s.load_error}")
    try:
        endpoint = s.endpoint()
        if endpoint is None:
            raise NotRun(SERVING_NOT_RUN)
        settings = s.settings
        folder = Path(s.ctx.workdir) / "certify-load" / "streaming"
        folder.mkdir(parents=True, exist_ok=True)
        plan = {
            "base_url": endpoint.base_url,
            "model": endpoint.model,
            "headers": endpoint.headers,
            "prompts": s.prompt_texts(),
            "requests": settings.stream_requests,
            "concurrency": settings.stream_concurrency,
            "max_tokens": settings.stream_max_tokens,
        }
        reset_peak_rss()
        result = _run_client(s, folder, plan, "streaming load", module=CLIENT)
        result["peak_memory_mb"] = peak_rss_mb() or 0.0
        result["runtime"] = endpoint.runtime
    except (PipelineError, RuntimeError) as exc:
        s.load_error = str(exc)
        raise PipelineError(str(exc)) from None
    s.load = result
    s.thresholds.update(
        stream_requests=s.settings.stream_requests,
        stream_concurrency=s.settings.stream_concurrency,
        stream_max_tokens=s.settings.stream_max_tokens,
    )
    return result


def _failures(outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    failed = [o for o in outcomes if o["cause"]]
    by_cause = Counter(o["cause"].split(": ")[0] for o in failed)
    listed = [
        {"payload": f"prompt {o['prompt']}", "status": o["status"], "cause": o["cause"]}
        for o in failed[:MAX_FAILURES_LISTED]
    ]
    return {"by_cause": dict(by_cause.most_common()), "first": listed}


def _latency(outcomes: list[dict[str, Any]]) -> dict[str, float]:
    """TTFT, time per output token and end-to-end percentiles of the successful streams."""
    ok = [o for o in outcomes if not o["cause"]]
    return {
        **percentiles_ms([o["ttft"] for o in ok if o["ttft"] is not None], "ttft"),
        **percentiles_ms([o["tpot"] for o in ok if o["tpot"] is not None], "tpot"),
        **percentiles_ms([o["seconds"] for o in ok], "e2e"),
    }


def check_stream_success(s: TextSuiteState, c: CheckRecord) -> str:
    settings = s.settings
    result = _load(s)
    outcomes = result["outcomes"]
    total = len(outcomes)
    succeeded = sum(1 for o in outcomes if not o["cause"])
    decode_failures = sum(1 for o in outcomes if o["decode_failure"])
    rate = succeeded / total if total else 0.0
    failure_rate = decode_failures / total if total else 1.0
    latency = _latency(outcomes)
    c.measure("success_rate", round(rate, 6), settings.min_success_rate, ">=")
    c.measure("decode_failure_rate", round(failure_rate, 6), settings.max_decode_failure_rate, "<")
    c.measure("requests", total, settings.stream_requests, ">=")
    c.measure("failures", total - succeeded)
    c.measure("decode_failures", decode_failures)
    c.measure("concurrency", result["concurrency"])
    for name in ("ttft_p50_ms", "ttft_p99_ms"):
        if name in latency:
            c.measure(name, latency[name], unit="ms")
    finishes = Counter(str(o["finish_reason"]) for o in outcomes if not o["cause"])
    c.details.update(
        runtime=result["runtime"],
        failures=_failures(outcomes),
        latency=latency,
        finish_reasons=dict(finishes),
        match_rule=(
            "a 200 whose server-sent events are JSON, end in [DONE], carry a finish_reason and "
            "valid UTF-8 text without U+FFFD"
        ),
        seconds=round(result["wall_seconds"], 3),
    )
    s.thresholds.update(
        min_success_rate=settings.min_success_rate,
        max_decode_failure_rate=settings.max_decode_failure_rate,
    )
    causes = c.details["failures"]["by_cause"]
    top = ", ".join(f"{n}x {cause}" for cause, n in list(causes.items())[:3])
    why = f"; failures: {top}" if causes else ""
    return (
        f"{succeeded}/{total} streamed completions succeeded ({rate:.2%}, needs "
        f"{settings.min_success_rate:.1%}), {decode_failures} decode failure(s) ({failure_rate:.2%}"
        f", must stay under {settings.max_decode_failure_rate:.1%}) at concurrency "
        f"{result['concurrency']}; TTFT p99 {latency.get('ttft_p99_ms', 0):.4g} ms{why}"
    )


def check_stream_qps(s: TextSuiteState, c: CheckRecord) -> str:
    settings = s.settings
    result = _load(s)
    outcomes = result["outcomes"]
    wall = float(result["wall_seconds"])
    ok = [o for o in outcomes if not o["cause"]]
    tokens = sum(int(o["tokens"]) for o in ok)
    per_s = tokens / wall if wall > 0 else 0.0
    cards, card = cards_of(s.profile)
    latency = _latency(outcomes)
    error_rate = (len(outcomes) - len(ok)) / len(outcomes) if outcomes else 1.0
    peak = float(result.get("peak_memory_mb") or 0.0)
    limit = settings.max_memory_fraction * s.profile.total_memory_mb
    ttft_p99 = latency.get("ttft_p99_ms", math.inf)
    tpot_p99 = latency.get("tpot_p99_ms", math.inf)
    c.measure(
        "output_tokens_per_s_per_card",
        round(per_s / cards, 2),
        settings.min_output_tokens_per_card,
        ">=",
        "tokens/s",
    )
    c.measure("ttft_p99_ms", ttft_p99, settings.ttft_p99_budget_ms, "<=", "ms")
    c.measure("tpot_p99_ms", tpot_p99, settings.tpot_budget_ms, "<=", "ms")
    c.measure("error_rate", round(error_rate, 6), settings.max_error_rate, "<=")
    if limit > 0:
        c.measure("peak_memory_mb", round(peak, 1), round(limit, 1), "<=", "MiB")
    else:
        c.measure("peak_memory_mb", round(peak, 1), unit="MiB")
    c.measure("output_tokens_per_s", round(per_s, 2), unit="tokens/s")
    c.measure("output_tokens", tokens, unit="tokens")
    c.measure("cards", cards, unit=card)
    c.measure("ttft_p50_ms", latency.get("ttft_p50_ms", 0.0), unit="ms")
    c.measure("tpot_p50_ms", latency.get("tpot_p50_ms", 0.0), unit="ms")
    c.measure("seconds", round(wall, 2), unit="s")
    c.details.update(
        runtime=result["runtime"],
        card=f"{cards} {card}" + ("s" if cards != 1 else ""),
        memory="process peak RSS (the serving engine runs in this process)",
        # The same streams as api_success's (whose "latency" the report shows once).
        stream_latency=latency,
        failures=_failures(outcomes),
        concurrency=result["concurrency"],
        criterion=(
            "output tokens/s per card, with the TTFT p99 and time-per-output-token budgets: a "
            "streamed generation has no fixed cost per request, so requests/s (QPS) says "
            "nothing about it"
        ),
    )
    s.thresholds.update(
        min_output_tokens_per_card=settings.min_output_tokens_per_card,
        ttft_p99_budget_ms=settings.ttft_p99_budget_ms,
        tpot_budget_ms=settings.tpot_budget_ms,
        max_error_rate=settings.max_error_rate,
        max_memory_mb=round(limit, 1) or None,
    )
    plural = "s" if cards != 1 else ""
    return (
        f"{per_s / cards:,.1f} output tokens/s per {card} (needs "
        f"{settings.min_output_tokens_per_card:g}; {per_s:,.1f} on {cards} {card}{plural}) over "
        f"{wall:.1f} s at concurrency {result['concurrency']}; TTFT p99 {ttft_p99:.4g} ms "
        f"(budget {settings.ttft_p99_budget_ms:g}), TPOT p99 {tpot_p99:.4g} ms (budget "
        f"{settings.tpot_budget_ms:g}), errors {error_rate:.2%}, peak RSS {peak:.0f} MiB"
    )
