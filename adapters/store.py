"""The metadata store interface: adapters, versions and jobs. Two implementations behind it:
`RedisMetadataStore` (deployments) and `SqliteMetadataStore` (the embedded default), both checked by
one contract suite (tests/test_store_contract.py).

Every method is async. Multi-record changes are atomic in both implementations, so a crash or a
failed validation never leaves half a job registered.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from adapters.api_keys import ApiKey
from adapters.errors import (
    AdapterNotFound, AdapterNotReady, InitNotFound, InitNotReady, JobNotCancellable, MetaloraError, QuotaExceeded,
    VersionPruned,
)
from adapters.idempotency import Dedupe
from adapters.job_events import status_event
from adapters.records import (
    Adapter, AdapterVersion, Job, JobErrorCode, JobEvent, JobKind, JobStatus, VersionStatus, now,
)


@dataclass(frozen=True)
class TenantQuota:
    """Limits submit_job_once enforces, for adapt and init jobs alike, in the same transaction as its writes
    (None = unlimited)."""

    max_active_jobs: int | None = None  # jobs queued or running
    max_adapters: int | None = None  # adapter names with at least one version
    # Bytes of the tenant's stored versions, adapters' and inits' (AdapterVersion.size_bytes of the ready ones): a
    # job is refused once the tenant is at it (its size is known only when it is written), an upload that would
    # pass it.
    max_bytes: int | None = None


@dataclass
class JobPage:
    """One page of a tenant's jobs, newest first; `has_more`: older ones match too (pass the last id as
    `after`)."""

    jobs: list[Job]
    has_more: bool


class MetadataStore(Protocol):
    async def ping(self) -> None:
        """Raise StoreUnavailable when the backing service cannot be reached."""

    async def submit_job(
        self, tenant: str, adapter: str, num_examples: int, examples: list[dict[str, str]],
        options: dict[str, Any], quota: TenantQuota | None = None,
    ) -> Job:
        """Atomically: check `quota` (QuotaExceeded, nothing written), allocate the next version number of
        (tenant, adapter), create the version record (queued), the job record (queued), store the
        examples, and enqueue the job id."""

    async def submit_job_once(
        self, tenant: str, adapter: str, num_examples: int, examples: list[dict[str, Any]],
        options: dict[str, Any], quota: TenantQuota | None = None, dedupe: Dedupe | None = None,
        kind: JobKind = JobKind.ADAPT,
    ) -> tuple[Job, bool]:
        """submit_job, unless `dedupe` finds the job this request already created (adapters/idempotency.py):
        then (that job, True) and nothing is written; a replay needs no quota. Raise IdempotencyKeyReused when
        the key was used for another request. Otherwise (new job, False), remembering key and fingerprint.
        kind=INIT submits an init family (submit_init_job) by the same rules: `adapter` is the init's name,
        `examples` its tasks."""

    async def list_jobs(self, tenant: str, limit: int, after: str | None = None, adapter: str | None = None,
                        status: JobStatus | None = None) -> JobPage:
        """The tenant's jobs newest first (created_at, then id), those older than job `after` (JobNotFound
        when it is not the tenant's), only `adapter`'s / in `status` when given."""

    async def cancel_job(self, job_id: str, tenant: str | None = None) -> Job:
        """Queued or running -> cancelled (its version too); the worker running it stops at its next progress
        report. A cancelled job is returned as it is; a succeeded or failed one raises JobNotCancellable."""

    async def list_job_events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        """The job's events with id > `after`, oldest first (the newest keys.JOB_EVENTS_KEPT are kept).
        Callers check the tenant with get_job first."""

    async def get_job(self, job_id: str, tenant: str | None = None) -> Job:
        """Raise JobNotFound, also for another tenant's job. tenant=None is internal (worker) access."""

    async def get_job_examples(self, job_id: str) -> list[dict[str, str]]: ...

    async def update_job(self, job_id: str, *, events: Sequence[JobEvent] = (), **changes: Any) -> Job:
        """Partial update (status, step, loss, metrics, ...); keeps the version record's status in step and
        appends `events` (and the status event of a status change) to the job's log. A finished job is left
        as it is and returned: a worker learns from the result that its job was cancelled."""

    async def finish_job(self, job_id: str, metrics: dict[str, Any], size_bytes: int = 0) -> bool:
        """Mark job succeeded and its version ready, `size_bytes` its files' size (added to the tenant's usage),
        and make it the adapter's latest (the one record `resolve(name)` reads) unless a newer version already
        is. Returns False (and changes nothing) when the adapter was deleted meanwhile, so a deleted adapter is
        never resurrected."""

    async def fail_job(self, job_id: str, error: str, code: str = JobErrorCode.TRAINING_ERROR.value) -> None: ...

    async def list_adapters(self, tenant: str) -> list[Adapter]: ...

    async def get_adapter(self, tenant: str, name: str) -> Adapter:
        """Raise AdapterNotFound."""

    async def resolve(self, tenant: str, name: str, version: int | None) -> AdapterVersion:
        """Newest ready version (version=None) or the pinned one, reading one record (the adapter's latest
        pointer, or the pinned version), not the version list. Raise AdapterNotFound (VersionPruned for a pinned
        version retention removed), or AdapterNotReady naming the newest version's status when none is ready."""

    async def prune_versions(self, tenant: str, adapter: str, keep: int) -> list[AdapterVersion]:
        """Retention (retention_plan): remove, in one transaction, the records of the versions beyond the newest
        `keep` ready ones, subtract their bytes from the tenant's usage and remember them as pruned (a pinned
        request for one is VersionPruned). The latest version and queued or running ones are never removed. The
        caller deletes their files (adapters/retention.py). Returns what was removed."""

    async def tenant_usage(self, tenant: str) -> int:
        """Bytes of the tenant's stored adapter and init versions (what TenantQuota.max_bytes limits)."""

    async def delete_adapter(self, tenant: str, name: str) -> list[AdapterVersion]:
        """Remove the name and all its versions; return what was removed. Its queued and running jobs are
        cancelled (code adapter_deleted) in the same transaction. Raise AdapterNotFound."""

    # --- API keys (records only; plaintext keys never reach a store) ---
    async def create_api_key(self, key: ApiKey) -> None: ...

    async def api_key_by_hash(self, key_hash: str) -> ApiKey | None:
        """The record for a presented key's hash, revoked or not; None when unknown."""

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKey]:
        """Oldest first; every tenant's when tenant is None."""

    async def revoke_api_key(self, key_id: str) -> ApiKey:
        """Mark revoked (idempotent; the record stays for listing). Raise ApiKeyNotFound."""

    # --- versions not made by a job: uploads ---
    async def allocate_version(self, tenant: str, adapter: str) -> int:
        """Reserve the next version number of (tenant, adapter) without creating a record, so its artifact can be
        written under its final name before anyone can resolve it. A number is never reused, used or not."""

    async def add_version(self, version: AdapterVersion, quota: TenantQuota | None = None) -> None:
        """Record a version whose artifact is already in place (allocated by allocate_version), checking
        `quota.max_adapters` and `quota.max_bytes` (with its size_bytes) in the same transaction (QuotaExceeded:
        nothing written). A ready version becomes the latest unless a newer one already is."""

    # --- inits (POST /v1/inits): versioned like adapters, in their own namespace (records of kind INIT) ---
    async def submit_init_job(
        self, tenant: str, name: str, num_examples: int, tasks: list[dict[str, Any]], options: dict[str, Any],
        quota: TenantQuota | None = None,
    ) -> Job:
        """submit_job_once(kind=INIT) without dedupe, returning the job: atomically check `quota` (check_quota and
        check_bytes, as for an adapt job; nothing written on QuotaExceeded), allocate init `name`'s next version,
        create its version record and a job of kind INIT (both queued), store `tasks` as the job's examples, enqueue
        the job on the same queue. A ready init version's size_bytes count in tenant_usage like an adapter's."""

    async def list_inits(self, tenant: str) -> list[Adapter]: ...

    async def get_init(self, tenant: str, name: str) -> Adapter:
        """Raise InitNotFound."""

    async def resolve_init(self, tenant: str, name: str, version: int | None) -> AdapterVersion:
        """resolve() for inits: InitNotFound, or InitNotReady when none is ready."""

    async def delete_init(self, tenant: str, name: str) -> list[AdapterVersion]:
        """delete_adapter() for inits: its queued and running jobs are cancelled in the same transaction, and its
        ready versions' bytes leave the tenant's usage."""

    # --- job metrics: counters the workers add to and /metrics reads (adapters/job_stats.py) ---
    async def add_stats(self, increments: dict[str, float]) -> None:
        """Add each amount to its counter, atomically."""

    async def read_stats(self) -> dict[str, float]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class QueueDepth:
    waiting: int  # not claimed by a worker yet
    leased: int  # claimed by a worker: running (a dead worker's job counts until its lease is taken over)


class JobLease(Protocol):
    job_id: str
    delivery_count: int


class JobQueue(Protocol):
    """At-least-once job delivery. A claimed job stays leased while its worker heartbeats; a lease
    that expires (worker died) is handed to another worker. `delivery_count` lets the worker bound
    retries."""

    async def claim(self, consumer: str, block_ms: int) -> JobLease | None:
        """An expired lease first (its worker died; delivery_count > 1), else a new job, waiting up to
        block_ms (0 = don't wait). The job may already be finished (its adapter was deleted, or an
        earlier attempt finished but died before ack): the worker then just acks it."""

    async def heartbeat(self, lease: JobLease) -> None:
        """Extend the lease by lease_s. Raise LeaseLost when another worker has taken the job over."""

    async def ack(self, lease: JobLease) -> None:
        """Remove the job from the queue for good (after finish_job or fail_job)."""

    async def depth(self) -> QueueDepth:
        """How many jobs wait to be claimed and how many are leased to a worker (for /metrics)."""

    async def close(self) -> None: ...


class LeaseLost(MetaloraError):
    """`heartbeat` found the job leased to another consumer (this one was too slow): stop working on it.
    Lives here rather than in errors.py because only the worker sees it, never an HTTP client."""

    code = "lease_lost"

    def __init__(self, job_id: str):
        super().__init__(f"lease on job {job_id!r} was lost to another worker")
        self.job_id = job_id


# --- semantics shared by both implementations, so they cannot drift apart ---

# Fields a caller may change with update_job; identity fields are fixed at submit.
UPDATABLE_JOB_FIELDS = frozenset(
    {"status", "step", "total_steps", "loss", "error", "attempts", "metrics", "started_at", "finished_at",
     "error_code", "estimated_finish"}
)

_VERSION_STATUS_OF = {
    JobStatus.QUEUED: VersionStatus.QUEUED,
    JobStatus.RUNNING: VersionStatus.RUNNING,
    JobStatus.SUCCEEDED: VersionStatus.READY,
    JobStatus.FAILED: VersionStatus.FAILED,
    JobStatus.CANCELLED: VersionStatus.CANCELLED,
}

ADAPTER_DELETED_ERROR = "adapter was deleted before the job finished"
INIT_DELETED_ERROR = "init was deleted before the job finished"  # code adapter_deleted too: its record is gone


def finish_change(metrics: dict[str, Any], size_bytes: int = 0):
    """The change both stores apply in finish_job: only a live job whose version still exists succeeds, so a
    deleted adapter is never resurrected."""

    def change(job, version) -> bool:
        if version is None or job.status.finished:
            return False
        apply_job_changes(job, version, {"status": JobStatus.SUCCEEDED, "metrics": metrics})
        version.metrics = dict(metrics)
        version.size_bytes = int(size_bytes)
        return True

    return change


def fail_change(error: str, code: str):
    """The change both stores apply in fail_job: a finished job stays as it is (failing is idempotent)."""

    def change(job, version) -> bool:
        if job.status.finished:
            return False
        apply_job_changes(job, version, {"status": JobStatus.FAILED, "error": error, "error_code": code})
        return True

    return change


def cancel_change(job: Job, version: AdapterVersion | None, error: str | None = None,
                  code: str | None = None) -> bool:
    """cancel_job's change (and delete_adapter's, with a reason): whether to write. Raise JobNotCancellable
    for a job that succeeded or failed."""
    if job.status is JobStatus.CANCELLED:
        return False
    if job.status.finished:
        raise JobNotCancellable(job.id, job.status.value)
    apply_job_changes(job, version, {"status": JobStatus.CANCELLED, "error": error, "error_code": code})
    return True


def update_change(changes: dict[str, Any]):
    """update_job's change for `_change_job`: whether to write. A finished job is left as it is."""
    def change(job: Job, version: AdapterVersion | None) -> bool:
        if job.status.finished:
            return False
        apply_job_changes(job, version, changes)
        return True
    return change


def changed_job_events(job: Job, previous: JobStatus | None, extra: Sequence[JobEvent] = ()) -> list[JobEvent]:
    """What a write appends to the job's log: the events given, then the status event of a status change (so a
    terminal event is always the last)."""
    event = status_event(job, previous)
    return [*extra, *([event] if event else [])]


def apply_job_changes(job: Job, version: AdapterVersion | None, changes: dict[str, Any]) -> None:
    """Apply update_job's changes in place. Finished jobs are terminal, so a late progress report from a
    worker cannot revive a job that failed or whose adapter was deleted; callers check that first."""
    unknown = set(changes) - UPDATABLE_JOB_FIELDS
    if unknown:
        raise ValueError(f"update_job cannot change {sorted(unknown)}")
    for key, value in changes.items():
        setattr(job, key, value)
    job.status = JobStatus(job.status)
    t = now()
    job.updated_at = t
    if job.status is JobStatus.RUNNING and job.started_at is None:
        job.started_at = t
    if job.status.finished and job.finished_at is None:
        job.finished_at = t
    if job.status is not JobStatus.RUNNING:
        job.estimated_finish = None
    if version is not None:
        version.status = _VERSION_STATUS_OF[job.status]
        if job.status is JobStatus.SUCCEEDED and version.ready_at is None:
            version.ready_at = t
        if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            version.error = job.error


def owns(version: AdapterVersion | None, job: Job) -> bool:
    """A version record belongs to a job only if it names that job; anything else means the adapter was
    deleted (and must not be resurrected)."""
    return version is not None and version.job_id == job.id


def pick_version(name: str, versions: list[AdapterVersion], version: int | None) -> AdapterVersion:
    """resolve()'s rule over one adapter's versions (oldest first)."""
    if not versions:
        raise AdapterNotFound(name)
    if version is not None:
        ref = f"{name}@v{version}"
        found = next((v for v in versions if v.version == version), None)
        if found is None:
            raise AdapterNotFound(ref)
        if found.status is not VersionStatus.READY:
            raise AdapterNotReady(ref, found.status.value)
        return found
    adapter = Adapter(versions[0].tenant, name, versions)
    ready = adapter.newest_ready
    if ready is None:
        raise AdapterNotReady(name, versions[-1].status.value)
    return ready


def pick_init_version(name: str, versions: list[AdapterVersion], version: int | None) -> AdapterVersion:
    """resolve_init()'s rule: pick_version's, with the init errors."""
    try:
        return pick_version(name, versions, version)
    except AdapterNotReady as exc:
        raise InitNotReady(exc.ref, exc.status) from None
    except AdapterNotFound as exc:
        raise InitNotFound(exc.ref) from None


def adapters_created(kind: JobKind, name: str, payload: list[dict[str, Any]], options: dict[str, Any]) -> list[str]:
    """The adapter names a job adds when it succeeds, which the adapter-count quota counts at submit: an adapt job's
    own; an init family's task adapters when it registers them (an init itself is no adapter name)."""
    if kind is JobKind.INIT:
        return [task["name"] for task in payload] if options.get("register_task_adapters") else []
    return [name]


def check_quota(quota: TenantQuota | None, tenant: str, active_jobs: int, adapter_count: int,
                new_adapters: int) -> None:
    """The one quota rule of every submitted job (adapt or init) and upload, given counts read inside its transaction:
    `new_adapters` of the names it creates (adapters_created) the tenant does not have yet. Raise QuotaExceeded."""
    if quota is None:
        return
    if quota.max_active_jobs is not None and active_jobs >= quota.max_active_jobs:
        raise QuotaExceeded(
            f"quota exceeded: tenant {tenant!r} already has {active_jobs} jobs (adapt or init) queued or running (limit"
            f" {quota.max_active_jobs}); wait for one to finish", quota="max_active_jobs")
    if quota.max_adapters is not None and new_adapters and adapter_count + new_adapters > quota.max_adapters:
        adding = f" and this job adds {new_adapters} new adapters" if new_adapters > 1 else ""
        raise QuotaExceeded(
            f"quota exceeded: tenant {tenant!r} already stores {adapter_count} adapters{adding} (limit"
            f" {quota.max_adapters}); delete one or add a version to an existing adapter", quota="max_adapters")


def check_upload_quota(quota: TenantQuota | None, tenant: str, adapter_count: int, new_adapters: int) -> None:
    """check_quota for an uploaded version: an upload is no job, so only max_adapters applies (the tenant's jobs in
    flight do not hold it back)."""
    check_quota(quota, tenant, active_jobs=0, adapter_count=adapter_count, new_adapters=new_adapters)


def retention_plan(versions: list[AdapterVersion], keep: int) -> list[AdapterVersion]:
    """The versions retention removes (of one adapter's, oldest first): ready ones beyond the newest `keep`, and
    failed or cancelled ones older than the oldest ready version kept. The newest ready version (the latest) is
    always kept, and so is every version still queued or running."""
    ready = [v for v in versions if v.status is VersionStatus.READY]
    if len(ready) <= keep:
        return []
    floor = ready[-max(1, keep)].version
    done = (VersionStatus.READY, VersionStatus.FAILED, VersionStatus.CANCELLED)
    return [v for v in versions if v.version < floor and v.status in done]


def pick_pinned(name: str, version: int, found: AdapterVersion | None, pruned_through: int) -> AdapterVersion:
    """resolve()'s rule for `name@vN`, given its record (None when there is none) and the highest version
    number retention removed."""
    ref = f"{name}@v{version}"
    if found is None:
        if version <= pruned_through:
            raise VersionPruned(ref)
        raise AdapterNotFound(ref)
    if found.status is not VersionStatus.READY:
        raise AdapterNotReady(ref, found.status.value)
    return found


def check_bytes(quota: TenantQuota | None, tenant: str, used: int, adding: int = 0) -> None:
    """The stored-bytes quota: a job is refused once the tenant is at the limit (adding=0), an upload when it
    would pass it. Raise QuotaExceeded."""
    if quota is None or quota.max_bytes is None:
        return
    if used + adding > quota.max_bytes or (adding == 0 and used >= quota.max_bytes):
        what = f" and this upload adds {adding}" if adding else ""
        raise QuotaExceeded(
            f"quota exceeded: tenant {tenant!r} stores {used} bytes of adapter versions{what} (limit"
            f" {quota.max_bytes}); delete adapters or versions first", quota="max_bytes")
