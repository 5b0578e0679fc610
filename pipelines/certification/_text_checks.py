"""The text-generation checks that run the model itself (those through the serving process are in
``_text_serving`` and ``_text_load``); each records into a CheckRecord and returns its one-line
summary. See ``text_suite`` for what each measures and why.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines.certification._state import CheckRecord, NotRun
from pipelines.certification._text_state import FULL_PRECISIONS, TextSuiteState
from pipelines.core import ModelFormat, PipelineError
from pipelines.latency import peak_rss_mb, reset_peak_rss
from pipelines.llm.agreement import greedy_agreement

__all__ = [
    "PPL_WINDOW",
    "ROUNDTRIP_PROBES",
    "check_determinism",
    "check_finite",
    "check_loads",
    "check_parity",
    "check_performance",
    "check_tokenizer",
]

# Tokens per perplexity window (capped at the context), as evaluate measures it by default.
PPL_WINDOW = 512
# Texts every tokenizer of a served model must give back: non-ASCII letters, CJK, an emoji, a
# symbol, a newline and digits (byte-level BPE and byte-fallback sentencepiece both do).
ROUNDTRIP_PROBES = ("naïve café — 東京 😀 ∑x²", "line one\nline two: 42, 3.14")
LOAD_TOKENS = 8  # tokens the loads check generates
MAX_LISTED = 10


def check_loads(s: TextSuiteState, c: CheckRecord) -> str:
    from pipelines.llm.runtime import open_in_context

    started = time.perf_counter()
    s.model = model = open_in_context(s.ctx, s.artifact)
    seconds = time.perf_counter() - started
    c.measure("load_seconds", round(seconds, 4), unit="s")
    c.measure("device", model.device, s.profile.device_kind, "==")
    c.measure("context_length", model.context_length, 2, ">=", "tokens")
    prompt = s.prompts()[0]
    new = max(1, min(LOAD_TOKENS, model.context_length - len(prompt)))
    made = model.generate([prompt], new)[0]
    produced = len(made.tokens) + int(made.stopped_at_eos)
    c.measure("generated_tokens", produced, 1, ">=")
    c.details["threads"] = model.threads
    if model.device != s.profile.device_kind:
        c.problems.append(f"it runs on {model.device}, not {s.profile.device_kind}")
    ran = (
        f"loaded on {model.device} ({model.backend}) in {seconds:.2f} s; "
        f"context {model.context_length} tokens; {produced} token(s) generated from a golden "
        "prompt"
    )
    return f"{ran}, but: {'; '.join(c.problems)}" if c.problems else ran


def check_tokenizer(s: TextSuiteState, c: CheckRecord) -> str:
    model = s.loaded
    texts = [*s.golden.texts, *ROUNDTRIP_PROBES]
    failed: list[dict[str, str]] = []
    for text in texts:
        ids = model.encode(text)
        back = model.decode(ids)
        if back != text:
            failed.append({"text": text[:200], "got": back[:200]})
    rate = (len(texts) - len(failed)) / len(texts)
    threshold = s.settings.min_tokenizer_roundtrip
    c.measure("roundtrip_rate", round(rate, 6), threshold, ">=")
    c.measure("texts", len(texts))
    c.details["failed"] = failed[:MAX_LISTED]
    s.thresholds["min_tokenizer_roundtrip"] = threshold
    line = (
        f"{len(texts) - len(failed)}/{len(texts)} texts (golden and non-ASCII probes) came back "
        "unchanged from decode(encode(text))"
    )
    if failed:
        first = failed[0]
        line += f"; e.g. {first['text'][:40]!r} came back {first['got'][:40]!r}"
    return line


def _nonfinite(model: Any, ids: list[int]) -> int:
    """Values that are NaN or Inf in the logits of every position of ``ids`` (torch), or, on a
    runtime that does not give them out, 1 when the sequence's log-likelihood is not finite (any
    NaN or +Inf in a position's logits makes its log-softmax so)."""
    torch, net = getattr(model, "torch", None), getattr(model, "model", None)
    if torch is not None and net is not None:
        with torch.inference_mode():
            logits = net(input_ids=torch.tensor([ids]), use_cache=False).logits
            return int((~torch.isfinite(logits)).sum())
    nll, _ = model.negative_log_likelihood(ids)
    return 0 if math.isfinite(nll) else 1


def check_finite(s: TextSuiteState, c: CheckRecord) -> str:
    model = s.loaded
    sequences = [
        (p + g.tokens)[: model.context_length] for p, g in zip(s.prompts(), s.greedy(), strict=True)
    ]
    counts = [_nonfinite(model, ids) for ids in sequences]
    bad = sum(1 for n in counts if n)
    c.measure("nonfinite_values", sum(counts), 0, "==")
    c.measure("sequences_with_nonfinite", bad, 0, "==")
    c.details["what"] = (
        "logits" if getattr(model, "torch", None) is not None else "log-likelihood per sequence"
    )
    positions = sum(len(ids) for ids in sequences)
    where = (
        f"{len(sequences)} golden prompts and their greedy continuations ({positions} positions)"
    )
    if bad:
        return f"NaN or Inf in the logits of {bad}/{len(sequences)} of {where}"
    return f"finite logits over {where}"


def check_determinism(s: TextSuiteState, c: CheckRecord) -> str:
    prompts = s.prompts()
    first = [g.tokens for g in s.greedy()]
    again = [g.tokens for g in s.loaded.generate(prompts, s.new_tokens(prompts))]
    differing = [i for i, (a, b) in enumerate(zip(first, again, strict=True)) if a != b]
    c.measure("identical_sequences", len(prompts) - len(differing), len(prompts), "==")
    if differing:
        i = differing[0]
        pairs = enumerate(zip(first[i], again[i], strict=False))
        at = next((k for k, (x, y) in pairs if x != y), None)
        c.details["first_difference"] = {"prompt": i, "position": at}
        return (
            f"{len(differing)}/{len(prompts)} greedy continuations differed between two runs "
            f"(prompt {i} from token {at})"
        )
    tokens = sum(len(t) for t in first)
    return f"{len(prompts)} greedy continuations ({tokens} tokens) identical over two runs"


def check_parity(s: TextSuiteState, c: CheckRecord) -> str:
    from pipelines.llm.perplexity import measure_perplexity
    from pipelines.llm.runtime import open_in_context

    artifact, settings = s.artifact, s.settings
    if artifact.format == ModelFormat.LORA_ADAPTER.value:
        raise NotRun(
            "a LoRA adapter is trained to change its base's outputs, so parity with the base "
            "does not apply; the scenario level judges it on test cases against its base"
        )
    if s.reference is None:
        if artifact.precision in FULL_PRECISIONS:
            raise NotRun(
                f"{artifact.precision} with no full-precision ancestor: it is the reference itself"
            )
        c.problems.append("no full-precision ancestor")
        return (
            f"a {artifact.precision} model with no full-precision ancestor that runs here: "
            "nothing says its outputs are right"
        )
    model = s.loaded
    ids = [model.encode(text) for text in s.golden.texts]
    mine = measure_perplexity(
        model, ids, PPL_WINDOW, lambda f: s.progress(0.4 * f, f"perplexity {f:.0%}")
    )
    ours = [g.tokens for g in s.greedy()]
    s.progress(0.45, f"loading the reference {s.reference.key}")
    with open_in_context(s.ctx, s.reference) as reference:
        theirs = measure_perplexity(
            reference,
            ids,
            PPL_WINDOW,
            lambda f: s.progress(0.5 + 0.4 * f, f"reference perplexity {f:.0%}"),
        )
        prompts = s.prompts()
        ref_greedy = [g.tokens for g in reference.generate(prompts, s.new_tokens(prompts))]
    increase = mine.perplexity / theirs.perplexity - 1.0 if theirs.perplexity else math.inf
    share, prefix = greedy_agreement(ours, ref_greedy, settings.text_new_tokens)
    c.measure("perplexity", round(mine.perplexity, 6))
    c.measure("reference.perplexity", round(theirs.perplexity, 6))
    c.measure("ppl_increase", round(increase, 6), settings.max_ppl_increase, "<=")
    c.measure("greedy_agreement", round(share, 6), settings.min_greedy_agreement, ">=")
    c.measure("greedy_prefix_tokens", round(prefix, 3), unit="tokens")
    c.measure("tokens_scored", mine.tokens, unit="tokens")
    s.thresholds.update(
        max_ppl_increase=settings.max_ppl_increase,
        min_greedy_agreement=settings.min_greedy_agreement,
    )
    return (
        f"perplexity {mine.perplexity:.4g} vs {theirs.perplexity:.4g} for the "
        f"{s.reference.precision} reference "
        f"({increase:+.2%}, allowed +{settings.max_ppl_increase:.1%}) on {mine.tokens} golden "
        f"tokens; greedy tokens equal to the reference's {share:.1%} of the first "
        f"{settings.text_new_tokens} (needs {settings.min_greedy_agreement:.0%}; "
        f"{prefix:.1f} in a row on average)"
    )


def _p99_ms(values: Sequence[float]) -> float:
    return round(float(np.percentile(np.asarray(values) * 1000.0, 99)), 3) if values else math.inf


def check_performance(s: TextSuiteState, c: CheckRecord) -> str:
    """One stream at a time on the model itself: TTFT and time per output token, as the
    benchmark measures them (end of sequence ignored, so every prompt decodes in full)."""
    model, settings = s.loaded, s.settings
    prompts = s.prompts()
    new = s.new_tokens(prompts)
    model.generate([prompts[0]], min(2, new), stop_at_eos=False)  # warm-up
    reset_peak_rss()
    ttfts: list[float] = []
    tpots: list[float] = []
    for i, prompt in enumerate(prompts):
        made = model.generate([prompt], new, stop_at_eos=False)[0]
        ttfts.append(made.ttft_s)
        if made.tpot_s is not None:
            tpots.append(made.tpot_s)
        s.progress((i + 1) / len(prompts), f"stream {i + 1}/{len(prompts)}")
    peak = peak_rss_mb() or 0.0
    limit = settings.max_memory_fraction * s.profile.total_memory_mb
    ttft_p99, tpot_p99 = _p99_ms(ttfts), _p99_ms(tpots)
    mean_tpot = sum(tpots) / len(tpots) if tpots else math.inf
    c.measure("ttft_p99_ms", ttft_p99, settings.ttft_p99_budget_ms, "<=", "ms")
    c.measure("tpot_p99_ms", tpot_p99, settings.tpot_budget_ms, "<=", "ms")
    c.measure("decode_tokens_per_s", round(1.0 / mean_tpot, 2) if tpots else 0.0, unit="tokens/s")
    if limit > 0:
        c.measure("peak_memory_mb", round(peak, 1), round(limit, 1), "<=", "MiB")
    else:
        c.measure("peak_memory_mb", round(peak, 1), unit="MiB")
    c.measure("streams", len(prompts))
    c.measure("new_tokens", new, unit="tokens")
    c.details["memory"] = "process peak RSS"
    s.thresholds.update(
        ttft_p99_budget_ms=settings.ttft_p99_budget_ms,
        tpot_budget_ms=settings.tpot_budget_ms,
        max_memory_mb=round(limit, 1) or None,
    )
    return (
        f"{len(prompts)} streams of {new} tokens one at a time: TTFT p99 {ttft_p99:.4g} ms "
        f"(budget {settings.ttft_p99_budget_ms:g}), TPOT p99 {tpot_p99:.4g} ms (budget "
        f"{settings.tpot_budget_ms:g}), process peak RSS {peak:.0f} MiB"
    )


def check_scenario(s: TextSuiteState, c: CheckRecord) -> str:
    """The test cases of ``test_cases_dataset_id`` (all of them): each prompt continued greedily
    for ``text_new_tokens`` and checked; every ``must`` case passes, and the pass rate reaches
    ``scenario_min_pass_rate``, by default the reference's on the same cases (a LoRA adapter's
    base) scaled by ``min_retention``."""
    from pipelines.datasets.text_corpus import check_case, load_cases
    from pipelines.llm.runtime import open_in_context

    settings = s.settings
    if settings.test_cases_dataset_id is None:
        raise PipelineError("the scenario of a language model needs test_cases_dataset_id")
    ref = s.ctx.dataset(settings.test_cases_dataset_id, "certify test_cases_dataset_id")
    cases = load_cases(ref, "all")
    mine = _case_outputs(s, s.loaded, [case.prompt for case in cases])
    passed = [check_case(case, out) for case, out in zip(cases, mine, strict=True)]
    rate = sum(passed) / len(cases)
    threshold, source = settings.scenario_min_pass_rate, "scenario_min_pass_rate"
    if threshold is None:
        theirs_rate = rate
        if s.reference is not None:
            s.progress(0.5, f"the test cases on {s.reference.key}")
            with open_in_context(s.ctx, s.reference) as reference:
                theirs = _case_outputs(s, reference, [case.prompt for case in cases])
            theirs_rate = sum(check_case(k, o) for k, o in zip(cases, theirs, strict=True)) / len(
                cases
            )
            c.measure("reference.pass_rate", round(theirs_rate, 6))
        threshold = theirs_rate * settings.min_retention
        whose = (
            f"the {s.reference.precision} reference's"
            if s.reference is not None
            else "its own (the reference)"
        )
        source = f"{whose} {theirs_rate:.2%} x min_retention {settings.min_retention:g}"
    must = [p for case, p in zip(cases, passed, strict=True) if "must" in case.tags]
    failed = [(case, out) for case, out, p in zip(cases, mine, passed, strict=True) if not p]
    c.measure("pass_rate", round(rate, 6), round(threshold, 6), ">=")
    c.measure("must_passed", sum(must), len(must), ">=")
    c.measure("cases", len(cases))
    c.measure("cases_failed", len(failed))
    by_tag: dict[str, list[int]] = {}
    for case, p in zip(cases, passed, strict=True):
        for tag in case.tags:
            counts = by_tag.setdefault(tag, [0, 0])
            counts[0] += int(p)
            counts[1] += 1
    c.details["test_cases"] = {
        "dataset_id": settings.test_cases_dataset_id,
        "cases": len(cases),
        "by_tag": by_tag,
        "failed": [
            {"name": case.name, "check": case.check, "tags": list(case.tags),
             "got": {"text": out[:200]},
             "reason": f"{case.check} {case.expected[:80]!r} not met"}
            for case, out in failed[:50]
        ],
    }  # fmt: skip
    s.thresholds.update(scenario_min_pass_rate=threshold)
    musts = f", {sum(must)}/{len(must)} must" if must else ""
    return (
        f"{len(cases) - len(failed)}/{len(cases)} test cases passed ({rate:.2%}, needs "
        f"{threshold:.2%}: {source}){musts}"
    )


CASE_BATCH = 8  # test-case prompts decoded together


def _case_outputs(s: TextSuiteState, model: Any, prompts: list[str]) -> list[str]:
    """Each prompt continued greedily for ``text_new_tokens`` tokens, decoded; a prompt longer
    than the context keeps its end."""
    new = max(1, min(s.settings.text_new_tokens, model.context_length - 1))
    room = model.context_length - new
    ids = [(model.encode(p) or [model.pad_token_id])[-room:] for p in prompts]
    outputs: list[str] = []
    for start in range(0, len(ids), CASE_BATCH):
        for made in model.generate(ids[start : start + CASE_BATCH], new):
            outputs.append(model.decode(made.tokens))
    return outputs
