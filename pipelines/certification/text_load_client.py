"""A streaming load client for the OpenAI-compatible completions API: many streams, each judged.

The certification suite's streaming load check drives the platform's serving process with it. It
runs in its own process (``python -m pipelines.certification.text_load_client PLAN RESULT``) so
that the client's Python work does not take the serving process's interpreter lock, as the
tensor load client does (:mod:`.load_client`). It speaks plain HTTP (``http.client``, the
standard library), one keep-alive connection per client thread, reconnecting after a failure.

The plan (JSON, see :func:`run_plan`) names the server, the model, the prompts, how many
requests, how many at once and their ``max_tokens``. Request ``k`` sends prompt
``k % len(prompts)`` as ``POST /v1/completions`` with ``stream: true``, temperature 0 and the
usage chunk asked for. Every stream is judged (:func:`stream_completion`):

* **success**: HTTP 200, every event ``data: <JSON>``, a ``finish_reason`` on the last choice,
  text that is valid UTF-8 with no U+FFFD, no error event, and ``data: [DONE]`` at the end;
* **decode failure**: a 200 stream that went wrong: an error event, cut off (no ``[DONE]``),
  an event that is not JSON, invalid UTF-8 or U+FFFD in the text, no ``finish_reason``;
* anything else (a refused connection, a 4xx/5xx) is an API failure.

Times: ``ttft`` from sending the request to the first text; ``tpot`` the mean time per output
token after the first (the usage's ``completion_tokens`` spread from the first text to the last).
Progress goes to stdout as ``progress <done> <total>`` lines, about ten a second.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["StreamOutcome", "connection", "main", "post_json", "run_plan", "stream_completion"]

REQUEST_TIMEOUT_S = 120.0
REPLACEMENT = "\ufffd"
MAX_ERROR_CHARS = 300


@dataclass
class StreamOutcome:
    """One streamed completion as the client saw it."""

    status: int  # HTTP status; 0: no answer (refused, reset, timed out)
    seconds: float  # from sending the request to the end of the stream
    ttft: float | None = None  # to the first text (or the first event, when no text came)
    tpot: float | None = None
    tokens: int = 0  # completion tokens (the usage's, else one per text event)
    finish_reason: str | None = None
    text: str = ""
    cause: str = ""  # empty: it succeeded
    decode_failure: bool = False
    error_code: str = ""  # the API error's code on a refusal (e.g. context_length_exceeded)
    prompt: int = 0
    started: float = 0.0  # seconds from the start of the run


def connection(base_url: str) -> http.client.HTTPConnection:
    """A connection to ``base_url`` (http://host:port)."""
    parts = urllib.parse.urlsplit(base_url)
    host = parts.hostname or "127.0.0.1"
    return http.client.HTTPConnection(host, parts.port, timeout=REQUEST_TIMEOUT_S)


def _error_of(raw: bytes) -> tuple[str, str]:
    """The message and code of an OpenAI-style error body (the raw text when it is not one)."""
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        return str(error.get("message", ""))[:MAX_ERROR_CHARS], str(error.get("code") or "")
    if isinstance(error, str):
        return error[:MAX_ERROR_CHARS], ""
    return raw[:MAX_ERROR_CHARS].decode(errors="replace"), ""


def post_json(
    conn: http.client.HTTPConnection, path: str, headers: dict[str, str], body: dict | None
) -> tuple[int, Any]:
    """A JSON request (GET when ``body`` is None) and its status and parsed answer."""
    data = None if body is None else json.dumps(body).encode()
    sent = {**headers, "Content-Type": "application/json"}
    conn.request("GET" if body is None else "POST", path, body=data, headers=sent)
    response = conn.getresponse()
    raw = response.read()
    try:
        return response.status, json.loads(raw or b"{}")
    except ValueError:
        return response.status, {"error": raw[:MAX_ERROR_CHARS].decode(errors="replace")}


def stream_completion(
    conn: http.client.HTTPConnection,
    headers: dict[str, str],
    body: dict[str, Any],
    *,
    first_only: bool = False,
) -> StreamOutcome:
    """Send one streaming completion on ``conn`` and judge its stream (see the module's doc).

    ``first_only``: stop reading once the first event came (the connection is closed, so the
    server cancels the rest): enough to see a request accepted.
    """
    started = time.perf_counter()
    found = StreamOutcome(status=0, seconds=0.0)
    # The usage's token count, not the text events: a server may send several tokens in one
    # event (a busy machine coalesces them) or hold a token with no text of its own.
    data = json.dumps({"stream_options": {"include_usage": True}, **body, "stream": True}).encode()
    sent = {**headers, "Content-Type": "application/json", "Accept": "text/event-stream"}
    first_text = last_text = None
    events = 0
    parts: list[str] = []
    done = False
    try:
        conn.request("POST", "/v1/completions", body=data, headers=sent)
        response = conn.getresponse()
        found.status = response.status
        if response.status != 200:
            message, found.error_code = _error_of(response.read())
            found.cause = f"HTTP {response.status}: {message}"
            return found
        while True:
            line = response.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            now = time.perf_counter()
            if not line.startswith(b"data: "):
                raise _Broken(f"malformed event {line[:60]!r}")
            payload = line[len(b"data: ") :]
            if payload == b"[DONE]":
                done = True
                break
            try:
                event = json.loads(payload.decode("utf-8"))
            except UnicodeDecodeError:
                raise _Broken("invalid UTF-8 bytes in the stream") from None
            except ValueError:
                raise _Broken(f"an event is not JSON: {payload[:60]!r}") from None
            events += 1
            if found.ttft is None and first_only:
                found.ttft = now - started
                conn.close()
                return found
            if isinstance(event, dict) and event.get("error") is not None:
                message, _ = _error_of(json.dumps(event).encode())
                raise _Broken(f"stream error: {message}")
            for choice in event.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if text:
                    parts.append(text)
                    first_text = first_text if first_text is not None else now
                    last_text = now
                if choice.get("finish_reason"):
                    found.finish_reason = str(choice["finish_reason"])
                    if first_text is None:
                        first_text = last_text = now
            usage = event.get("usage")
            if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                found.tokens = usage["completion_tokens"]
        if not done:
            raise _Broken("the stream ended without [DONE]")
        response.read()  # the end of the chunked body: the connection can be used again
    except _Broken as exc:
        found.cause, found.decode_failure = str(exc), True
        conn.close()
    except (OSError, http.client.HTTPException) as exc:
        what = type(exc).__name__ + (f": {exc}" if str(exc) else "")
        found.decode_failure = found.status == 200  # cut off mid-stream
        found.cause = ("stream cut off: " if found.decode_failure else "no answer: ") + what
        conn.close()
    finally:
        found.seconds = time.perf_counter() - started
    found.text = "".join(parts)
    found.tokens = found.tokens or len(parts)
    if first_text is not None:
        found.ttft = first_text - started
        if found.tokens > 1 and last_text is not None and last_text > first_text:
            found.tpot = (last_text - first_text) / (found.tokens - 1)
    if not found.cause:
        if REPLACEMENT in found.text:
            found.cause, found.decode_failure = "invalid UTF-8 (U+FFFD in the text)", True
        elif found.finish_reason is None:
            found.cause, found.decode_failure = "finish_reason missing", True
    return found


class _Broken(Exception):
    """A stream that went wrong after its 200: a decode failure."""


def run_plan(plan: dict[str, Any], report: bool = False) -> dict[str, Any]:
    """Send ``plan["requests"]`` streams, ``plan["concurrency"]`` at once; every outcome (without
    its text), the wall time and the concurrency."""
    prompts: list[str] = plan["prompts"]
    total, concurrency = int(plan["requests"]), max(1, int(plan["concurrency"]))
    body = {
        "model": plan["model"],
        "max_tokens": int(plan["max_tokens"]),
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    outcomes: list[StreamOutcome] = []
    lock = threading.Lock()
    counter = iter(range(total))
    began = time.perf_counter()

    def client() -> None:
        conn = connection(plan["base_url"])
        while True:
            with lock:
                k = next(counter, None)
            if k is None:
                break
            prompt = k % len(prompts)
            offset = time.perf_counter() - began
            outcome = stream_completion(conn, plan["headers"], {**body, "prompt": prompts[prompt]})
            outcome.prompt, outcome.started, outcome.text = prompt, offset, ""
            if outcome.cause:
                conn.close()  # a fresh connection after a failure
                conn = connection(plan["base_url"])
            with lock:
                outcomes.append(outcome)
        conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    last = 0.0
    while any(t.is_alive() for t in threads):
        time.sleep(0.05)
        if report and time.perf_counter() - last >= 0.1:
            last = time.perf_counter()
            print(f"progress {len(outcomes)} {total}", flush=True)
    wall = time.perf_counter() - began
    outcomes.sort(key=lambda o: o.started)
    return {
        "outcomes": [asdict(o) for o in outcomes],
        "wall_seconds": wall,
        "concurrency": concurrency,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m pipelines.certification.text_load_client PLAN RESULT")
        return 2
    plan = json.loads(Path(argv[1]).read_text())
    result = run_plan(plan, report=True)
    Path(argv[2]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
