"""Redis implementation of MetadataStore and JobQueue (deployments with several gateways/workers).

Every multi-key change is one MULTI/EXEC under WATCH (optimistic locking, retried on conflict), so a
crash or a concurrent writer never leaves half a job or resurrects a deleted adapter. JSON is built in
Python rather than Lua so both stores serialise records identically.
"""
from __future__ import annotations

import asyncio
import functools
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from adapters import keys as K
from adapters.api_keys import ApiKey
from adapters.errors import (
    AdapterNotFound, ApiKeyNotFound, IdempotencyKeyReused, InitNotFound, JobNotFound, StoreUnavailable,
)
from adapters.idempotency import Dedupe, replays
from adapters.job_events import numbered
from adapters.names import validate_name, validate_tenant
from adapters.records import (
    Adapter, AdapterVersion, Job, JobErrorCode, JobEvent, JobKind, JobStatus, VersionStatus, check_job_id,
    new_job_id, now,
)
from adapters.settings import Settings
from adapters.store import (
    ADAPTER_DELETED_ERROR, INIT_DELETED_ERROR, JobPage, LeaseLost, TenantQuota, cancel_change, changed_job_events,
    adapters_created, check_quota, check_upload_quota, fail_change, finish_change, owns, pick_init_version,
    pick_version, QueueDepth, update_change, check_bytes, pick_pinned, retention_plan,
)

T = TypeVar("T")

# Connect fails fast when Redis is down; reads get longer because XREADGROUP blocks in slices below it.
CONNECT_TIMEOUT_S = 1.0
SOCKET_TIMEOUT_S = 3.0
BLOCK_SLICE_MS = 1000
_WATCH_RETRIES = 50
# Job listings read the tenant's index in pages of this many ids while filtering.
_LIST_SCAN_PAGE = 200


def unavailable_on_connection_errors(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """The one place redis-py's transport errors become the domain's StoreUnavailable."""

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"Redis unreachable: {type(exc).__name__}") from exc

    return wrapper


def connect(settings: Settings) -> aioredis.Redis:
    assert settings.redis_url, "Redis backend needs METALORA_REDIS_URL"
    return aioredis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        # One quick retry rides out a dropped idle connection (e.g. after a Redis restart) without turning
        # "down" into a long hang. Timeouts are not retried: an unresponsive Redis (frozen, partitioned) would
        # otherwise hold every request for twice SOCKET_TIMEOUT_S before its 503 (tests/test_drills.py).
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )


def _error_code(exc: ResponseError) -> str:
    # Redis error replies start with an upper-case code (NOGROUP, BUSYGROUP): the protocol's error type.
    return str(exc).split(" ", 1)[0]


async def _transaction(client: aioredis.Redis, watch: list[str], body: Callable[[Any], Awaitable[T]]) -> T:
    """Run `body(pipe)` under WATCH; body reads with the pipe, calls pipe.multi(), queues writes.
    Retried when a watched key changed between the read and EXEC."""
    for _ in range(_WATCH_RETRIES):
        async with client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(*watch)
                result = await body(pipe)
                if pipe.explicit_transaction:
                    await pipe.execute()
                return result
            except WatchError:
                await asyncio.sleep(0)
    raise StoreUnavailable("Redis transaction kept conflicting; try again")


# resolve(name): the latest pointer and the record it names in one round trip, atomically (retention may remove
# the version a pointer named a moment before).
_LATEST_LUA = """
local n = redis.call('GET', KEYS[1])
if not n then return false end
return redis.call('HGET', KEYS[2], n)
"""


def _stored_bytes(versions: Sequence[AdapterVersion]) -> int:
    return sum(v.size_bytes for v in versions if v.status is VersionStatus.READY)


def _versions_from_hash(raw: dict[str, str]) -> list[AdapterVersion]:
    versions = [AdapterVersion.from_dict(json.loads(v)) for v in raw.values()]
    return sorted(versions, key=lambda v: v.version)


async def _read_versions(reader, key: str) -> list[AdapterVersion]:
    """The versions in one hash (an adapter's or an init's), oldest first; `reader` is the client or a pipe."""
    return _versions_from_hash(await reader.hgetall(key))


class RedisMetadataStore:
    def __init__(self, client: aioredis.Redis, settings: Settings):
        self.r = client
        self.keys = K.Keys(settings.redis_prefix)
        self._latest = client.register_script(_LATEST_LUA)

    @unavailable_on_connection_errors
    async def ping(self) -> None:
        await self.r.ping()

    @unavailable_on_connection_errors
    async def submit_job(self, tenant, adapter, num_examples, examples, options,
                         quota: TenantQuota | None = None) -> Job:
        job, _ = await self.submit_job_once(tenant, adapter, num_examples, examples, options, quota)
        return job

    @unavailable_on_connection_errors
    async def submit_job_once(self, tenant, adapter, num_examples, examples, options,
                              quota: TenantQuota | None = None, dedupe: Dedupe | None = None,
                              kind: JobKind = JobKind.ADAPT) -> tuple[Job, bool]:
        validate_tenant(tenant)
        validate_name(adapter)
        k = self.keys
        init = kind is JobKind.INIT
        counter = k.init_next_version(tenant, adapter) if init else k.next_version(tenant, adapter)
        versions_key = k.init_versions(tenant, adapter) if init else k.versions(tenant, adapter)
        names_key = k.init_names(tenant) if init else k.adapter_names(tenant)
        active_key = k.active_jobs(tenant)
        examples_json = json.dumps(examples)
        creates = adapters_created(kind, adapter, examples, options)
        # The adapter names are watched for every kind: the adapter-count quota reads them.
        watched = list(dict.fromkeys([counter, names_key, k.adapter_names(tenant), active_key]))
        if dedupe is not None:
            watched.append(k.request_dedupe(tenant, dedupe.request_hash))
            if dedupe.key_digest:
                watched.append(k.idempotency_key(tenant, dedupe.key_digest))

        async def body(pipe) -> tuple[Job, bool]:
            if dedupe is not None and (replayed := await self._replay(pipe, tenant, dedupe)) is not None:
                return replayed, True
            # Quota counts are read under the same WATCH as the writes: two concurrent submits cannot both
            # take the last slot (the loser's EXEC fails and it re-reads).
            stale = await self._check_quota(pipe, tenant, creates, quota)
            version = int(await pipe.get(counter) or 0) + 1
            job = Job(id=new_job_id(), tenant=tenant, adapter=adapter, version=version, kind=kind,
                      num_examples=num_examples, options=dict(options),
                      request_hash=dedupe.request_hash if dedupe else None)
            record = AdapterVersion(tenant=tenant, adapter=adapter, version=version, job_id=job.id,
                                    num_examples=num_examples, created_at=job.created_at, kind=kind)
            pipe.multi()
            pipe.incr(counter)
            pipe.hset(versions_key, str(version), json.dumps(record.to_dict()))
            pipe.sadd(names_key, adapter)
            if stale:
                pipe.srem(active_key, *stale)
            pipe.sadd(active_key, job.id)
            pipe.set(k.job(job.id), json.dumps(job.to_dict()))
            pipe.zadd(k.tenant_jobs(tenant), {job.id: job.created_at})
            self._queue_events(pipe, job, changed_job_events(job, None), last_id=0)
            pipe.set(k.job_examples(job.id), examples_json, ex=K.EXAMPLES_TTL_S)
            pipe.xadd(k.jobs_stream, {K.STREAM_FIELD_JOB_ID: job.id})
            if dedupe is not None:
                self._remember(pipe, tenant, dedupe, job.id)
            return job, False

        return await _transaction(self.r, watched, body)

    async def _replay(self, pipe, tenant: str, dedupe: Dedupe) -> Job | None:
        """The job this request already created (adapters/idempotency.py's rule), or None. Reads under the
        submit's WATCH, and watches the job found, so a cancel racing the replay makes the submit re-read."""
        k = self.keys

        async def lookup(key: str) -> Job | None:
            job_id = await pipe.get(key)
            if job_id is None:
                return None
            await pipe.watch(k.job(job_id))
            try:
                return await self._read_job(pipe, job_id)
            except JobNotFound:
                return None

        if dedupe.key_digest:
            raw = await pipe.get(k.idempotency_key(tenant, dedupe.key_digest))
            if raw is not None:
                entry = json.loads(raw)
                await pipe.watch(k.job(entry["job_id"]))
                try:
                    job = await self._read_job(pipe, entry["job_id"])
                except JobNotFound:
                    job = None
                if job is not None:
                    if entry["request_hash"] != dedupe.request_hash:
                        raise IdempotencyKeyReused(job.id)
                    return job
        job = await lookup(k.request_dedupe(tenant, dedupe.request_hash))
        if job is None or not replays(job, await self._read_version(pipe, job)):
            return None
        if dedupe.key_digest:
            pipe.multi()
            self._remember(pipe, tenant, dedupe, job.id, only_key=True)
        return job

    def _remember(self, pipe, tenant: str, dedupe: Dedupe, job_id: str, only_key: bool = False) -> None:
        ttl = max(1, int(dedupe.window_s))
        if not only_key:
            pipe.set(self.keys.request_dedupe(tenant, dedupe.request_hash), job_id, ex=ttl)
        if dedupe.key_digest:
            pipe.set(self.keys.idempotency_key(tenant, dedupe.key_digest),
                     json.dumps({"job_id": job_id, "request_hash": dedupe.request_hash}), ex=ttl)

    def _queue_events(self, pipe, job: Job, events: Sequence[JobEvent], last_id: int) -> None:
        """Queue (after pipe.multi()) the append of `events`, numbered after `last_id`, trimmed to the newest
        JOB_EVENTS_KEPT; the log expires with a finished job."""
        key = self.keys.job_events(job.id)
        if events:
            pipe.rpush(key, *(json.dumps(e.to_dict()) for e in numbered(list(events), last_id)))
            pipe.ltrim(key, -K.JOB_EVENTS_KEPT, -1)
        if job.status.finished:
            pipe.expire(key, K.FINISHED_JOB_TTL_S)

    async def _last_event_id(self, reader, job_id: str) -> int:
        # Every append happens under a WATCH of the job's key, so this read cannot race another append.
        raw = await reader.lindex(self.keys.job_events(job_id), -1)
        return json.loads(raw)["id"] if raw else 0

    async def _check_quota(self, pipe, tenant: str, creates: list[str], quota: TenantQuota | None) -> list[str]:
        """Raise QuotaExceeded (check_quota, check_bytes); return the active-set members that are in fact finished
        or gone (to prune)."""
        k = self.keys
        ids = sorted(await pipe.smembers(k.active_jobs(tenant)))
        raws = await pipe.mget([k.job(i) for i in ids]) if ids else []
        stale = [i for i, raw in zip(ids, raws) if raw is None or Job.from_dict(json.loads(raw)).status.finished]
        if quota is not None:
            names_key = k.adapter_names(tenant)
            new = [not await pipe.sismember(names_key, name) for name in set(creates)]
            check_quota(quota, tenant, active_jobs=len(ids) - len(stale),
                        adapter_count=int(await pipe.scard(names_key)), new_adapters=sum(new))
            if quota.max_bytes is not None:
                check_bytes(quota, tenant, await self._usage(pipe, tenant))
        return stale

    async def _usage(self, pipe, tenant: str) -> int:
        """The tenant's stored bytes, read under the caller's WATCH."""
        key = self.keys.tenant_bytes(tenant)
        await pipe.watch(key)
        return max(0, int(await pipe.get(key) or 0))

    async def _became_ready(self, pipe, version: AdapterVersion):
        """Read (under WATCH) what a version turning ready changes; returns the writes to queue after multi():
        its bytes counted for its tenant, and an adapter's latest pointer unless a newer version is the latest (an
        init has none: resolve_init reads its few versions)."""
        latest_key = self.keys.latest(version.tenant, version.adapter)
        init = version.kind is JobKind.INIT
        if not init:
            await pipe.watch(latest_key)
        current = 0 if init else int(await pipe.get(latest_key) or 0)

        def queue(p) -> None:
            if not init and version.version > current:
                p.set(latest_key, version.version)
            if version.size_bytes:
                p.incrby(self.keys.tenant_bytes(version.tenant), version.size_bytes)

        return queue

    async def _read_job(self, reader, job_id: str) -> Job:
        raw = await reader.get(self.keys.job(check_job_id(job_id)))
        if raw is None:
            raise JobNotFound(job_id)
        return Job.from_dict(json.loads(raw))

    def _versions_key(self, job: Job) -> str:
        """The hash holding the job's version record: an adapter's versions, or an init's."""
        if job.kind is JobKind.INIT:
            return self.keys.init_versions(job.tenant, job.adapter)
        return self.keys.versions(job.tenant, job.adapter)

    async def _read_version(self, reader, job: Job) -> AdapterVersion | None:
        raw = await reader.hget(self._versions_key(job), str(job.version))
        return AdapterVersion.from_dict(json.loads(raw)) if raw else None

    @unavailable_on_connection_errors
    async def get_job(self, job_id: str, tenant: str | None = None) -> Job:
        job = await self._read_job(self.r, job_id)
        if tenant is not None and job.tenant != tenant:
            raise JobNotFound(job_id)
        return job

    @unavailable_on_connection_errors
    async def get_job_examples(self, job_id: str) -> list[dict[str, str]]:
        raw = await self.r.get(self.keys.job_examples(check_job_id(job_id)))
        if raw is None:
            raise JobNotFound(job_id)
        return json.loads(raw)

    async def _change_job(self, job_id: str, change: Callable[[Job, AdapterVersion | None], bool],
                          events: Sequence[JobEvent] = (), tenant: str | None = None):
        """Shared WATCH/MULTI for update/finish/fail/cancel: `change` mutates job (and the version if this job
        still owns it) and returns whether to write."""
        k = self.keys
        job0 = await self._read_job(self.r, job_id)  # the version key depends on the job's identity
        if tenant is not None and job0.tenant != tenant:
            raise JobNotFound(job_id)
        vkey = self._versions_key(job0)

        async def body(pipe):
            job = await self._read_job(pipe, job_id)
            version = await self._read_version(pipe, job)
            owned = version if owns(version, job) else None
            previous = job.status
            if not change(job, owned):
                return job, False
            last_id = await self._last_event_id(pipe, job_id)
            ready = None
            if owned is not None and job.status is JobStatus.SUCCEEDED and previous is not JobStatus.SUCCEEDED:
                ready = await self._became_ready(pipe, owned)
            pipe.multi()
            if ready is not None:
                ready(pipe)
            self._queue_events(pipe, job, changed_job_events(job, previous, events), last_id)
            ttl = K.FINISHED_JOB_TTL_S if job.status.finished else None
            pipe.set(k.job(job_id), json.dumps(job.to_dict()), ex=ttl)
            if owned is not None:
                pipe.hset(vkey, str(job.version), json.dumps(owned.to_dict()))
            if job.status.finished:
                pipe.delete(k.job_examples(job_id))
                pipe.srem(k.active_jobs(job.tenant), job_id)
            return job, True

        return await _transaction(self.r, [k.job(job_id), vkey], body)

    @unavailable_on_connection_errors
    async def update_job(self, job_id: str, *, events: Sequence[JobEvent] = (), **changes: Any) -> Job:
        job, _ = await self._change_job(job_id, update_change(changes), events)
        return job

    @unavailable_on_connection_errors
    async def cancel_job(self, job_id: str, tenant: str | None = None) -> Job:
        job, _ = await self._change_job(job_id, cancel_change, tenant=tenant)
        return job

    @unavailable_on_connection_errors
    async def list_jobs(self, tenant: str, limit: int, after: str | None = None, adapter: str | None = None,
                        status: JobStatus | None = None) -> JobPage:
        k = self.keys
        index = k.tenant_jobs(tenant)
        top: float | str = "+inf"
        cursor = None
        if after is not None:
            cursor = await self.get_job(after, tenant)
            top = cursor.created_at
        wanted = JobStatus(status) if status is not None else None
        found: list[Job] = []
        gone: list[str] = []
        offset = 0
        while len(found) <= limit:
            # Same score: ZREVRANGEBYSCORE orders members descending, as SQLite's ORDER BY created_at, id DESC.
            ids = await self.r.zrevrangebyscore(index, top, "-inf", start=offset, num=_LIST_SCAN_PAGE)
            if not ids:
                break
            offset += len(ids)
            raws = await self.r.mget([k.job(i) for i in ids])
            for job_id, raw in zip(ids, raws):
                if raw is None:
                    gone.append(job_id)
                    continue
                job = Job.from_dict(json.loads(raw))
                if cursor is not None and job.created_at == cursor.created_at and job.id >= cursor.id:
                    continue
                if (adapter is None or job.adapter == adapter) and (wanted is None or job.status is wanted):
                    found.append(job)
        if gone:
            await self.r.zrem(index, *gone)
        return JobPage(found[:limit], len(found) > limit)

    @unavailable_on_connection_errors
    async def list_job_events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        key = self.keys.job_events(job_id)
        # Ids are consecutive within the list, so the index of id `after + 1` follows from the oldest one kept.
        first = await self.r.lindex(key, 0)
        if first is None or limit <= 0:
            return []
        start = max(0, after + 1 - json.loads(first)["id"])
        raws = await self.r.lrange(key, start, start + limit - 1)
        return [e for e in (JobEvent.from_dict(json.loads(r)) for r in raws) if e.id > after]

    @unavailable_on_connection_errors
    async def finish_job(self, job_id: str, metrics: dict[str, Any], size_bytes: int = 0) -> bool:
        job, written = await self._change_job(job_id, finish_change(metrics, size_bytes))
        return written or (job.status is JobStatus.SUCCEEDED and await self._owned(job))

    async def _owned(self, job: Job) -> bool:
        return owns(await self._read_version(self.r, job), job)

    @unavailable_on_connection_errors
    async def fail_job(self, job_id: str, error: str, code: str = JobErrorCode.TRAINING_ERROR.value) -> None:
        await self._change_job(job_id, fail_change(error, code))

    @unavailable_on_connection_errors
    async def list_adapters(self, tenant: str) -> list[Adapter]:
        return await self._list_named(tenant, self.keys.adapter_names(tenant), self.keys.versions)

    async def _list_named(self, tenant: str, names_key: str, versions_key) -> list[Adapter]:
        """Adapters or inits (the same records in two namespaces): every name in `names_key` with its versions."""
        names = sorted(await self.r.smembers(names_key))
        async with self.r.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(versions_key(tenant, name))
            hashes = await pipe.execute()
        return [Adapter(tenant, name, _versions_from_hash(h)) for name, h in zip(names, hashes) if h]

    @unavailable_on_connection_errors
    async def get_adapter(self, tenant: str, name: str) -> Adapter:
        return await self._get_named(tenant, name, self.keys.versions, AdapterNotFound)

    async def _get_named(self, tenant: str, name: str, versions_key, not_found: type[Exception]) -> Adapter:
        """An adapter or an init (the same records in two namespaces) with its versions; `not_found` when none."""
        versions = await _read_versions(self.r, versions_key(tenant, name))
        if not versions:
            raise not_found(name)
        return Adapter(tenant, name, versions)

    @unavailable_on_connection_errors
    async def resolve(self, tenant: str, name: str, version: int | None) -> AdapterVersion:
        k = self.keys
        if version is not None:
            raw = await self.r.hget(k.versions(tenant, name), str(version))
            pruned = 0 if raw is not None else int(await self.r.get(k.pruned_through(tenant, name)) or 0)
            return pick_pinned(name, version, AdapterVersion.from_dict(json.loads(raw)) if raw else None, pruned)
        raw = await self._latest(keys=[k.latest(tenant, name), k.versions(tenant, name)])
        if raw:
            return AdapterVersion.from_dict(json.loads(raw))
        # No latest: no ready version (the list names the newest one's status), or one recorded before the
        # pointer existed.
        return pick_version(name, await _read_versions(self.r, k.versions(tenant, name)), None)

    @unavailable_on_connection_errors
    async def prune_versions(self, tenant: str, adapter: str, keep: int) -> list[AdapterVersion]:
        k = self.keys
        vkey, pruned_key = k.versions(tenant, adapter), k.pruned_through(tenant, adapter)

        async def body(pipe) -> list[AdapterVersion]:
            pruned = retention_plan(await _read_versions(pipe, vkey), keep)
            if not pruned:
                return []
            through = max(int(await pipe.get(pruned_key) or 0), max(v.version for v in pruned))
            pipe.multi()
            pipe.hdel(vkey, *(str(v.version) for v in pruned))
            pipe.set(pruned_key, through)
            if _stored_bytes(pruned):
                pipe.decrby(k.tenant_bytes(tenant), _stored_bytes(pruned))
            return pruned

        return await _transaction(self.r, [vkey, pruned_key], body)

    @unavailable_on_connection_errors
    async def tenant_usage(self, tenant: str) -> int:
        return max(0, int(await self.r.get(self.keys.tenant_bytes(tenant)) or 0))

    @unavailable_on_connection_errors
    async def delete_adapter(self, tenant: str, name: str) -> list[AdapterVersion]:
        return await self._delete_named(tenant, name, JobKind.ADAPT)

    async def _delete_named(self, tenant: str, name: str, kind: JobKind) -> list[AdapterVersion]:
        """delete_adapter (kind ADAPT) and delete_init (kind INIT): the same records in two namespaces."""
        k = self.keys
        init = kind is JobKind.INIT
        vkey = k.init_versions(tenant, name) if init else k.versions(tenant, name)
        names_key = k.init_names(tenant) if init else k.adapter_names(tenant)
        # An init has no latest pointer or pruned mark: those keys belong to the adapter of the same name.
        dropped = [vkey] if init else [vkey, k.latest(tenant, name), k.pruned_through(tenant, name)]
        not_found, reason = (InitNotFound, INIT_DELETED_ERROR) if init else (AdapterNotFound, ADAPTER_DELETED_ERROR)

        async def body(pipe) -> list[AdapterVersion]:
            versions = await _read_versions(pipe, vkey)
            if not versions:
                raise not_found(name)
            # In-flight jobs are cancelled in the same transaction, so a worker that claims one later sees
            # a finished job and skips it, and one training it stops at its next progress report.
            jobs = []
            for v in versions:
                await pipe.watch(k.job(v.job_id))
                raw = await pipe.get(k.job(v.job_id))
                if raw is not None:
                    job = Job.from_dict(json.loads(raw))
                    previous = job.status
                    # Only jobs of `kind` train what is deleted: a task adapter an init family registered names
                    # the init's job, and the init lives on.
                    if not job.status.finished and job.kind is kind:
                        cancel_change(job, None, reason, JobErrorCode.ADAPTER_DELETED.value)
                        jobs.append((job, changed_job_events(job, previous), await self._last_event_id(pipe, job.id)))
            pipe.multi()
            pipe.delete(*dropped)
            pipe.srem(names_key, name)
            if _stored_bytes(versions):
                pipe.decrby(k.tenant_bytes(tenant), _stored_bytes(versions))
            for job, events, last_id in jobs:
                self._queue_events(pipe, job, events, last_id)
                pipe.set(k.job(job.id), json.dumps(job.to_dict()), ex=K.FINISHED_JOB_TTL_S)
                pipe.delete(k.job_examples(job.id))
                pipe.srem(k.active_jobs(tenant), job.id)
            return versions

        return await _transaction(self.r, [vkey], body)

    # ------------------------------------------------------------ API keys
    @unavailable_on_connection_errors
    async def create_api_key(self, key: ApiKey) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hsetnx(self.keys.api_keys, key.key_hash, json.dumps(key.to_dict()))
            pipe.hsetnx(self.keys.api_key_ids, key.id, key.key_hash)
            created, _ = await pipe.execute()
        if not created:  # 256 random bits collided: never silently rebind an existing key
            raise ValueError("API key hash already exists")

    @unavailable_on_connection_errors
    async def api_key_by_hash(self, key_hash: str) -> ApiKey | None:
        raw = await self.r.hget(self.keys.api_keys, key_hash)
        return ApiKey.from_dict(json.loads(raw)) if raw else None

    @unavailable_on_connection_errors
    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKey]:
        keys = [ApiKey.from_dict(json.loads(v)) for v in (await self.r.hgetall(self.keys.api_keys)).values()]
        return sorted((k for k in keys if tenant is None or k.tenant == tenant), key=lambda k: k.created_at)

    @unavailable_on_connection_errors
    async def revoke_api_key(self, key_id: str) -> ApiKey:
        k = self.keys
        key_hash = await self.r.hget(k.api_key_ids, key_id)
        if key_hash is None:
            raise ApiKeyNotFound(key_id)

        async def body(pipe) -> ApiKey:
            raw = await pipe.hget(k.api_keys, key_hash)
            if raw is None:
                raise ApiKeyNotFound(key_id)
            record = ApiKey.from_dict(json.loads(raw))
            if record.revoked_at is None:
                record.revoked_at = now()
                pipe.multi()
                pipe.hset(k.api_keys, key_hash, json.dumps(record.to_dict()))
            return record

        return await _transaction(self.r, [k.api_keys], body)

    # ------------------------------------------------------------ uploaded versions
    @unavailable_on_connection_errors
    async def allocate_version(self, tenant: str, adapter: str) -> int:
        validate_tenant(tenant)
        validate_name(adapter)
        return int(await self.r.incr(self.keys.next_version(tenant, adapter)))

    @unavailable_on_connection_errors
    async def add_version(self, version: AdapterVersion, quota: TenantQuota | None = None) -> None:
        k = self.keys
        names_key = k.adapter_names(version.tenant)

        async def body(pipe) -> None:
            # Counts read under the same WATCH as the write.
            check_upload_quota(quota, version.tenant, adapter_count=int(await pipe.scard(names_key)),
                               new_adapters=int(not await pipe.sismember(names_key, version.adapter)))
            if quota is not None and quota.max_bytes is not None:
                check_bytes(quota, version.tenant, await self._usage(pipe, version.tenant), version.size_bytes)
            ready = await self._became_ready(pipe, version) if version.status is VersionStatus.READY else None
            pipe.multi()
            pipe.hset(k.versions(version.tenant, version.adapter), str(version.version), json.dumps(version.to_dict()))
            pipe.sadd(names_key, version.adapter)
            if ready is not None:
                ready(pipe)

        await _transaction(self.r, [names_key], body)

    # ------------------------------------------------------------ inits
    @unavailable_on_connection_errors
    async def submit_init_job(self, tenant, name, num_examples, tasks, options,
                              quota: TenantQuota | None = None) -> Job:
        job, _ = await self.submit_job_once(tenant, name, num_examples, tasks, options, quota, kind=JobKind.INIT)
        return job

    @unavailable_on_connection_errors
    async def list_inits(self, tenant: str) -> list[Adapter]:
        return await self._list_named(tenant, self.keys.init_names(tenant), self.keys.init_versions)

    @unavailable_on_connection_errors
    async def get_init(self, tenant: str, name: str) -> Adapter:
        return await self._get_named(tenant, name, self.keys.init_versions, InitNotFound)

    @unavailable_on_connection_errors
    async def resolve_init(self, tenant: str, name: str, version: int | None) -> AdapterVersion:
        return pick_init_version(name, await _read_versions(self.r, self.keys.init_versions(tenant, name)), version)

    @unavailable_on_connection_errors
    async def delete_init(self, tenant: str, name: str) -> list[AdapterVersion]:
        return await self._delete_named(tenant, name, JobKind.INIT)

    # ------------------------------------------------------------ job metrics
    @unavailable_on_connection_errors
    async def add_stats(self, increments: dict[str, float]) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            for name, amount in increments.items():
                pipe.hincrbyfloat(self.keys.stats, name, amount)
            await pipe.execute()

    @unavailable_on_connection_errors
    async def read_stats(self) -> dict[str, float]:
        return {name: float(value) for name, value in (await self.r.hgetall(self.keys.stats)).items()}

    async def close(self) -> None:
        await self.r.aclose()


@dataclass
class RedisLease:
    job_id: str
    delivery_count: int
    entry_id: str
    consumer: str


# Atomic check-and-touch: XCLAIM alone would steal the entry back from a worker that took over.
_HEARTBEAT_LUA = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""


class RedisJobQueue:
    """A Streams consumer group: the pending-entries list is the lease table, idle time the lease age."""

    def __init__(self, client: aioredis.Redis, settings: Settings):
        self.r = client
        self.keys = K.Keys(settings.redis_prefix)
        self.lease_ms = max(1, int(settings.lease_s * 1000))
        self._heartbeat = self.r.register_script(_HEARTBEAT_LUA)
        self._group_ready = False

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            # id 0: jobs submitted before the first worker ever started are delivered too.
            await self.r.xgroup_create(self.keys.jobs_stream, self.keys.jobs_group, id="0", mkstream=True)
        except ResponseError as exc:
            if _error_code(exc) != "BUSYGROUP":
                raise
        self._group_ready = True

    async def _delivery_count(self, entry_id: str) -> int:
        pending = await self.r.xpending_range(self.keys.jobs_stream, self.keys.jobs_group, entry_id, entry_id, 1)
        return int(pending[0]["times_delivered"]) if pending else 1

    async def _reclaim_expired(self, consumer: str) -> RedisLease | None:
        start = "0-0"
        while True:
            nxt, entries, _deleted = await self.r.xautoclaim(
                self.keys.jobs_stream, self.keys.jobs_group, consumer, self.lease_ms, start_id=start, count=1
            )
            for entry_id, fields in entries:
                count = await self._delivery_count(entry_id)
                return RedisLease(fields[K.STREAM_FIELD_JOB_ID], count, entry_id, consumer)
            if nxt == "0-0":
                return None
            start = nxt

    async def _read_new(self, consumer: str, block_ms: int | None) -> RedisLease | None:
        reply = await self.r.xreadgroup(
            self.keys.jobs_group, consumer, {self.keys.jobs_stream: ">"}, count=1, block=block_ms
        )
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                return RedisLease(fields[K.STREAM_FIELD_JOB_ID], 1, entry_id, consumer)
        return None

    @unavailable_on_connection_errors
    async def claim(self, consumer: str, block_ms: int) -> RedisLease | None:
        deadline = time.monotonic() + max(0, block_ms) / 1000
        while True:
            try:
                await self._ensure_group()
                lease = await self._reclaim_expired(consumer)
                if lease is not None:
                    return lease
                left_ms = int((deadline - time.monotonic()) * 1000)
                # BLOCK 0 means forever in Redis; block in slices below the socket timeout instead, and
                # look for expired leases between slices.
                lease = await self._read_new(consumer, min(left_ms, BLOCK_SLICE_MS) if left_ms > 0 else None)
            except ResponseError as exc:
                if _error_code(exc) != "NOGROUP":  # Redis restarted without persistence
                    raise
                self._group_ready = False
                continue
            if lease is not None or time.monotonic() >= deadline:
                return lease

    @unavailable_on_connection_errors
    async def heartbeat(self, lease: RedisLease) -> None:
        held = await self._heartbeat(
            keys=[self.keys.jobs_stream], args=[self.keys.jobs_group, lease.entry_id, lease.consumer]
        )
        if not held:
            raise LeaseLost(lease.job_id)

    @unavailable_on_connection_errors
    async def ack(self, lease: RedisLease) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.jobs_stream, self.keys.jobs_group, lease.entry_id)
            pipe.xdel(self.keys.jobs_stream, lease.entry_id)
            await pipe.execute()

    @unavailable_on_connection_errors
    async def depth(self) -> QueueDepth:
        # Acked entries are deleted, so the stream holds exactly the jobs not done: waiting or pending (leased).
        total = int(await self.r.xlen(self.keys.jobs_stream))
        try:
            pending = int((await self.r.xpending(self.keys.jobs_stream, self.keys.jobs_group))["pending"])
        except ResponseError as exc:
            if _error_code(exc) != "NOGROUP":  # no worker has started yet
                raise
            pending = 0
        return QueueDepth(waiting=total - pending, leased=pending)

    async def close(self) -> None:
        await self.r.aclose()
