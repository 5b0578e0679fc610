"""The Open Inference Protocol's generate extension: its requests and answers, as plain data.

The shapes are Triton's and KServe's (``generate_rest.yaml``)::

    request   {"text_input": "...", "parameters": {"max_tokens": 16, "temperature": 0, ...},
               "id": "..."}                                  (parameters and id optional)
    /generate {"model_name", "model_version", "text_output", "details": {...}}
    /generate_stream, one server-sent event per text chunk:
              data: {"model_name", "model_version", "text_output": "<new text>", "done": false}
              ... and a last one with "done": true and the "details"
    errors    {"error": "..."} (a stream that fails after its first event ends with one)

``details`` holds ``finish_reason`` (``stop`` or ``length``), ``prompt_tokens`` and
``generated_tokens``. ``id`` is echoed in every answer when the request sends one.

Parameters are checked by the OpenAI completion parser, so both APIs take the same values and
refuse the same ones: ``max_tokens`` (default 16), ``temperature`` (0 to 2; 0 is greedy),
``top_p``, ``stop`` (a string or up to 4), ``seed`` (greedy only). ``stream`` may be sent when it
agrees with the route. Anything else is refused (400), never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from r1platform.serving.openai_protocol import ApiError, TextCall, parse_completion

REQUEST_KEYS = {"text_input", "parameters", "id"}
PARAMETERS = {"max_tokens", "temperature", "top_p", "stop", "seed", "stream"}


@dataclass(frozen=True)
class GenerateCall:
    """A checked generate request: the text call, and the id the client gave it (if any)."""

    call: TextCall
    request_id: str | None = None


def parse_generate(data: dict[str, Any], model: str, *, stream: bool) -> GenerateCall:
    """Check a generate request for ``model``; ``stream``: whether it came to generate_stream."""
    unknown = sorted(set(data) - REQUEST_KEYS)
    if unknown:
        raise ApiError(
            400,
            f"unknown fields: {', '.join(unknown)} (a generate request takes text_input, "
            "parameters and id; sampling settings go in parameters)",
            unknown[0],
        )
    text = data.get("text_input")
    if not isinstance(text, str) or not text:
        raise ApiError(400, "text_input must be a non-empty string", "text_input")
    request_id = data.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ApiError(400, "id must be a string", "id")
    parameters = data.get("parameters")
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict):
        raise ApiError(400, "parameters must be an object", "parameters")
    unknown = sorted(set(parameters) - PARAMETERS)
    if unknown:
        raise ApiError(
            400,
            f"unknown or unsupported parameters: {', '.join(unknown)} "
            f"(this server takes {', '.join(sorted(PARAMETERS))})",
            unknown[0],
        )
    parameters = dict(parameters)
    asked = parameters.pop("stream", stream)
    if not isinstance(asked, bool):
        raise ApiError(400, "parameters.stream must be true or false", "stream")
    if asked is not stream:
        route = "generate_stream" if asked is True else "generate"
        message = f"parameters.stream is {orjson.dumps(asked).decode()}: call {route}"
        raise ApiError(400, message, "stream")
    call = parse_completion({"model": model, "prompt": text, **parameters})
    call.stream = stream
    return GenerateCall(call, request_id)


def _head(generate: GenerateCall, version: str) -> dict[str, Any]:
    head: dict[str, Any] = {"model_name": generate.call.model, "model_version": version}
    if generate.request_id is not None:
        head["id"] = generate.request_id
    return head


def details(finish: str, prompt_tokens: int, generated_tokens: int) -> dict[str, Any]:
    return {
        "finish_reason": finish,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated_tokens,
    }


def answer(generate: GenerateCall, version: str, text: str, info: dict[str, Any]) -> bytes:
    """The whole answer of ``/generate``."""
    return orjson.dumps(_head(generate, version) | {"text_output": text, "details": info})


def piece(
    generate: GenerateCall, version: str, text: str, info: dict[str, Any] | None = None
) -> bytes:
    """One server-sent event of ``/generate_stream``; the last carries ``details``."""
    payload = _head(generate, version) | {"text_output": text, "done": info is not None}
    if info is not None:
        payload["details"] = info
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def error_event(message: str) -> bytes:
    return b"data: " + orjson.dumps({"error": message}) + b"\n\n"
