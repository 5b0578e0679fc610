"""The OpenAI-compatible API's requests and answers, as plain data (no HTTP here).

:func:`parse_completion` and :func:`parse_chat` check a request body and return a
:class:`TextCall`; anything this server cannot honour is an :class:`ApiError` (400) naming the
parameter, never silently ignored. The answer and chunk builders follow OpenAI's shapes
(``text_completion``, ``chat.completion``, ``chat.completion.chunk``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson

COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream"}
COMMON |= {"stream_options", "n", "user"}
COMPLETION_KEYS = COMMON | {"prompt"}
CHAT_KEYS = COMMON | {"messages", "max_completion_tokens"}
ROLES = {"system", "developer", "user", "assistant"}
MAX_STOPS = 4


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class TextCall:
    """A checked completion or chat request. ``prompt`` is text, token ids, or chat messages."""

    chat: bool
    model: str
    prompt: str | list[int] | list[dict[str, str]]
    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def loads(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def parse_completion(data: dict[str, Any]) -> TextCall:
    _known(data, COMPLETION_KEYS)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        pass
    elif not isinstance(prompt, str) or not prompt:
        raise ApiError(
            400, "prompt must be a non-empty string (or one list of token ids)", "prompt"
        )
    return _common(data, chat=False, prompt=prompt, max_tokens=_max_tokens(data, "max_tokens", 16))


def parse_chat(data: dict[str, Any]) -> TextCall:
    _known(data, CHAT_KEYS)
    key = "max_completion_tokens" if "max_completion_tokens" in data else "max_tokens"
    messages = [_message(m, i) for i, m in enumerate(_list(data.get("messages"), "messages"))]
    if not messages:
        raise ApiError(400, "messages must not be empty", "messages")
    return _common(data, chat=True, prompt=messages, max_tokens=_max_tokens(data, key, None))


def _known(data: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(
            400,
            f"unknown or unsupported parameters: {', '.join(unknown)} "
            f"(this server takes {', '.join(sorted(allowed))})",
            unknown[0],
        )
    if not isinstance(data.get("model"), str) or not data["model"]:
        raise ApiError(400, "model must be the name of a served model", "model")


def _common(data: dict[str, Any], *, chat: bool, prompt: Any, max_tokens: int | None) -> TextCall:
    temperature = _number(data, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0)
    if data.get("n", 1) != 1 or not _is_int(data.get("n", 1)):
        raise ApiError(400, "n must be 1: one choice per request", "n")
    seed = data.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise ApiError(400, "seed must be an integer", "seed")
        if temperature != 0:
            raise ApiError(
                400,
                "seed is not supported with sampling: the engine draws for every request of a "
                "batch from one generator, so a per-request seed cannot be honoured (use "
                "temperature 0 for reproducible answers)",
                "seed",
            )
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    options = data.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise ApiError(
                400, "stream_options is only allowed with stream: true", "stream_options"
            )
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise ApiError(400, "stream_options takes only include_usage", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise ApiError(
                400, "stream_options.include_usage must be true or false", "stream_options"
            )
    if data.get("user") is not None and not isinstance(data["user"], str):
        raise ApiError(400, "user must be a string", "user")
    return TextCall(
        chat=chat,
        model=data["model"],
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=_stops(data.get("stop")),
        stream=stream,
        include_usage=include_usage,
    )


def _max_tokens(data: dict[str, Any], key: str, default: int | None) -> int | None:
    value = data.get(key, default)
    if value is None:
        return default
    if not _is_int(value) or value <= 0:
        raise ApiError(400, f"{key} must be a positive integer", key)
    return int(value)


def _number(data: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(400, f"{key} must be a number from {low:g} to {high:g}", key)
    return float(value)


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or not 0 < len(stops) <= MAX_STOPS
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ApiError(400, f"stop must be a non-empty string or up to {MAX_STOPS} of them", "stop")
    return tuple(stops)


def _list(value: Any, param: str) -> list[Any]:
    if not isinstance(value, list):
        raise ApiError(400, f"{param} must be a list", param)
    return value


def _message(message: Any, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict) or set(message) - {"role", "content", "name"}:
        raise ApiError(400, f"{param} must be an object of role, content (and name)", param)
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ApiError(400, f"{param}.role must be one of {', '.join(sorted(ROLES))}", param)
    if isinstance(content, list):  # content parts: text only
        if not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            raise ApiError(400, f"{param}.content parts must all be text parts", param)
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"{param}.content must be a string", param)
    return {"role": "system" if role == "developer" else role, "content": content}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- answers ---------------------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def answer(call: TextCall, text: str, finish: str, counts: dict[str, int]) -> dict[str, Any]:
    """The whole (non-streaming) answer."""
    if call.chat:
        choice: dict[str, Any] = {"message": {"role": "assistant", "content": text}}
    else:
        choice = {"text": text}
    choice |= {"index": 0, "logprobs": None, "finish_reason": finish}
    return _envelope(call, False) | {"choices": [choice], "usage": counts}


def chunk(call: TextCall, text: str | None, finish: str | None = None) -> bytes:
    """One server-sent event: a text delta (a chat's first says the role), or the last one."""
    if call.chat:
        delta: dict[str, Any] = {} if text is None else {"content": text}
        choice: dict[str, Any] = {"delta": delta}
    else:
        choice = {"text": text or ""}
    choice |= {"index": 0, "logprobs": None, "finish_reason": finish}
    payload = _envelope(call, True) | {"choices": [choice]}
    if call.include_usage:
        payload["usage"] = None
    return sse(payload)


def role_chunk(call: TextCall) -> bytes:
    choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
    payload = _envelope(call, True) | {"choices": [choice | {"finish_reason": None}]}
    if call.include_usage:
        payload["usage"] = None
    return sse(payload)


def usage_chunk(call: TextCall, counts: dict[str, int]) -> bytes:
    return sse(_envelope(call, True) | {"choices": [], "usage": counts})


def sse(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def _envelope(call: TextCall, streaming: bool) -> dict[str, Any]:
    if call.chat:
        kind, prefix = ("chat.completion.chunk" if streaming else "chat.completion"), "chatcmpl-"
    else:
        kind, prefix = "text_completion", "cmpl-"
    return {"id": prefix + call.id, "object": kind, "created": call.created, "model": call.model}
