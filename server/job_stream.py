"""Following a job's event log as Server-Sent Events (GET /adapt/{id}/events?stream=true).

The stores have no push, so the gateway polls: the job first, then its events, so once the job is seen
finished every event it wrote (its terminal one last) is in the log being read, and the stream ends there.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from adapters.errors import JobNotFound, StoreUnavailable
from adapters.records import JobEvent
from adapters.store import MetadataStore
from server.protocol import JobEventResponse

log = logging.getLogger("metalora.gateway")

POLL_S = 0.25
STORE_RETRY_S = 1.0
# Proxies close idle connections; a comment frame now and then keeps a quiet stream (a queued job) open.
KEEPALIVE_S = 15.0
PAGE = 200


async def follow(store: MetadataStore, job_id: str, after: int) -> AsyncIterator[list[JobEvent]]:
    """Batches of the events after `after` (an empty one per idle poll) until the job ended and all its events
    were yielded. A store outage pauses the stream rather than ending it."""
    while True:
        try:
            job = await store.get_job(job_id)
            events = await store.list_job_events(job_id, after, PAGE)
        except JobNotFound:  # expired while followed
            return
        except StoreUnavailable as exc:
            log.warning("following job %s: %s; retrying", job_id, exc)
            yield []
            await asyncio.sleep(STORE_RETRY_S)
            continue
        if events:
            after = events[-1].id
        yield events
        if len(events) == PAGE:
            continue
        if job.status.finished:
            return
        await asyncio.sleep(POLL_S)


async def sse_frames(batches: AsyncIterator[list[JobEvent]]) -> AsyncIterator[str]:
    quiet_since = time.monotonic()
    async for events in batches:
        for event in events:
            yield JobEventResponse.from_event(event).sse()
        if events:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= KEEPALIVE_S:
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
