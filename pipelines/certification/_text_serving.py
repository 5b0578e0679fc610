"""The text-generation checks of behaviour at the API: stops, the context length and the serving
contract. Each judges the model itself where it can and, where a serving process is registered,
the same behaviour through it (the OpenAI-compatible routes on loopback, requests one at a time,
so that greedy decoding through the server sees the same batch as the engine). See
``text_suite`` for what each measures.
"""

from __future__ import annotations

from typing import Any

from pipelines.certification._state import CheckRecord
from pipelines.certification._text_state import TextSuiteState
from pipelines.certification.text_load_client import connection, post_json, stream_completion
from pipelines.core import PipelineError

__all__ = [
    "check_context",
    "check_serving",
    "check_stops",
    "finish_consistent",
    "stop_honoured",
    "text_agreement",
]

PROBES = 4  # golden prompts the stop and serving probes use
CONTEXT_CODE = "context_length_exceeded"


def text_agreement(a: str, b: str) -> float:
    """The share of the longer text that the two share as a prefix (1.0 for two empty texts)."""
    width = max(len(a), len(b))
    if width == 0:
        return 1.0
    pairs = enumerate(zip(a, b, strict=False))
    same = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
    return same / width


def stop_honoured(full: str, stop: str, got: str, finish: str | None) -> bool:
    """Whether a completion asked to stop at ``stop`` gave the text before the first ``stop`` in
    the same request's continuation without it (``full``), and said it stopped."""
    at = full.find(stop)
    return at >= 0 and got == full[:at] and finish == "stop"


def finish_consistent(finish: str | None, tokens: int, max_tokens: int) -> bool:
    """Whether a completion's finish reason agrees with its length: "length" only once
    ``max_tokens`` were generated, "stop" (an end of sequence) never past them."""
    if finish == "length":
        return tokens == max_tokens
    return finish == "stop" and tokens <= max_tokens


def _stop_string(text: str) -> str | None:
    """A stop string taken from the middle of ``text`` (two characters, not blank), or None when
    the text is too short to probe with."""
    if len(text) < 4:
        return None
    middle = len(text) // 2
    for start in range(middle, len(text) - 1):
        candidate = text[start : start + 2]
        if candidate.strip():
            return candidate
    return None


def _body(s: TextSuiteState, prompt: Any, max_tokens: int, **extra: Any) -> dict[str, Any]:
    endpoint = s.endpoint()
    assert endpoint is not None
    return {"model": endpoint.model, "prompt": prompt, "max_tokens": max_tokens,
            "temperature": 0, **extra}  # fmt: skip


def check_stops(s: TextSuiteState, c: CheckRecord) -> str:
    model = s.loaded
    eos = sorted(model.eos_token_ids)
    c.measure("eos_declared", bool(eos), True, "==")
    hidden = all(model.decode([token]) == "" for token in eos)
    # transformers' tokenizers skip special tokens; ONNX Runtime GenAI's decode keeps them (its
    # streams stop before the EOS is decoded), so there it is recorded, not judged.
    judged = getattr(model, "torch", None) is not None
    if judged:
        c.measure("eos_not_in_text", hidden, True, "==")
    else:
        c.measure("eos_not_in_text", hidden)
    reached = sum(g.stopped_at_eos for g in s.greedy())
    c.measure("eos_reached_in_golden", reached)
    c.details["eos_token_ids"] = eos
    parts = [
        f"end of sequence {eos} declared" if eos else "no end-of-sequence token declared",
        f"reached by {reached}/{len(s.greedy())} golden continuations",
    ]
    if judged and not hidden:
        parts.append("the EOS token decodes to visible text")
    endpoint = s.endpoint()
    if endpoint is None:
        parts.append("stop strings not probed (no serving process here)")
        return "; ".join(parts)
    conn = connection(endpoint.base_url)
    prompts = s.prompts()[:PROBES]
    new = s.new_tokens(prompts)
    honoured = probed = consistent = 0
    probes: list[dict[str, Any]] = []
    finishes: list[dict[str, Any]] = []
    try:
        for ids in prompts:
            full = stream_completion(conn, endpoint.headers, _body(s, ids, new))
            if full.cause:
                raise PipelineError(f"a golden prompt's completion failed: {full.cause}")
            agrees = finish_consistent(full.finish_reason, full.tokens, new)
            consistent += agrees
            finishes.append({"finish_reason": full.finish_reason, "tokens": full.tokens,
                             "max_tokens": new, "ok": agrees})  # fmt: skip
            stop = _stop_string(full.text)
            if stop is None:
                continue
            got = stream_completion(conn, endpoint.headers, _body(s, ids, new, stop=[stop]))
            ok = not got.cause and stop_honoured(full.text, stop, got.text, got.finish_reason)
            probed += 1
            honoured += ok
            probes.append({"stop": stop, "expected": full.text[: full.text.find(stop)][:200],
                           "got": got.text[:200], "finish_reason": got.finish_reason,
                           "ok": ok})  # fmt: skip
    finally:
        conn.close()
    c.measure("finish_reasons_consistent", consistent, len(prompts), "==")
    c.measure("stop_strings_honoured", honoured, probed, "==")
    c.details["stop_probes"] = probes
    c.details["finishes"] = finishes
    parts.append(f"{honoured}/{probed} stop strings honoured through the serving process")
    parts.append(f"{consistent}/{len(prompts)} finish reasons consistent with max_tokens")
    if not probed:
        parts.append("no continuation long enough to take a stop string from")
    return "; ".join(parts)


def _long_prompt(s: TextSuiteState, length: int) -> list[int]:
    """``length`` token ids: the golden prompts' tokens repeated."""
    pool = [t for ids in s.prompts() for t in ids]
    return (pool * (length // len(pool) + 1))[:length]


def check_context(s: TextSuiteState, c: CheckRecord) -> str:
    model = s.loaded
    context = model.context_length
    over = _long_prompt(s, context)
    try:
        model.generate([over], 1)
        refused = False
    except PipelineError:
        refused = True
    c.measure("engine_refuses_over_context", refused, True, "==")
    c.measure("context_length", context, unit="tokens")
    parts = [f"context {context} tokens: a prompt of {context} + 1 new token is "
             + ("refused by the model" if refused else "NOT refused by the model")]  # fmt: skip
    endpoint = s.endpoint()
    if endpoint is None:
        parts.append("the serving process's limits not probed (none here)")
        return "; ".join(parts)
    short = s.prompts()[0][:8]
    room = context - len(short)
    conn = connection(endpoint.base_url)
    probes = {}
    try:
        for name, prompt, max_tokens in (
            ("prompt_over_context", over, 1),
            ("max_tokens_over_context", short, room + 1),
        ):
            got = stream_completion(conn, endpoint.headers, _body(s, prompt, max_tokens))
            probes[name] = {"status": got.status, "code": got.error_code, "cause": got.cause}
            c.measure(f"{name}_refused", got.status == 400 and got.error_code == CONTEXT_CODE,
                      True, "==")  # fmt: skip
        accepted = stream_completion(conn, endpoint.headers, _body(s, short, room), first_only=True)
        probes["at_the_limit"] = {"status": accepted.status, "cause": accepted.cause}
        ok = accepted.status == 200 and not accepted.cause
        c.measure("at_the_limit_accepted", ok, True, "==")
    finally:
        conn.close()
    c.details["api_probes"] = probes
    refusals = sum(
        probe["status"] == 400 and probe["code"] == CONTEXT_CODE
        for name, probe in probes.items()
        if name != "at_the_limit"
    )
    parts.append(
        f"the serving process refused {refusals}/2 requests over it (400 {CONTEXT_CODE}) and "
        + ("accepted" if probes["at_the_limit"]["status"] == 200 else "did NOT accept")
        + " one exactly at it"
    )
    return "; ".join(parts)


def check_serving(s: TextSuiteState, c: CheckRecord) -> str:
    from pipelines.certification._checks import SERVING_NOT_RUN
    from pipelines.certification._state import NotRun

    endpoint = s.endpoint()
    if endpoint is None:
        raise NotRun(SERVING_NOT_RUN)
    model = s.loaded
    conn = connection(endpoint.base_url)
    prompts = s.prompts()[:PROBES]
    greedy = s.greedy()[:PROBES]
    new = s.new_tokens(s.prompts())
    shares: list[float] = []
    usage_ok = 0
    answers = []
    try:
        status, listed = post_json(conn, "/v1/models", endpoint.headers, None)
        names = [m.get("id") for m in (listed.get("data") or [])] if status == 200 else []
        c.measure("model_listed", endpoint.model in names, True, "==")
        for ids, made in zip(prompts, greedy, strict=True):
            status, answer = post_json(
                conn, "/v1/completions", endpoint.headers, _body(s, ids, new)
            )
            if status != 200:
                raise PipelineError(f"a greedy completion was answered {status}: {answer}")
            text = answer["choices"][0]["text"]
            expected = model.decode(made.tokens)
            shares.append(text_agreement(text, expected))
            usage = answer.get("usage") or {}
            count = len(made.tokens) + int(made.stopped_at_eos)
            usage_ok += usage.get("prompt_tokens") == len(ids) and (
                usage.get("completion_tokens") == count
            )
            answers.append({"served": text[:200], "engine": expected[:200]})
    finally:
        conn.close()
    agreement = sum(shares) / len(shares)
    threshold = s.settings.min_greedy_agreement
    c.measure("greedy_text_agreement", round(agreement, 6), threshold, ">=")
    c.measure("usage_counts_match", usage_ok, len(prompts), "==")
    c.details.update(runtime=endpoint.runtime, answers=answers)
    return (
        f"{endpoint.runtime} lists it on /v1/models and answered {len(prompts)} greedy "
        f"completions: {agreement:.1%} of their text equal to the model's own greedy decoding "
        f"(needs {threshold:.0%}), usage counts right for {usage_ok}/{len(prompts)}"
    )
