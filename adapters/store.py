"""The metadata store interface: adapters, versions and jobs. Two implementations behind it:
`RedisMetadataStore` (deployments) and `SqliteMetadataStore` (the embedded default), both checked by
one contract suite (tests/test_store_contract.py).

Every method is async. Multi-record changes are atomic in both implementations, so a crash or a
failed validation never leaves half a job registered.
"""
from __future__ import annotations

from typing import Any, Protocol

from adapters.records import Adapter, AdapterVersion, Job


class MetadataStore(Protocol):
    async def ping(self) -> None:
        """Raise StoreUnavailable when the backing service cannot be reached."""

    async def submit_job(
        self, tenant: str, adapter: str, num_examples: int, examples: list[dict[str, str]],
        options: dict[str, Any],
    ) -> Job:
        """Atomically: allocate the next version number of (tenant, adapter), create the version
        record (queued), the job record (queued), store the examples, and enqueue the job id."""

    async def get_job(self, job_id: str, tenant: str | None = None) -> Job:
        """Raise JobNotFound, also for another tenant's job. tenant=None is internal (worker) access."""

    async def get_job_examples(self, job_id: str) -> list[dict[str, str]]: ...

    async def update_job(self, job_id: str, **changes: Any) -> Job:
        """Partial update (status, step, loss, metrics, ...); keeps the version record's status in step."""

    async def finish_job(self, job_id: str, metrics: dict[str, Any]) -> bool:
        """Mark job succeeded and its version ready. Returns False (and changes nothing) when the
        adapter was deleted meanwhile, so a deleted adapter is never resurrected."""

    async def fail_job(self, job_id: str, error: str) -> None: ...

    async def list_adapters(self, tenant: str) -> list[Adapter]: ...

    async def get_adapter(self, tenant: str, name: str) -> Adapter:
        """Raise AdapterNotFound."""

    async def resolve(self, tenant: str, name: str, version: int | None) -> AdapterVersion:
        """Newest ready version (version=None) or the pinned one. Raise AdapterNotFound, or
        AdapterNotReady naming the newest version's status when none is ready."""

    async def delete_adapter(self, tenant: str, name: str) -> list[AdapterVersion]:
        """Remove the name and all its versions; return what was removed. Raise AdapterNotFound."""

    async def close(self) -> None: ...


class JobLease(Protocol):
    job_id: str
    delivery_count: int


class JobQueue(Protocol):
    """At-least-once job delivery. A claimed job stays leased while its worker heartbeats; a lease
    that expires (worker died) is handed to another worker. `delivery_count` lets the worker bound
    retries."""

    async def claim(self, consumer: str, block_ms: int) -> JobLease | None: ...

    async def heartbeat(self, lease: JobLease) -> None: ...

    async def ack(self, lease: JobLease) -> None: ...

    async def close(self) -> None: ...
