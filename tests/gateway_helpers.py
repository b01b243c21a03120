"""Gateway test helpers (under tests/, so they never ship in the wheel).

- `ServerThread`: serve an ASGI app with a real uvicorn server on a free port, in a background thread.
- `fake_replica(name)`: a tiny stand-in for a vLLM OpenAI server (/health, /v1/completions and
  /v1/chat/completions incl. SSE, /v1/unload_lora_adapter) that records what it received. For pool/proxy
  unit tests only; end-to-end tests use the real vLLM.
- `write_wordlevel_tokenizer(folder)`: a tiny whitespace `tokenizers` tokenizer.json (1 token per word).
- `store_settings(store, tmp_path, prefix)` and `gateway_env(settings)`: a gateway on SQLite or Redis, in-process.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from uuid import uuid4

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from adapters.backend import open_backend
from adapters.base_model import base_model_path
from adapters.settings import Settings
from helpers import REDIS_URL, drop_redis_keys
from server.app import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, app, port: int | None = None, lifespan: str = "off"):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan=lifespan,
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"test server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def fake_replica(name: str):
    """A minimal vLLM stand-in. `app.state.healthy` toggles /health; `app.state.calls` records requests."""
    async def health(request: Request):
        return Response(status_code=200 if request.app.state.healthy else 503)

    async def completions(request: Request):
        body = await request.json()
        request.app.state.calls.append((request.url.path, body))
        model = body.get("model")
        if body.get("prompt") == "error":
            return JSONResponse({"error": {"message": f"The model `{model}` rejected this", "type": "BadRequestError",
                                           "param": None, "code": 400}}, status_code=400)
        chat = request.url.path == "/v1/chat/completions"
        chunk = {"id": "cmpl-1", "object": "chat.completion" if chat else "text_completion", "created": 1,
                 "model": model, "choices": [{"index": 0, "text": f"from {name}", "finish_reason": None}]}
        if body.get("stream") is True:
            async def events():
                for i in range(3):
                    chunk["choices"][0]["text"] = f"{name}:{i} \"model\": {model}"
                    if chat:  # an OpenAI chat chunk carries its text as a delta
                        chunk["object"] = "chat.completion.chunk"
                        chunk["choices"][0]["delta"] = {"content": chunk["choices"][0]["text"]}
                    yield ("data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n").encode()
                    await asyncio.sleep(0.01)
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        if chat:
            chunk["choices"][0]["message"] = {"role": "assistant", "content": f"from {name}"}
        chunk["served_by"] = name
        chunk["echo"] = {k: v for k, v in body.items() if k not in ("model", "prompt")}
        return Response(json.dumps(chunk, separators=(",", ":")), media_type="application/json")

    async def unload(request: Request):
        body = await request.json()
        request.app.state.calls.append(("/v1/unload_lora_adapter", body))
        return JSONResponse({"error": {"message": "not loaded", "type": "NotFoundError", "code": 404}},
                            status_code=404)

    app = Starlette(routes=[
        Route("/health", health),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload, methods=["POST"]),
    ])
    app.state.healthy = True
    app.state.calls = []
    app.state.name = name
    return app


def write_wordlevel_tokenizer(folder: Path, words: list[str] | None = None) -> Path:
    """A tokenizer.json where each whitespace-separated word is one token (unknown words -> [UNK])."""
    vocab = {"[UNK]": 0, "</s>": 1}
    for word in words or ["hello", "world", "good", "bad", "positive", "negative"]:
        vocab.setdefault(word, len(vocab))
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def tokenizer_dir(tmp_path: Path) -> Path:
    """The real base model's folder when its tokenizer.json is there (prepared model), else a tiny one."""
    real = base_model_path(Settings(base_model="default"))
    if (real / "tokenizer.json").is_file():
        return real
    return write_wordlevel_tokenizer(tmp_path / "tiny-model")


def store_settings(store: str, tmp_path: Path, prefix: str, **overrides) -> Settings:
    """Gateway Settings on `store`: "sqlite" (a file under tmp_path) or "redis" (the real Redis under a fresh key
    prefix starting with `prefix`), with tokenizer_dir's base model and one vLLM URL where nothing listens;
    `overrides` win."""
    common = {"data_dir": tmp_path / "data", "base_model": str(tokenizer_dir(tmp_path)),
              "vllm_urls": [f"http://127.0.0.1:{free_port()}"], "health_interval_s": 0.2, **overrides}
    if store == "sqlite":
        return Settings(redis_url=None, **common)
    return Settings(redis_url=REDIS_URL, redis_prefix=f"{prefix}-{uuid4().hex}", **common)


@contextlib.asynccontextmanager
async def gateway_env(settings):
    """A store for `settings` (SQLite, or Redis under its own prefix) and a gateway client on it; afterwards the
    store is closed and a Redis prefix's keys are dropped. Yields (client, backend)."""
    backend = open_backend(settings)
    try:
        async with gateway_client(settings, backend) as client:
            yield client, backend
    finally:
        await backend.close()
        if settings.redis_url:
            await drop_redis_keys(settings)


@contextlib.asynccontextmanager
async def gateway_client(settings, backend=None):
    """The gateway app with its lifespan running, and an httpx client talking to it in-process."""
    app = create_app(settings, backend=backend)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client
