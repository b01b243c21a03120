"""The inference proxy: forward a completion or chat body to a vLLM replica and relay its answer, streamed
or not.

The body is forwarded, not modelled, so every OpenAI/vLLM field reaches vLLM untouched; the only change on the
way back is the `model` field (vLLM's internal adapter name -> the name the client asked for), in plain
answers, in every SSE event and in vLLM's error messages. Routing and failover are the pool's
(server/upstream.py).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import httpx

from server.errors import InvalidRequest, UpstreamError, error_body
from server.upstream import UpstreamPool

log = logging.getLogger("metalora.gateway")

# The OpenAI inference endpoints, served by vLLM under the same paths.
COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"

# A JSON \u escape of a UTF-16 surrogate: json.loads accepts a lone one, which no UTF-8 text can carry.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
SSE_DATA = b"data:"
SSE_DONE = b"[DONE]"

Rewrite = Callable[[bytes], bytes]


@dataclass
class ProxiedResponse:
    status: int
    body: bytes
    media_type: str = "application/json"


@dataclass
class ProxiedStream:
    chunks: AsyncIterator[bytes]
    media_type: str = "text/event-stream"


@dataclass(frozen=True)
class Target:
    """Where a completion goes: the name vLLM serves, the name the client sees, the routing key."""

    upstream_model: str
    visible_model: str
    affinity_key: str | None

    def rewriter(self) -> Rewrite:
        """Rewrites the `model` field of one JSON payload from the served name to the visible one."""
        if self.upstream_model == self.visible_model:
            return lambda payload: payload
        # vLLM serialises compactly, so a chunk names the model exactly as `"model":"<name>"`. That
        # byte sequence cannot occur inside a JSON string value (its quotes would be escaped), so replacing
        # it touches only the `model` field. Anything else falls back to parsing the JSON.
        old = b'"model":' + json.dumps(self.upstream_model).encode()
        new = b'"model":' + json.dumps(self.visible_model).encode()
        upstream, visible = self.upstream_model, self.visible_model

        def rewrite(payload: bytes) -> bytes:
            if old in payload:
                return payload.replace(old, new, 1)
            try:
                data = json.loads(payload)
            except ValueError:
                return payload
            if isinstance(data, dict) and data.get("model") == upstream:
                data["model"] = visible
                return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
            return payload

        return rewrite


def parse_body(raw_body: bytes) -> dict:
    """The request body as a JSON object, or InvalidRequest."""
    try:
        body = json.loads(raw_body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"malformed JSON body: {exc}", code="invalid_json") from None
    except RecursionError:  # e.g. 100k nested lists: json's C parser gives up on the Python stack
        raise InvalidRequest("malformed JSON body: nested too deeply", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(raw_body):  # rare, so only then the full check (a pair is one character)
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise InvalidRequest("malformed JSON body: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff"
                                 " not in a pair), which is not text", code="invalid_json") from None
    return body


async def forward(pool: UpstreamPool, path: str, body: dict, target: Target
                  ) -> ProxiedResponse | ProxiedStream:
    """POST `body` (naming `target.upstream_model`) to the target's replica; a vLLM error becomes
    UpstreamError with vLLM's status; a stream is relayed event by event."""
    body["model"] = target.upstream_model
    content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    stream = body.get("stream") is True
    response = await pool.post(path, content, target.affinity_key, stream=stream)
    rewrite = target.rewriter()
    if response.status_code >= 400:
        if stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        raise _upstream_error(response, target)
    if not stream:
        return ProxiedResponse(response.status_code, rewrite(response.content),
                               response.headers.get("content-type", "application/json"))
    return ProxiedStream(_relay_sse(response, rewrite))


async def _relay_sse(response: httpx.Response, rewrite: Rewrite) -> AsyncIterator[bytes]:
    """Relay vLLM's SSE stream event by event, rewriting only the `model` of each `data:` JSON chunk."""
    buffer = b""
    try:
        async for chunk in response.aiter_bytes():
            buffer += chunk
            if b"\n" not in chunk:
                continue
            *lines, buffer = buffer.split(b"\n")
            yield b"\n".join(_rewrite_line(line, rewrite) for line in lines) + b"\n"
        if buffer:
            yield _rewrite_line(buffer, rewrite)
    except httpx.HTTPError as exc:
        # Bytes already went to the client: no failover possible. End the stream with an error event,
        # as vLLM itself does for errors mid-stream.
        log.warning("upstream stream broke: %s", exc)
        error = error_body(f"the inference replica failed mid-stream ({type(exc).__name__})",
                           "service_unavailable_error", "upstream_unavailable")
        yield b"data: " + json.dumps(error).encode() + b"\n\n"
    finally:
        await response.aclose()


def _rewrite_line(line: bytes, rewrite: Rewrite) -> bytes:
    if not line.startswith(SSE_DATA):
        return line
    payload = line[len(SSE_DATA):].strip()
    if not payload or payload == SSE_DONE:
        return line
    return b"data: " + rewrite(payload)


def _upstream_error(response: httpx.Response, target: Target) -> UpstreamError:
    """vLLM's error answer in our shape, with its status; its internal model name replaced."""
    message, err_type, code = None, None, None
    try:
        data = response.json()
        info = data.get("error") if isinstance(data, dict) else None
        if isinstance(info, dict):  # {"error": {"message", "type", "code", ...}}
            message, err_type, code = info.get("message"), info.get("type"), info.get("code")
        elif isinstance(data, dict):  # older vLLM: {"object": "error", "message", "type", "code"}
            message, err_type, code = data.get("message"), data.get("type"), data.get("code")
            if message is None and isinstance(data.get("detail"), str):
                message = data["detail"]
    except ValueError:
        pass
    if not isinstance(message, str):
        message = response.text[:1000] or f"inference replica answered {response.status_code}"
    if target.upstream_model != target.visible_model:
        message = message.replace(target.upstream_model, target.visible_model)
    status = response.status_code
    if not isinstance(err_type, str) or not err_type:
        err_type = "invalid_request_error" if status < 500 else "server_error"
    if not isinstance(code, str) or not code:
        code = "upstream_error"
    return UpstreamError(status, message, err_type, code)
