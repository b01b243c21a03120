"""One JobQueue contract, run against both implementations (SQLite lease rows, Redis Streams group).

Settings.lease_s is 0.5 s here, so expiry tests sleep ~0.7 s.
"""
from __future__ import annotations

import asyncio
import time
from uuid import uuid4

import pytest

from adapters.backend import Backend, open_backend
from adapters.settings import Settings
from adapters.store import LeaseLost

REDIS_URL = "redis://127.0.0.1:6379/0"
LEASE_S = 0.5
PAST_LEASE_S = LEASE_S + 0.25


@pytest.fixture(params=["sqlite", "redis"])
async def backend(request, tmp_path):
    redis_url = REDIS_URL if request.param == "redis" else None
    settings = Settings(data_dir=tmp_path, redis_url=redis_url, redis_prefix=f"test-{uuid4().hex}", lease_s=LEASE_S)
    b = open_backend(settings)
    yield b
    await b.close()
    if redis_url:
        import redis.asyncio as aioredis

        client = aioredis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def submit(b: Backend, n: int = 1) -> list[str]:
    return [(await b.store.submit_job("acme", "adp", 1, [{"prompt": "p", "completion": "c"}], {})).id
            for _ in range(n)]


async def test_claim_in_order_then_ack(backend: Backend):
    q = backend.queue
    first, second = await submit(backend, 2)
    lease = await q.claim("w1", 0)
    assert (lease.job_id, lease.delivery_count) == (first, 1)
    assert (await q.claim("w2", 0)).job_id == second
    assert await q.claim("w3", 0) is None  # both leased, neither expired
    await q.ack(lease)
    await asyncio.sleep(PAST_LEASE_S)
    # The acked job is gone for good; the un-acked one comes back.
    again = await q.claim("w3", 0)
    assert (again.job_id, again.delivery_count) == (second, 2)
    assert await q.claim("w3", 0) is None


async def test_expired_lease_goes_to_another_worker(backend: Backend):
    q = backend.queue
    [job_id] = await submit(backend)
    dead = await q.claim("w1", 0)
    await asyncio.sleep(PAST_LEASE_S)
    taken = await q.claim("w2", 0)
    assert (taken.job_id, taken.delivery_count) == (job_id, 2)
    with pytest.raises(LeaseLost):  # the slow worker learns it must stop
        await q.heartbeat(dead)
    await q.heartbeat(taken)
    assert await q.claim("w1", 0) is None  # the failed heartbeat did not steal it back
    await asyncio.sleep(PAST_LEASE_S)
    assert (await q.claim("w3", 0)).delivery_count == 3


async def test_heartbeat_keeps_lease(backend: Backend):
    q = backend.queue
    await submit(backend)
    lease = await q.claim("w1", 0)
    deadline = time.monotonic() + 3 * LEASE_S
    while time.monotonic() < deadline:
        await q.heartbeat(lease)
        assert await q.claim("w2", 0) is None
        await asyncio.sleep(LEASE_S / 3)
    await q.ack(lease)
    await asyncio.sleep(PAST_LEASE_S)
    assert await q.claim("w2", 0) is None


async def test_concurrent_claimers_get_each_job_once(backend: Backend):
    q = backend.queue
    jobs = await submit(backend, 12)

    async def drain(consumer: str) -> list[str]:
        got = []
        while (lease := await q.claim(consumer, 0)) is not None:
            got.append(lease.job_id)
        return got

    results = await asyncio.gather(*(drain(f"w{i}") for i in range(4)))
    claimed = [j for r in results for j in r]
    assert sorted(claimed) == sorted(jobs)


async def test_claim_blocks_until_a_job_arrives(backend: Backend):
    q = backend.queue
    started = time.monotonic()
    assert await q.claim("w1", 300) is None
    assert time.monotonic() - started >= 0.25

    waiter = asyncio.create_task(q.claim("w1", 5000))
    await asyncio.sleep(0.2)
    [job_id] = await submit(backend)
    lease = await asyncio.wait_for(waiter, 3)
    assert lease.job_id == job_id


async def test_long_claim_picks_up_lease_that_expires_while_waiting(backend: Backend):
    # A worker blocked in claim must notice a dead worker's job, not only brand-new ones.
    q = backend.queue
    [job_id] = await submit(backend)
    await q.claim("dead", 0)
    started = time.monotonic()
    lease = await q.claim("w2", 3000)
    assert lease.job_id == job_id and lease.delivery_count == 2
    assert time.monotonic() - started < 2.5
