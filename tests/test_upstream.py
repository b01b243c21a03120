"""UpstreamPool: rendezvous affinity, failover, health checking, against real tiny HTTP servers."""
from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

from gateway_helpers import ServerThread, fake_replica, free_port
from server.errors import response_for
from server.upstream import Upstream, UpstreamFailed, UpstreamPool, UpstreamTimeouts, UpstreamUnavailable

NAMES = [f"default~adapter-{i}@v1" for i in range(600)]


def routed_to(pool: UpstreamPool, key: str | None) -> Upstream:
    """The replica a request with this routing key goes to first (the head of the pool's failover order)."""
    return pool.candidates(key)[0]


def pool_of(urls, interval=0.1):
    return UpstreamPool(urls, health_interval_s=interval, timeouts=UpstreamTimeouts(connect_s=1.0, read_s=10.0,
                                                                                     health_s=0.5))


async def test_affinity_is_stable_spreads_and_moves_only_the_dead_replicas_names():
    pool = pool_of([f"http://10.0.0.{i}:8001" for i in range(1, 4)])
    try:
        for u in pool.upstreams:
            u.healthy = True
        before = {n: routed_to(pool, n).url for n in NAMES}
        assert before == {n: routed_to(pool, n).url for n in NAMES}  # stable
        spread = Counter(before.values())
        assert len(spread) == 3 and min(spread.values()) > len(NAMES) * 0.2, spread

        dead = pool.upstreams[0]
        dead.healthy = False
        after = {n: routed_to(pool, n).url for n in NAMES}
        for n in NAMES:
            if before[n] != dead.url:
                assert after[n] == before[n]  # minimal movement: only the dead replica's names move
            else:
                assert after[n] != dead.url
        moved = Counter(after[n] for n in NAMES if before[n] == dead.url)
        assert len(moved) == 2  # the dead replica's names spread over the survivors

        dead.healthy = True
        assert {n: routed_to(pool, n).url for n in NAMES} == before  # and come back when it recovers
    finally:
        await pool.close()


async def test_base_model_requests_round_robin_over_healthy():
    pool = pool_of(["http://10.0.0.1:1", "http://10.0.0.2:1", "http://10.0.0.3:1"])
    try:
        for u in pool.upstreams:
            u.healthy = True
        pool.upstreams[1].healthy = False
        picks = Counter(routed_to(pool, None).url for _ in range(100))
        assert set(picks) == {"http://10.0.0.1:1", "http://10.0.0.3:1"}
        assert min(picks.values()) >= 40
    finally:
        await pool.close()


async def test_no_healthy_replica_raises_typed_error():
    pool = pool_of(["http://10.0.0.1:1"])
    try:
        pool.upstreams[0].healthy = False
        with pytest.raises(UpstreamUnavailable) as info:
            routed_to(pool, "default~x@v1")
        assert info.value.retry_after_s >= 1
    finally:
        await pool.close()


async def test_failover_skips_a_dead_replica_and_marks_it_unhealthy():
    live_app = fake_replica("live")
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    with ServerThread(live_app) as live:
        pool = pool_of([dead_url, live.url])
        try:
            for u in pool.upstreams:
                u.healthy = True  # as if the dead one died after the last health check
            dead = pool.upstreams[0]
            key = next(n for n in NAMES if routed_to(pool, n) is dead)
            body = json.dumps({"model": key, "prompt": "hi"}).encode()
            response = await pool.post("/v1/completions", body, key)
            assert response.status_code == 200
            assert response.json()["served_by"] == "live"
            assert dead.healthy is False and dead.last_error
            # From now on the key routes straight to the survivor.
            assert routed_to(pool, key).url == live.url
            # Streaming requests fail over the same way (before any byte reaches the client).
            dead.healthy = True
            streamed = await pool.post("/v1/completions", json.dumps(
                {"model": key, "prompt": "hi", "stream": True}).encode(), key, stream=True)
            try:
                text = (await streamed.aread()).decode()
            finally:
                await streamed.aclose()
            assert "live:0" in text and text.rstrip().endswith("data: [DONE]")
        finally:
            await pool.close()


@pytest.mark.parametrize("death", ["close", "reset"])
async def test_a_request_that_killed_its_replica_is_not_replayed_on_the_next(death):
    """A replica that reads the request and then dies (closing the connection, or resetting it as a SIGKILLed
    process does) may have been killed by that request: the next replica never sees it, the client gets a 503
    upstream_failed, and the dead replica leaves the rotation."""
    hits = []

    async def read_then_die(reader, writer):
        hits.append(await reader.read(65536))  # the request arrived...
        if death == "reset":
            writer.transport.abort()  # ...and the process died: RST, no answer
        else:
            writer.close()  # ...and the server went away: FIN, no answer

    dying_server = await asyncio.start_server(read_then_die, "127.0.0.1", 0)
    dying_url = f"http://127.0.0.1:{dying_server.sockets[0].getsockname()[1]}"
    live_app = fake_replica("live")
    with ServerThread(live_app) as live:
        pool = pool_of([dying_url, live.url])
        try:
            for u in pool.upstreams:
                u.healthy = True
            dying = pool.upstreams[0]
            key = next(n for n in NAMES if routed_to(pool, n) is dying)
            for stream in (False, True):
                dying.healthy = True
                with pytest.raises(UpstreamFailed) as caught:
                    await pool.post("/v1/completions", json.dumps(
                        {"model": key, "prompt": "hi", "stream": stream}).encode(), key, stream=stream)
                assert caught.value.code == "upstream_failed"
                assert dying.healthy is False and dying.last_error
            assert len(hits) == 2 and all(h.startswith(b"POST /v1/completions") for h in hits)
            assert live_app.state.calls == []  # never replayed
            response = response_for(caught.value)
            assert response.status_code == 503 and response.headers["Retry-After"]
            assert json.loads(response.body)["error"]["code"] == "upstream_failed"
        finally:
            await pool.close()
            dying_server.close()


async def test_a_request_that_never_reached_its_replica_goes_to_the_next():
    """Connection refused: the request was never sent, so the next replica in the order serves it, once."""
    live_app = fake_replica("live")
    with ServerThread(live_app) as live:
        pool = pool_of([f"http://127.0.0.1:{free_port()}", live.url])
        try:
            for u in pool.upstreams:
                u.healthy = True
            dead = pool.upstreams[0]
            key = next(n for n in NAMES if routed_to(pool, n) is dead)
            response = await pool.post("/v1/completions", json.dumps({"model": key, "prompt": "hi"}).encode(), key)
            assert response.status_code == 200 and response.json()["served_by"] == "live"
            assert len(live_app.state.calls) == 1
            assert dead.healthy is False and "ConnectError" in dead.last_error
        finally:
            await pool.close()


async def test_all_replicas_dead_is_upstream_unavailable_fast():
    pool = pool_of([f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"])
    try:
        for u in pool.upstreams:
            u.healthy = True
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(UpstreamUnavailable):
            await pool.post("/v1/completions", b"{}", "default~x@v1")
        assert loop.time() - start < 2.0
        assert not any(u.healthy for u in pool.upstreams)
    finally:
        await pool.close()


async def wait_until(predicate, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_health_checker_marks_dead_and_recovered_replicas():
    a_app, b_app = fake_replica("a"), fake_replica("b")
    with ServerThread(a_app) as a:
        b = ServerThread(b_app).start()
        pool = pool_of([a.url, b.url], interval=0.1)
        try:
            await pool.start()
            assert [u.healthy for u in pool.upstreams] == [True, True]

            a_app.state.healthy = False  # /health answers 503
            await wait_until(lambda: not pool.upstreams[0].healthy)
            assert "503" in pool.upstreams[0].last_error
            assert routed_to(pool, "default~anything@v1").url == b.url

            b.stop()  # process gone: connection refused
            await wait_until(lambda: not pool.upstreams[1].healthy)
            with pytest.raises(UpstreamUnavailable):
                routed_to(pool, "default~anything@v1")

            a_app.state.healthy = True
            await wait_until(lambda: pool.upstreams[0].healthy)
            assert pool.upstreams[0].last_error is None
            assert pool.snapshot()[0] == {"url": a.url, "healthy": True, "last_error": None}
        finally:
            await pool.close()
            if b.thread.is_alive():
                b.stop()


async def test_broadcast_reaches_every_replica_best_effort():
    a_app = fake_replica("a")
    dead_url = f"http://127.0.0.1:{free_port()}"
    with ServerThread(a_app) as a:
        pool = pool_of([a.url, dead_url])
        try:
            results = await pool.broadcast("/v1/unload_lora_adapter", {"lora_name": "default~x@v1"})
            assert results[a.url] == 404 and results[dead_url] == "ConnectError"
            assert a_app.state.calls == [("/v1/unload_lora_adapter", {"lora_name": "default~x@v1"})]
        finally:
            await pool.close()
