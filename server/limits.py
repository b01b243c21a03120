"""Per-tenant inference limits: completions and chats in flight at once, and a request rate (token bucket).

Both are counted by each gateway process, in memory: a tenant's limits apply per gateway replica, so with R
replicas behind a balancer a tenant gets up to R times them. They exist so that one tenant cannot take the
shared upstream pool and vLLM's batch from the others; the fair share across replicas is the balancer's job.

A request over a limit is refused at once (429 `rate_limited` with Retry-After), before the store or vLLM is
touched: queueing it would hold a connection and memory for a tenant that is already over its share.
"""
from __future__ import annotations

import math
import time

from adapters.errors import MetaloraError

# A bucket refilled to full is the same as no bucket; past this many tenants the full ones are dropped.
_PRUNE_AT = 10_000


class TenantLimited(MetaloraError):
    """A tenant's in-flight or rate limit refused the request; nothing was forwarded. `limit` names which."""

    code = "rate_limited"

    def __init__(self, message: str, limit: str, retry_after_s: float):
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s


class Slot:
    """One admitted request's place in its tenant's in-flight count. `release` is idempotent; a slot dropped
    without it (a stream whose client left before the first chunk was asked for) is released when collected."""

    __slots__ = ("_limiter", "_tenant")

    def __init__(self, limiter: "TenantLimiter | None", tenant: str):
        self._limiter, self._tenant = limiter, tenant

    def release(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._release(self._tenant)

    def __del__(self):
        self.release()


class TenantLimiter:
    """`admit(tenant)` -> Slot, or TenantLimited. 0 turns a limit off."""

    def __init__(self, max_inflight: int, requests_per_s: float, burst: int,
                 clock=time.monotonic):
        self.max_inflight = max_inflight
        self.rate = requests_per_s
        self.burst = max(1, burst)
        self.clock = clock
        self._inflight: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)

    def inflight(self, tenant: str) -> int:
        return self._inflight.get(tenant, 0)

    def admit(self, tenant: str) -> Slot:
        # The in-flight check first: a request refused for concurrency does not spend a token.
        if self.max_inflight and self.inflight(tenant) >= self.max_inflight:
            raise TenantLimited(
                f"too many requests in flight: tenant {tenant!r} already has {self.max_inflight} completions"
                " running on this gateway (METALORA_TENANT_MAX_INFLIGHT); retry when one finishes",
                limit="max_inflight", retry_after_s=1.0)
        if self.rate:
            self._take_token(tenant)
        self._inflight[tenant] = self.inflight(tenant) + 1
        return Slot(self, tenant)

    def _take_token(self, tenant: str) -> None:
        t = self.clock()
        tokens, at = self._buckets.get(tenant, (float(self.burst), t))
        tokens = min(float(self.burst), tokens + (t - at) * self.rate)
        if tokens < 1.0:
            self._buckets[tenant] = (tokens, t)
            wait = (1.0 - tokens) / self.rate
            raise TenantLimited(
                f"request rate exceeded: tenant {tenant!r} may send {self.rate:g} completions per second (bursts of"
                f" {self.burst}; METALORA_TENANT_REQUESTS_PER_S); retry in {wait:.2f}s",
                limit="requests_per_s", retry_after_s=wait)
        self._buckets[tenant] = (tokens - 1.0, t)
        if len(self._buckets) > _PRUNE_AT:
            self._prune(t)

    def _prune(self, t: float) -> None:
        full = [k for k, (tokens, at) in self._buckets.items() if tokens + (t - at) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]

    def _release(self, tenant: str) -> None:
        left = self._inflight.get(tenant, 0) - 1
        if left > 0:
            self._inflight[tenant] = left
        else:
            self._inflight.pop(tenant, None)


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds; never 0, which some clients read as "now" and spin on."""
    return str(max(1, math.ceil(seconds)))
