"""Per-tenant inference isolation (issue 19, item 3) and the upstream pool's timeouts, through a real gateway
(uvicorn, its own lifespan) in front of a real slow HTTP server standing in for vLLM: it answers after the
`delay` the request body names, so the gateway's limits and timeouts meet real sockets and a real httpx pool.

- a tenant at its in-flight limit gets 429 rate_limited with Retry-After while another tenant is served at once;
  a stream holds its slot to its last byte, and a client that walks away mid-stream frees it;
- a tenant over its request rate gets 429 with the wait in Retry-After, and is served again after it;
- no free pooled connection for the pool timeout: 503 at once, not after a whole read timeout;
- a replica that does not answer within the read timeout: 504 upstream_timeout in the one error shape (was a 500).
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adapters.api_keys import new_api_key
from adapters.backend import open_backend
from adapters.settings import Settings
from gateway_helpers import ServerThread, tokenizer_dir
from server.app import create_app

TENANTS = ("acme", "globex")


def slow_replica() -> Starlette:
    """A vLLM stand-in that waits `delay` seconds (a stream: spread over its 3 chunks) before answering."""
    async def health(request: Request):
        return Response(status_code=200)

    async def completions(request: Request):
        body = await request.json()
        delay = float(body.get("delay", 0))
        chunk = {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                 "choices": [{"index": 0, "text": "ok", "finish_reason": None}]}
        if body.get("stream") is True:
            async def events():
                for _ in range(3):
                    await asyncio.sleep(delay / 3)
                    yield ("data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n").encode()
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        await asyncio.sleep(delay)
        return JSONResponse(chunk)

    return Starlette(routes=[Route("/health", health), Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture(scope="module")
def replica():
    server = ServerThread(slow_replica()).start()
    yield server
    server.stop()


class Gateway:
    def __init__(self, url: str, keys: dict[str, str]):
        self.url, self.keys = url, keys

    def client(self, tenant: str, timeout: float = 30.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=timeout,
                                 headers={"Authorization": f"Bearer {self.keys[tenant]}"})


@pytest.fixture
def start_gateway(tmp_path, replica):
    servers = []

    async def start(**limits) -> Gateway:
        settings = Settings(data_dir=tmp_path / "data", redis_url=None, base_model=str(tokenizer_dir(tmp_path)),
                            vllm_urls=[replica.url], health_interval_s=0.2, auth="required", **limits)
        backend = open_backend(settings)
        keys = {}
        for tenant in TENANTS:
            record, keys[tenant] = new_api_key(tenant)
            await backend.store.create_api_key(record)
        await backend.close()
        server = ServerThread(create_app(settings), lifespan="on").start()
        servers.append(server)
        return Gateway(server.url, keys)

    yield start
    for server in servers:
        server.stop()


def complete(client: httpx.AsyncClient, delay: float = 0.0, **extra):
    return client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, "delay": delay, **extra})


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    assert body["error"]["code"] == code, body
    return body["error"]


async def test_inflight_limit_refuses_only_the_tenant_over_it(start_gateway):
    gw = await start_gateway(tenant_max_inflight=2, tenant_requests_per_s=0)
    async with gw.client("acme") as acme, gw.client("globex") as globex:
        slow = [asyncio.create_task(complete(acme, delay=1.5)) for _ in range(2)]
        await asyncio.sleep(0.4)  # both are at the replica now
        refused = await complete(acme)
        error = assert_error(refused, 429, "rate_limited")
        assert error["type"] == "rate_limit_error" and "in flight" in error["message"]
        assert refused.headers["Retry-After"] == "1"
        t = time.perf_counter()
        other = await complete(globex)  # another tenant is not held back by acme's slots
        assert other.status_code == 200 and time.perf_counter() - t < 1.0, other.text
        assert [r.status_code for r in await asyncio.gather(*slow)] == [200, 200]
        assert (await complete(acme)).status_code == 200  # slots come back when the requests end


async def test_a_stream_holds_its_slot_until_its_end_or_its_client_leaving(start_gateway):
    gw = await start_gateway(tenant_max_inflight=1, tenant_requests_per_s=0)
    async with gw.client("acme") as acme:
        async with acme.stream("POST", "/v1/completions",
                               json={"prompt": "hi", "stream": True, "delay": 1.5}) as stream:
            assert stream.status_code == 200
            assert_error(await complete(acme), 429, "rate_limited")
            chunks = [line async for line in stream.aiter_lines() if line.startswith("data:")]
        assert chunks[-1] == "data: [DONE]"
        assert (await complete(acme)).status_code == 200

        # The client walks away after the first chunk: the gateway closes the relay and frees the slot.
        async with acme.stream("POST", "/v1/completions",
                               json={"prompt": "hi", "stream": True, "delay": 30}) as stream:
            assert stream.status_code == 200
        deadline = time.monotonic() + 5
        while (response := await complete(acme)).status_code == 429 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert response.status_code == 200, response.text


async def test_request_rate_limit_with_retry_after(start_gateway):
    gw = await start_gateway(tenant_max_inflight=0, tenant_requests_per_s=1.0, tenant_request_burst=2)
    async with gw.client("acme") as acme, gw.client("globex") as globex:
        assert [(await complete(acme)).status_code for _ in range(2)] == [200, 200]  # the burst
        refused = await complete(acme)
        error = assert_error(refused, 429, "rate_limited")
        assert error["param"] == "requests_per_s"
        assert 1 <= int(refused.headers["Retry-After"]) <= 2
        assert (await complete(globex)).status_code == 200  # globex has a bucket of its own
        await asyncio.sleep(int(refused.headers["Retry-After"]))
        assert (await complete(acme)).status_code == 200


async def test_pool_timeout_is_a_prompt_503(start_gateway):
    # One pooled connection, held by a slow request: the next one waits the pool timeout, not the read timeout.
    gw = await start_gateway(upstream_max_connections=1, upstream_pool_timeout_s=0.3, upstream_timeout_s=30,
                             tenant_requests_per_s=0)
    async with gw.client("acme") as acme, gw.client("globex") as globex:
        holder = asyncio.create_task(complete(acme, delay=2.5))
        await asyncio.sleep(0.4)
        t = time.perf_counter()
        waited = await complete(globex)
        elapsed = time.perf_counter() - t
        assert waited.status_code == 503, waited.text
        body = waited.json()
        assert set(body) == {"error"} and body["error"]["type"] == "service_unavailable_error", body
        assert int(waited.headers["Retry-After"]) >= 1
        assert elapsed < 1.5, elapsed
        assert (await holder).status_code == 200


async def test_read_timeout_is_a_504_in_the_error_shape(start_gateway):
    gw = await start_gateway(upstream_timeout_s=0.5)
    async with gw.client("acme") as acme:
        t = time.perf_counter()
        error = assert_error(await complete(acme, delay=3), 504, "upstream_timeout")
        assert time.perf_counter() - t < 2.5
        assert error["type"] == "timeout_error" and "0.5s" in error["message"]
        assert (await complete(acme, delay=0)).status_code == 200  # the replica was not marked dead
