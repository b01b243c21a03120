"""`create_app(settings, backend=None)`: the gateway ASGI app; `run(settings)`: serve it with uvicorn."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from adapters.backend import open_backend
from adapters.base_model import base_model_path, served_model_name
from adapters.logs import configure_logging
from adapters.settings import Settings
from server.adapter_io import body_limit
from server.auth import Authenticator
from server.errors import BodyLimitMiddleware, register_handlers
from server.routes import router
from server.services import ExampleTokenCounter, Gateway
from server.upstream import UpstreamPool, UpstreamTimeouts

log = logging.getLogger("metalora.gateway")


def create_app(settings: Settings, backend=None) -> FastAPI:
    """`backend` (adapters.backend.Backend) is opened from settings unless given; a given one is left open
    on shutdown (its owner closes it)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        counter = ExampleTokenCounter.from_model_dir(base_model_path(settings))
        owned = backend is None
        opened = open_backend(settings) if owned else backend
        pool = UpstreamPool(
            settings.vllm_urls, settings.health_interval_s,
            UpstreamTimeouts(connect_s=2.0, read_s=settings.upstream_timeout_s,
                             pool_s=settings.upstream_pool_timeout_s),
            max_connections=settings.upstream_max_connections, api_key=settings.vllm_api_key)
        try:
            # The gateway first: it hooks into the pool, so the first health checks already reconcile replicas.
            app.state.gateway = Gateway(settings, opened.store, pool, counter, served_model_name(settings),
                                        queue=opened.queue)
            await pool.start()
            app.state.auth = Authenticator(opened.store, settings.auth_required,
                                           open_until_keys=settings.auth == "auto")
            app.state.backend = opened
            await _announce_auth(settings, opened.store)
            yield
        finally:
            await pool.close()
            if owned:
                await opened.close()

    app = FastAPI(title="metalora gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    register_handlers(app)
    app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, limit_for=body_limit(settings))
    return app


async def _announce_auth(settings: Settings, store) -> None:
    if not settings.auth_required:
        log.warning("authentication is DISABLED (METALORA_AUTH=%s): every caller on %s:%s is tenant 'default'."
                    " Set METALORA_AUTH=required and create keys with `metalora keys create` before exposing"
                    " this gateway.", settings.auth, settings.host, settings.port)
        return
    try:
        if not await store.list_api_keys():
            log.warning("authentication is required but no API key exists yet: every request will be 401."
                        " Create one with `metalora keys create --tenant <id>`.")
    except Exception as exc:  # the store may be down at start; requests will say so (503)
        log.warning("could not list API keys at start: %s", exc)


def run(settings: Settings) -> None:
    """What `metalora gateway` (and the embedded supervisor) call."""
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        # OpenAI clients keep connections alive between requests; outlive their idle gaps.
        timeout_keep_alive=30,
        # Per-request access logging costs throughput on the proxy hot path; errors are still logged.
        access_log=False,
        log_level="info",
    )
