"""The vLLM replica pool: health checks, adapter-affinity routing, failover, one shared HTTP client.

Routing: rendezvous (highest-random-weight) hashing of the vLLM adapter name over the *healthy* replicas,
so an adapter always lands on the same replica (its LoRA stays warm in that replica's cache) and moves
only when that replica goes unhealthy; the other adapters do not move. Requests without an affinity key
(the base model) are spread round-robin.

Failover: a request is retried on the next replica in the adapter's rendezvous order only when it never
reached the first one (connection refused or timed out, no pooled connection free). Once it was sent, a
failure (the replica closing the connection or resetting it, a read timeout) is not replayed elsewhere: the
request itself may be what killed the replica, and replaying it would take the next one down too. A replica
that fails either way is marked unhealthy at once; the background checker marks it healthy again once its
`/health` answers 200.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import httpx

from adapters.errors import MetaloraError
from adapters.replicas import engine_headers

log = logging.getLogger("metalora.upstream")


class UpstreamUnavailable(MetaloraError):
    """No healthy vLLM replica can take the request; the client should retry shortly."""

    code = "upstream_unavailable"

    def __init__(self, message: str = "no healthy inference replica is available", retry_after_s: float = 2.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UpstreamFailed(UpstreamUnavailable):
    """The replica failed after the request reached it; it was not replayed on another replica."""

    code = "upstream_failed"


# Errors raised before any byte of the request left the gateway: no replica saw it, so another may take it.
# (So may httpx.PoolTimeout, but it means this replica's connections are all busy, not that it is dead.)
NOT_SENT_ERRORS: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout)
# Transport errors once the request was (maybe partly) sent: the replica broke while holding it.
SENT_ERRORS: tuple[type[Exception], ...] = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


class UpstreamTimeout(MetaloraError):
    """The replica took the request but did not answer within the read timeout (METALORA_UPSTREAM_TIMEOUT_S)."""

    code = "upstream_timeout"


@dataclass(frozen=True)
class UpstreamTimeouts:
    connect_s: float = 2.0
    read_s: float = 300.0
    write_s: float = 30.0
    health_s: float = 2.0
    # Waiting for a free pooled connection: short, so a saturated pool answers 503 at once instead of holding
    # every request for a whole read timeout.
    pool_s: float = 5.0

    def httpx(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect_s, read=self.read_s, write=self.write_s, pool=self.pool_s)


@dataclass
class Upstream:
    url: str
    healthy: bool = False
    last_error: str | None = "not checked yet"
    last_check: float = 0.0
    # Precomputed so scoring a key is one hash, no string formatting of the URL on the hot path.
    _salt: bytes = field(default=b"", repr=False)

    def __post_init__(self):
        self._salt = self.url.encode()

    def score(self, key: bytes) -> int:
        digest = hashlib.blake2b(self._salt + b"\x00" + key, digest_size=8).digest()
        return int.from_bytes(digest, "big")

    def snapshot(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "last_error": self.last_error}


def rendezvous_order(upstreams: list[Upstream], key: str) -> list[Upstream]:
    """All given replicas, best first for `key` (HRW hashing: stable, and minimal movement)."""
    raw = key.encode()
    return sorted(upstreams, key=lambda u: u.score(raw), reverse=True)


class UpstreamPool:
    def __init__(
        self,
        urls: list[str],
        health_interval_s: float = 2.0,
        timeouts: UpstreamTimeouts | None = None,
        max_connections: int = 1024,
        api_key: str | None = None,
    ):
        if not urls:
            raise ValueError("UpstreamPool needs at least one URL")
        self.upstreams = [Upstream(u.rstrip("/")) for u in urls]
        self.health_interval_s = health_interval_s
        self.timeouts = timeouts or UpstreamTimeouts()
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                              # Below vLLM's 5 s keep-alive: a request sent on a connection the replica has just
                              # closed fails after sending, and is then not retried.
                              keepalive_expiry=4.0)
        # ONE client for all proxied traffic: connection pooling and keep-alive to every replica.
        self.client = httpx.AsyncClient(timeout=self.timeouts.httpx(), limits=limits,
                                        headers=engine_headers(api_key))
        # Health checks use their own small client so a saturated proxy pool cannot starve them.
        self._health_client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeouts.health_s))
        self._rr = itertools.count()
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        # Called with a replica's URL each time it turns healthy (its first check included), in the background.
        self.on_recovered: Callable[[str], Awaitable[object]] | None = None
        self._recovering: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Check every replica once (so the first requests route correctly), then keep checking."""
        await self.check_all()
        if self._task is None:
            self._task = asyncio.create_task(self._health_loop(), name="metalora-upstream-health")

    async def close(self) -> None:
        for task in list(self._recovering):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        await self.client.aclose()
        await self._health_client.aclose()

    async def _health_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.health_interval_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.check_all()
            except Exception:  # never let the checker die
                log.exception("upstream health check failed")

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(u) for u in self.upstreams))

    async def _check(self, upstream: Upstream) -> None:
        try:
            response = await self._health_client.get(upstream.url + "/health")
            ok = response.status_code == 200
            error = None if ok else f"/health answered {response.status_code}"
        except httpx.HTTPError as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if ok != upstream.healthy:
            log.warning("upstream %s is now %s%s", upstream.url, "healthy" if ok else "unhealthy",
                        "" if ok else f" ({error})")
        recovered = ok and not upstream.healthy
        upstream.healthy, upstream.last_error, upstream.last_check = ok, error, time.time()
        if recovered and self.on_recovered is not None:
            task = asyncio.create_task(self._recovered(upstream.url))
            self._recovering.add(task)
            task.add_done_callback(self._recovering.discard)

    async def _recovered(self, url: str) -> None:
        try:
            await self.on_recovered(url)
        except Exception as exc:  # best effort: the next recovery tries again
            log.warning("after %s recovered: %s: %s", url, type(exc).__name__, exc)

    def mark_failed(self, upstream: Upstream, exc: Exception) -> None:
        if upstream.healthy:
            log.warning("upstream %s failed (%s); routing around it", upstream.url, type(exc).__name__)
        upstream.healthy = False
        upstream.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        self._wake.set()  # re-check soon rather than after a full interval

    # ---------------------------------------------------------------- routing
    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.health_interval_s))

    def healthy(self) -> list[Upstream]:
        return [u for u in self.upstreams if u.healthy]

    def candidates(self, adapter_key: str | None) -> list[Upstream]:
        """Healthy replicas in the order to try them. Raise UpstreamUnavailable when there are none."""
        healthy = self.healthy()
        if not healthy:
            raise UpstreamUnavailable(retry_after_s=self.retry_after_s)
        if adapter_key is None:
            start = next(self._rr) % len(healthy)
            return healthy[start:] + healthy[:start]
        if len(healthy) == 1:
            return healthy
        return rendezvous_order(healthy, adapter_key)

    def snapshot(self) -> list[dict]:
        return [u.snapshot() for u in self.upstreams]

    # ---------------------------------------------------------------- requests
    async def post(self, path: str, content: bytes, adapter_key: str | None, *, stream: bool = False
                   ) -> httpx.Response:
        """POST a JSON body to the affine replica, failing over while the request has not been sent.

        With stream=True the response is returned with its body unread: the caller must
        `aclose()` it. Nothing has been sent to the gateway's client yet at this point, so a
        replica dying before it answers is still invisible to the client.
        """
        last_exc: Exception | None = None
        for upstream in self.candidates(adapter_key):
            request = self.client.build_request(
                "POST", upstream.url + path, content=content, headers={"content-type": "application/json"})
            try:
                return await self._send(request, stream)
            except httpx.PoolTimeout as exc:
                last_exc = exc
            except NOT_SENT_ERRORS as exc:
                self.mark_failed(upstream, exc)
                last_exc = exc
            except SENT_ERRORS as exc:
                self.mark_failed(upstream, exc)
                raise UpstreamFailed(
                    f"the inference replica failed while handling this request ({type(exc).__name__}); it was"
                    " not retried on another replica", retry_after_s=self.retry_after_s) from exc
        raise UpstreamUnavailable(
            f"no inference replica could be reached ({type(last_exc).__name__})",
            retry_after_s=self.retry_after_s) from last_exc

    async def _send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        """client.send, with a read or write timeout as UpstreamTimeout (504): the replica holds the request and
        is slow, not gone, so no other replica is tried. Every other error passes through to the failover."""
        try:
            return await self.client.send(request, stream=stream)
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
            raise UpstreamTimeout(
                f"the inference replica did not answer within {self.timeouts.read_s:g}s"
                " (METALORA_UPSTREAM_TIMEOUT_S)") from exc

    async def broadcast(self, path: str, json_body: dict, timeout_s: float = 5.0) -> dict[str, int | str]:
        """POST to every replica (healthy or not), best effort: {url: status code or error text}."""

        async def one(upstream: Upstream) -> int | str:
            try:
                response = await self.client.post(upstream.url + path, json=json_body, timeout=timeout_s)
                return response.status_code
            except httpx.HTTPError as exc:
                return type(exc).__name__

        results = await asyncio.gather(*(one(u) for u in self.upstreams))
        return dict(zip((u.url for u in self.upstreams), results))
