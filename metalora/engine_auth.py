"""vLLM's key on every path, loaded into vLLM itself with `--middleware metalora.engine_auth.RequireEngineKey`.

vLLM's own `--api-key` / VLLM_API_KEY covers only /v1, /v2 and /inference: its SageMaker routes (/invocations for
inference, /adapters for runtime LoRA loading) stay open, and vLLM's docs say not to rely on the key alone. This
ASGI middleware refuses every HTTP request without `Authorization: Bearer $VLLM_API_KEY` except GET /health, which
health checks (the supervisor, compose) make without credentials.

It runs inside the vLLM process, also in the GPU compose service's stock vLLM image, where this package is mounted
read-only: so it imports the standard library only.
"""
from __future__ import annotations

import hmac
import json
import os

OPEN_PATHS = frozenset({"/health"})


class RequireEngineKey:
    def __init__(self, app, key: str | None = None):
        self.app = app
        key = key if key is not None else os.environ.get("VLLM_API_KEY", "")
        self.expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.expected is None or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {"message": "this vLLM needs its API key on every path but /health",
                                     "type": "Unauthorized", "code": 401}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
