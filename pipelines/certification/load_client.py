"""A load client for the Open Inference Protocol: many requests, their answers checked.

The certification suite's API-success and QPS checks drive the platform's serving runtime with
it. It runs in its own process (``python -m pipelines.certification.load_client PLAN RESULT``) so
that the client's Python work does not take the serving process's interpreter lock: what is
measured is the runtime, not the client sharing it.

The plan (a JSON file, see :class:`LoadPlan`) names the endpoint, the request payloads (an
``.npz`` of ``p<i>.in.<input>`` arrays, and ``p<i>.out.<output>`` for the expected outputs
when answers are verified), how many requests or for how long, and how many at once. Request
``k`` sends payload ``k % len(payloads)``, so every payload (batch size, dynamic dimension) is in
the mix in a fixed order. Each client thread keeps one HTTP/1.1 connection open, reconnecting
after a failure. Every request's outcome is written to RESULT (JSON): payload, HTTP status (0
when nothing came back), latency, and the cause of a failure.

An answer is verified, when asked, output by output against the expected arrays with the
parity rule of the suite (:mod:`._numerics`): the normalised error's statistic at most 1, or,
for an INT8 engine (whose dynamically quantized activations depend on the batch a request was
served in), a mean row cosine of at least ``min_cosine``.

Progress goes to stdout as ``progress <done> <total>`` lines, about ten a second.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.certification._numerics import (
    Tolerance,
    abs_error,
    normalised_statistic,
    row_cosine,
)

__all__ = ["NUMPY_FOR", "LoadPlan", "Outcome", "build_bodies", "main", "run_plan"]

# The Open Inference Protocol's datatypes and the numpy dtypes that carry them.
NUMPY_FOR = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64", "FP16": "float16",
    "FP32": "float32", "FP64": "float64",
}  # fmt: skip
_DATATYPE_FOR = {numpy: name for name, numpy in NUMPY_FOR.items()}
REQUEST_TIMEOUT_S = 60.0


@dataclass
class LoadPlan:
    """What to send where: ``requests`` of them, or as many as fit in ``seconds``."""

    url: str  # the model's base URL: http://host:port/v2/models/<name>
    headers: dict[str, str]
    payloads: str  # path of the .npz holding the inputs (and expected outputs)
    payload_count: int
    concurrency: int
    requests: int | None = None
    seconds: float | None = None
    verify: bool = False
    # output name -> [atol, rtol, statistic]; "*" for every output
    tolerances: dict[str, list[Any]] = field(default_factory=dict)
    int8: bool = False
    min_cosine: float = 0.99


@dataclass
class Outcome:
    payload: int
    status: int  # HTTP status; 0: no answer (refused, reset, timed out)
    seconds: float
    cause: str = ""  # empty: it succeeded
    started: float = 0.0  # seconds since the run began


def build_bodies(npz: Any, count: int) -> list[tuple[bytes, dict[str, np.ndarray]]]:
    """Each payload's request body and its expected outputs (empty when not verified)."""
    bodies = []
    for i in range(count):
        inputs, expected = [], {}
        for key in npz.files:
            index, kind, name = key.split(".", 2)
            if index != f"p{i}":
                continue
            array = npz[key]
            if kind == "in":
                inputs.append(
                    {
                        "name": name,
                        "shape": list(array.shape),
                        "datatype": _DATATYPE_FOR[str(array.dtype)],
                        "data": array.ravel().tolist(),
                    }
                )
            else:
                expected[name] = array
        bodies.append((json.dumps({"inputs": inputs}).encode(), expected))
    return bodies


def _statistic(got: np.ndarray, want: np.ndarray, rule: list[Any]) -> float:
    tolerance = Tolerance(float(rule[0]), float(rule[1]), str(rule[2]))
    return normalised_statistic(abs_error(got, want), want, tolerance)


def _verify(answer: dict[str, Any], expected: dict[str, np.ndarray], plan: LoadPlan) -> str:
    """The cause of a mismatch, or "" when every expected output came back within the rule."""
    got = {t.get("name"): t for t in answer.get("outputs", [])}
    for name, want in expected.items():
        tensor = got.get(name)
        if tensor is None:
            return f"output {name} missing"
        dtype = NUMPY_FOR.get(str(tensor.get("datatype")))
        try:
            value = np.asarray(tensor["data"], dtype=dtype).reshape(tensor["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            return f"output {name} malformed ({type(exc).__name__})"
        if value.shape != want.shape:
            return f"output {name} shape {list(value.shape)}, expected {list(want.shape)}"
        if plan.int8:
            cosine = row_cosine(value, want)
            if not cosine >= plan.min_cosine:
                return f"output {name} differs (row cosine {cosine:.4f} < {plan.min_cosine})"
            continue
        rule = plan.tolerances.get(name) or plan.tolerances.get("*")
        if rule is None:
            continue
        error = _statistic(value, want, rule)
        if not error <= 1.0:
            return f"output {name} differs (normalised error {error:.3g} > 1)"
    return ""


class _Runner:
    def __init__(self, plan: LoadPlan, bodies: list[tuple[bytes, dict[str, np.ndarray]]]) -> None:
        self.plan, self.bodies = plan, bodies
        parsed = urllib.parse.urlsplit(plan.url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self.path = parsed.path.rstrip("/") + "/infer"
        self.headers = {**plan.headers, "Content-Type": "application/json"}
        self.lock = threading.Lock()
        self.next = 0
        self.outcomes: list[Outcome] = []
        self.started = time.perf_counter()
        self.deadline = self.started + plan.seconds if plan.seconds else None

    def _take(self) -> int | None:
        with self.lock:
            k = self.next
            if self.plan.requests is not None and k >= self.plan.requests:
                return None
            if self.deadline is not None and time.perf_counter() >= self.deadline:
                return None
            self.next += 1
            return k

    def _send(self, conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
        conn.request("POST", self.path, body=body, headers=self.headers)
        response = conn.getresponse()
        return response.status, response.read()

    def worker(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while (k := self._take()) is not None:
            index = k % len(self.bodies)
            body, expected = self.bodies[index]
            began = time.perf_counter()
            status, cause = 0, ""
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, REQUEST_TIMEOUT_S)
                status, data = self._send(conn, body)
                if status != 200:
                    cause = f"HTTP {status}: {_error_of(data)}"
                elif self.plan.verify:
                    cause = _verify(json.loads(data), expected, self.plan)
            except (OSError, http.client.HTTPException) as exc:
                cause = f"no answer ({type(exc).__name__}: {exc})".replace(": )", ")")
                if conn is not None:
                    conn.close()
                conn = None
            except ValueError as exc:  # an answer that is not JSON
                cause = f"invalid answer ({exc})"
            ended = time.perf_counter()
            outcome = Outcome(index, status, ended - began, cause, began - self.started)
            with self.lock:
                self.outcomes.append(outcome)
        if conn is not None:
            conn.close()


def _error_of(data: bytes) -> str:
    try:
        return str(json.loads(data).get("error", ""))[:120]
    except (ValueError, AttributeError):
        return data[:120].decode(errors="replace")


def run_plan(plan: LoadPlan, progress: Any = None) -> dict[str, Any]:
    """Run ``plan`` in this process; the result RESULT holds (see the module's docstring)."""
    with np.load(plan.payloads, allow_pickle=False) as npz:
        bodies = build_bodies(npz, plan.payload_count)
    runner = _Runner(plan, bodies)
    threads = [
        threading.Thread(target=runner.worker, name=f"load-{i}", daemon=True)
        for i in range(max(1, plan.concurrency))
    ]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        for thread in threads:
            thread.join(timeout=0.1)
            if progress is not None:
                progress(len(runner.outcomes), plan.requests)
    wall = time.perf_counter() - runner.started
    return {
        "wall_seconds": wall,
        "concurrency": len(threads),
        "outcomes": [asdict(o) for o in sorted(runner.outcomes, key=lambda o: o.started)],
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m pipelines.certification.load_client PLAN.json RESULT.json")
        return 2
    plan = LoadPlan(**json.loads(Path(args[0]).read_text()))
    last = [0.0]

    def progress(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.1:
            last[0] = now
            print(f"progress {done} {total or 0}", flush=True)

    result = run_plan(plan, progress)
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
