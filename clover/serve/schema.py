"""Validation of OpenAI-style request bodies into plain dataclasses, and the error that becomes OpenAI's error JSON.

Every check names the offending field in ``param`` and in the message, so that a client sees what to fix. Fields that
the server does not implement are rejected when they would change the answer (``n > 1``, ``logprobs``, penalties,
tools), and ignored when they cannot (``user``, ``metadata``, ``store``...).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with HTTP status ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class GenerationRequest:
    """What both endpoints need once validated; exactly one of ``messages`` (chat) and ``prompt`` is set."""

    model: str
    messages: list[dict] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None           # None: up to the end of the context window
    max_tokens_param: str = "max_tokens"    # which field set it (named in errors)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 that says why not."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad(f"We could not parse the JSON body of your request ({err}). The body must be a JSON object, "
                  f"e.g. {{\"model\": ..., \"messages\": [...]}}.") from None
    if not isinstance(body, dict):
        raise bad(f"The request body must be a JSON object, got {type(body).__name__}.")
    return body


# ---- field readers: each returns the default for an absent or null field ------------------------------------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(body: dict, key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"'{key}' must be a number, got {value!r}.", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if not _is_int(value):
        raise bad(f"'{key}' must be an integer, got {value!r}.", key)
    return value


def _boolean(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{key}' must be a boolean, got {value!r}.", key)
    return value


def _common(body: dict, default_max_tokens: int | None) -> GenerationRequest:
    model = body.get("model")
    if model is None:
        raise bad("You must provide a model parameter ('model').", "model")
    if not isinstance(model, str):
        raise bad(f"'model' must be a string, got {model!r}.", "model")
    req = GenerationRequest(model=model)

    for key in ("max_completion_tokens", "max_tokens"):  # the newer name wins when both are given
        value = _integer(body, key, None)
        if value is not None and value <= 0:
            raise bad(f"'{key}' must be at least 1, got {value}.", key)
        if value is not None and req.max_tokens is None:
            req.max_tokens, req.max_tokens_param = value, key
    if req.max_tokens is None:
        req.max_tokens = default_max_tokens

    req.temperature = _number(body, "temperature", 1.0)
    if req.temperature < 0:
        raise bad(f"'temperature' must be >= 0 (0 = greedy), got {req.temperature:g}.", "temperature")
    req.top_p = _number(body, "top_p", 1.0)
    if not 0 < req.top_p <= 1:
        raise bad(f"'top_p' must be in (0, 1], got {req.top_p:g}.", "top_p")
    top_k = _integer(body, "top_k", 0)  # not OpenAI's, but common in OpenAI-compatible servers; -1 = off
    if top_k < -1:
        raise bad(f"'top_k' must be >= 0 (0 or -1 = off), got {top_k}.", "top_k")
    req.top_k = max(top_k, 0)
    req.seed = _integer(body, "seed", None)

    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise bad(f"'stop' must be a string or a list of strings, got {stop!r}.", "stop")
        if len(stop) > 4:
            raise bad(f"'stop' takes at most 4 sequences, got {len(stop)}.", "stop")
        req.stop = [s for s in stop if s]

    req.stream = _boolean(body, "stream", False)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad(f"'stream_options' must be an object, got {options!r}.", "stream_options")
        if not req.stream:
            raise bad("'stream_options' is only allowed when 'stream' is true.", "stream_options")
        req.include_usage = _boolean(options, "include_usage", False)

    n = _integer(body, "n", 1)
    if n != 1:
        raise bad(f"'n' must be 1 (this server answers one choice per request), got {n}.", "n")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0) != 0:
            raise bad(f"'{key}' is not supported by this server (leave it at 0).", key)
    for key in ("logprobs", "top_logprobs", "logit_bias", "tools", "functions", "echo", "suffix"):
        if body.get(key):
            raise bad(f"'{key}' is not supported by this server.", key)
    if _integer(body, "best_of", 1) != 1:
        raise bad("'best_of' must be 1 (this server answers one choice per request).", "best_of")
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad("'response_format' is not supported by this server (only {\"type\": \"text\"}).",
                  "response_format")
    return req


def _content(message: dict, where: str) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant" and not message.get("tool_calls"):
        return ""
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"'{where}.content[{j}]' must be a text part {{\"type\": \"text\", \"text\": ...}}; this "
                          f"server serves a text-only model.", f"{where}.content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"'{where}.content' must be a string or a list of text parts, got {content!r}.", f"{where}.content")


def parse_chat(body: dict) -> GenerationRequest:
    """A ``/v1/chat/completions`` body."""
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is a required property: a list of {\"role\", \"content\"} objects.", "messages")
    if not isinstance(messages, list) or not messages:
        raise bad(f"'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, got {messages!r}.",
                  "messages")
    normalised = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"'{where}' must be an object with 'role' and 'content', got {message!r}.", where)
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise bad(f"'{where}.role' must be one of 'system', 'developer', 'user', 'assistant', got {role!r}.",
                      f"{where}.role")
        normalised.append({"role": role, "content": _content(message, where)})
    req = _common(body, default_max_tokens=None)
    req.messages = normalised
    return req


def parse_completion(body: dict) -> GenerationRequest:
    """A ``/v1/completions`` body: one raw prompt (a string or a list of token ids), no chat template."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is a required property: a string or a list of token ids.", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not all(_is_int(t) for t in prompt):
            raise bad("'prompt' must be one string or one list of token ids (batches of several prompts are not "
                      "supported).", "prompt")
    elif not isinstance(prompt, str):
        raise bad(f"'prompt' must be a string or a list of token ids, got {prompt!r}.", "prompt")
    req = _common(body, default_max_tokens=16)  # OpenAI's default for this endpoint
    req.prompt = prompt
    return req
