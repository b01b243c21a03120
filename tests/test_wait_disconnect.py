"""`?wait=true` stops polling the store once its client has gone (issue 19, item 8), on both stores.

A real gateway (uvicorn) with no worker, so the job never finishes; the client asks to wait up to a minute and
hangs up after one second. The store the gateway polls is the real one, counted: its job reads must stop.
"""
from __future__ import annotations

import asyncio
import time
from uuid import uuid4

import httpx
import pytest

from adapters.settings import Settings
from gateway_helpers import ServerThread, free_port, tokenizer_dir
from helpers import REDIS_URL, drop_redis_keys
from server.app import create_app

BODY = {"adapter": "waits", "examples": [{"prompt": "hello world", "completion": "positive"}]}


class CountingStore:
    """The gateway's real store, with its get_job calls counted."""

    def __init__(self, store):
        self._store = store
        self.reads = 0

    async def get_job(self, *args, **kwargs):
        self.reads += 1
        return await self._store.get_job(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._store, name)


@pytest.fixture(params=["sqlite", "redis"])
def gateway(request, tmp_path):
    common = dict(data_dir=tmp_path / "data", base_model=str(tokenizer_dir(tmp_path)), auth="disabled",
                  vllm_urls=[f"http://127.0.0.1:{free_port()}"], health_interval_s=0.5)
    settings = (Settings(redis_url=None, **common) if request.param == "sqlite"
                else Settings(redis_url=REDIS_URL, redis_prefix=f"test-wait-{uuid4().hex}", **common))
    app = create_app(settings)
    server = ServerThread(app, lifespan="on").start()
    counting = CountingStore(app.state.gateway.store)
    app.state.gateway.store = counting
    yield server, counting
    server.stop()
    if settings.redis_url:
        asyncio.run(drop_redis_keys(settings))


async def reads_after_hanging_up(server, counting, method: str, path: str, **kwargs) -> tuple[int, int]:
    """(job reads in the 3 s after the client hung up, reads before), the client waiting 1 s of a 60 s wait."""
    async with httpx.AsyncClient(base_url=server.url, timeout=1.0) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.request(method, path, params={"wait": "true", "timeout": 60}, **kwargs)
    await asyncio.sleep(1.2)  # one poll interval (at most 1 s) for the gateway to notice
    before = counting.reads
    await asyncio.sleep(3.0)
    return counting.reads - before, before


async def test_wait_stops_polling_when_the_client_hangs_up(gateway):
    server, counting = gateway
    more, before = await reads_after_hanging_up(server, counting, "POST", "/adapt", json=BODY)
    assert before >= 2  # it did poll while the client was there
    assert more == 0, f"the gateway kept polling a job for a client that left ({more} reads in 3 s)"

    async with httpx.AsyncClient(base_url=server.url) as client:
        job = (await client.get("/adapt", params={"limit": 1})).json()["data"][0]
        assert job["status"] == "queued"
        t = time.perf_counter()
        waited = await client.get(f"/adapt/{job['id']}", params={"wait": "true", "timeout": 0.5})
        assert waited.status_code == 200 and time.perf_counter() - t >= 0.5  # a present client still waits
    more, _ = await reads_after_hanging_up(server, counting, "GET", f"/adapt/{job['id']}")
    assert more == 0
