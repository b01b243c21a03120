"""SQLite implementation of MetadataStore and JobQueue: the embedded default (no server to run).

The gateway process and the worker process open the same file: WAL lets readers run beside the one
writer, busy_timeout makes writers wait for each other, and every read-modify-write runs inside
BEGIN IMMEDIATE so two processes can never allocate the same version or claim the same job.
stdlib sqlite3 runs in a thread (asyncio.to_thread) so the event loop never waits on the file lock.
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from adapters import keys as K
from adapters.api_keys import ApiKey
from adapters.errors import (
    AdapterNotFound, ApiKeyNotFound, IdempotencyKeyReused, InitNotFound, JobNotFound, StoreUnavailable,
)
from adapters.idempotency import Dedupe, replays
from adapters.job_events import numbered
from adapters.names import validate_name, validate_tenant
from adapters.records import (
    Adapter, AdapterVersion, Job, JobErrorCode, JobEvent, JobKind, JobStatus, VersionStatus, new_job_id, now,
)
from adapters.settings import Settings
from adapters.store import (
    ADAPTER_DELETED_ERROR, INIT_DELETED_ERROR, JobPage, LeaseLost, TenantQuota, cancel_change, changed_job_events,
    adapters_created, check_quota, check_upload_quota, fail_change, finish_change, owns, pick_init_version,
    pick_version, QueueDepth, update_change, check_bytes, pick_pinned, retention_plan,
)

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000
POLL_INTERVAL_S = 0.05
# Extended result codes all share their primary code in the low byte.
_UNAVAILABLE_CODES = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_IOERR,
                      sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY}

SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (tenant TEXT, adapter TEXT, last_version INTEGER NOT NULL,
                                     PRIMARY KEY (tenant, adapter));
CREATE TABLE IF NOT EXISTS versions (tenant TEXT, adapter TEXT, version INTEGER, record TEXT NOT NULL,
                                     PRIMARY KEY (tenant, adapter, version));
CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, record TEXT NOT NULL, expires_at REAL);
CREATE TABLE IF NOT EXISTS examples (job_id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS queue (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT UNIQUE NOT NULL,
                                  owner TEXT, token TEXT, lease_expires_at REAL,
                                  delivery_count INTEGER NOT NULL DEFAULT 0);
-- Unfinished jobs are exactly those without an expiry (see _write_job): the in-flight quota counts them.
CREATE INDEX IF NOT EXISTS jobs_active_by_tenant ON jobs (json_extract(record, '$.tenant'))
    WHERE expires_at IS NULL;
CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, key_hash TEXT UNIQUE NOT NULL, tenant TEXT NOT NULL,
                                     record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stats (name TEXT PRIMARY KEY, value REAL NOT NULL);
-- The job listing's order; the expressions match list_jobs' query so SQLite uses the index.
CREATE INDEX IF NOT EXISTS jobs_by_tenant_created ON jobs (json_extract(record, '$.tenant'),
                                                           json_extract(record, '$.created_at'));
CREATE TABLE IF NOT EXISTS job_events (job_id TEXT NOT NULL, seq INTEGER NOT NULL, record TEXT NOT NULL,
                                       PRIMARY KEY (job_id, seq));
-- Inits (POST /v1/inits): versioned like adapters, in their own namespace.
CREATE TABLE IF NOT EXISTS init_counters (tenant TEXT, name TEXT, last_version INTEGER NOT NULL,
                                          PRIMARY KEY (tenant, name));
CREATE TABLE IF NOT EXISTS init_versions (tenant TEXT, name TEXT, version INTEGER, record TEXT NOT NULL,
                                          PRIMARY KEY (tenant, name, version));
-- An adapter's newest ready version (the one row resolve(name) reads) and the highest version retention removed.
CREATE TABLE IF NOT EXISTS adapter_heads (tenant TEXT, adapter TEXT, latest INTEGER,
                                          pruned_through INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (tenant, adapter));
-- Bytes of each tenant's stored adapter versions (the max_bytes quota).
CREATE TABLE IF NOT EXISTS tenant_usage (tenant TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
-- kind 'key': an Idempotency-Key's digest; kind 'request': a request fingerprint (adapters/idempotency.py).
CREATE TABLE IF NOT EXISTS job_dedupe (tenant TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
                                       job_id TEXT NOT NULL, request_hash TEXT NOT NULL, expires_at REAL NOT NULL,
                                       PRIMARY KEY (tenant, kind, key));
"""


class _Db:
    """One connection per process object, serialised by a lock; other processes wait on the file lock."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.executescript(SCHEMA)

    def run(self, fn: Callable[[sqlite3.Connection], T], write: bool) -> T:
        with self.lock:
            if not write:
                return fn(self.conn)
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self.conn)
            except BaseException:
                self._rollback()
                raise
            try:
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                # A failed COMMIT leaves the transaction open, and every later BEGIN on this connection would fail.
                self._rollback()
                raise StoreUnavailable(f"SQLite store could not commit: {exc}") from exc
            return result

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")

    async def call(self, fn: Callable[[sqlite3.Connection], T], write: bool = False) -> T:
        try:
            return await asyncio.to_thread(self.run, fn, write)
        except sqlite3.OperationalError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _UNAVAILABLE_CODES:
                raise StoreUnavailable(f"SQLite store busy or unreadable: {exc.sqlite_errorname}") from exc
            raise

    def close(self) -> None:
        with self.lock:
            self.conn.close()


def open_db(path: Path) -> _Db:
    return _Db(Path(path))


def _read_job(c: sqlite3.Connection, job_id: str) -> Job:
    row = c.execute("SELECT record FROM jobs WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)",
                    (job_id, now())).fetchone()
    if row is None:
        raise JobNotFound(job_id)
    return Job.from_dict(json.loads(row[0]))


def _versions_table(kind: JobKind) -> tuple[str, str]:
    """The table holding one kind's version records (an adapter's or an init's: the same records in two
    namespaces) and its name column."""
    return ("init_versions", "name") if kind is JobKind.INIT else ("versions", "adapter")


def _counters_table(kind: JobKind) -> tuple[str, str]:
    """The table of one kind's last version numbers, and its name column (the versions table's)."""
    return ("init_counters" if kind is JobKind.INIT else "counters"), _versions_table(kind)[1]


def _read_versions(c: sqlite3.Connection, tenant: str, name: str,
                   kind: JobKind = JobKind.ADAPT) -> list[AdapterVersion]:
    table, name_column = _versions_table(kind)
    rows = c.execute(f"SELECT record FROM {table} WHERE tenant = ? AND {name_column} = ? ORDER BY version",
                     (tenant, name)).fetchall()
    return [AdapterVersion.from_dict(json.loads(r[0])) for r in rows]


def _read_version(c: sqlite3.Connection, job: Job) -> AdapterVersion | None:
    if job.kind is JobKind.INIT:
        return _read_init_version(c, job)
    row = c.execute("SELECT record FROM versions WHERE tenant = ? AND adapter = ? AND version = ?",
                    (job.tenant, job.adapter, job.version)).fetchone()
    return AdapterVersion.from_dict(json.loads(row[0])) if row else None


def _write_job(c: sqlite3.Connection, job: Job) -> None:
    expires = now() + K.FINISHED_JOB_TTL_S if job.status.finished else None
    c.execute("INSERT OR REPLACE INTO jobs (id, record, expires_at) VALUES (?, ?, ?)",
              (job.id, json.dumps(job.to_dict()), expires))
    if job.status.finished:
        c.execute("DELETE FROM examples WHERE job_id = ?", (job.id,))


def _write_version(c: sqlite3.Connection, v: AdapterVersion) -> None:
    if v.kind is JobKind.INIT:
        _write_init_version(c, v)
        return
    c.execute("INSERT OR REPLACE INTO versions (tenant, adapter, version, record) VALUES (?, ?, ?, ?)",
              (v.tenant, v.adapter, v.version, json.dumps(v.to_dict())))


def _read_init_version(c: sqlite3.Connection, job: Job) -> AdapterVersion | None:
    row = c.execute("SELECT record FROM init_versions WHERE tenant = ? AND name = ? AND version = ?",
                    (job.tenant, job.adapter, job.version)).fetchone()
    return AdapterVersion.from_dict(json.loads(row[0])) if row else None


def _list_named(c: sqlite3.Connection, tenant: str, kind: JobKind) -> list[Adapter]:
    """The tenant's adapters (kind ADAPT) or inits (kind INIT), by name, each with its versions oldest first."""
    table, name_column = _versions_table(kind)
    rows = c.execute(f"SELECT record FROM {table} WHERE tenant = ? ORDER BY {name_column}, version",
                     (tenant,)).fetchall()
    by_name: dict[str, list[AdapterVersion]] = {}
    for (record,) in rows:
        v = AdapterVersion.from_dict(json.loads(record))
        by_name.setdefault(v.adapter, []).append(v)
    return [Adapter(tenant, name, vs) for name, vs in by_name.items()]


def _write_init_version(c: sqlite3.Connection, v: AdapterVersion) -> None:
    c.execute("INSERT OR REPLACE INTO init_versions (tenant, name, version, record) VALUES (?, ?, ?, ?)",
              (v.tenant, v.adapter, v.version, json.dumps(v.to_dict())))


def _became_ready(c: sqlite3.Connection, v: AdapterVersion) -> None:
    """A version just turned ready: its bytes count for its tenant, and an adapter's is the latest unless a newer
    one is (an init has no latest pointer: resolve_init reads its few versions)."""
    _add_usage(c, v.tenant, v.size_bytes)
    if v.kind is JobKind.INIT:
        return
    c.execute("INSERT INTO adapter_heads (tenant, adapter, latest) VALUES (?, ?, ?) ON CONFLICT (tenant, adapter)"
              " DO UPDATE SET latest = max(coalesce(latest, 0), excluded.latest)", (v.tenant, v.adapter, v.version))


def _add_usage(c: sqlite3.Connection, tenant: str, amount: int) -> None:
    if amount:
        c.execute("INSERT INTO tenant_usage (tenant, bytes) VALUES (?, ?) ON CONFLICT (tenant)"
                  " DO UPDATE SET bytes = max(0, bytes + excluded.bytes)", (tenant, amount))


def _usage(c: sqlite3.Connection, tenant: str) -> int:
    row = c.execute("SELECT bytes FROM tenant_usage WHERE tenant = ?", (tenant,)).fetchone()
    return row[0] if row else 0


def _stored_bytes(versions: Sequence[AdapterVersion]) -> int:
    return sum(v.size_bytes for v in versions if v.status is VersionStatus.READY)


def _append_events(c: sqlite3.Connection, job_id: str, events: Sequence[JobEvent]) -> None:
    if not events:
        return
    last = c.execute("SELECT max(seq) FROM job_events WHERE job_id = ?", (job_id,)).fetchone()[0] or 0
    c.executemany("INSERT INTO job_events (job_id, seq, record) VALUES (?, ?, ?)",
                  [(job_id, e.id, json.dumps(e.to_dict())) for e in numbered(list(events), last)])
    c.execute("DELETE FROM job_events WHERE job_id = ? AND seq <= ?", (job_id, last + len(events) - K.JOB_EVENTS_KEPT))


def _drop_expired(c: sqlite3.Connection) -> None:
    t = now()
    c.execute("DELETE FROM job_events WHERE job_id IN (SELECT id FROM jobs WHERE expires_at <= ?)", (t,))
    c.execute("DELETE FROM jobs WHERE expires_at IS NOT NULL AND expires_at <= ?", (t,))
    c.execute("DELETE FROM job_dedupe WHERE expires_at <= ?", (t,))


def _replay(c: sqlite3.Connection, tenant: str, dedupe: Dedupe) -> Job | None:
    """The job this request already created (adapters/idempotency.py's rule), or None."""
    def lookup(kind: str, key: str) -> tuple[Job, str] | None:
        row = c.execute("SELECT job_id, request_hash FROM job_dedupe WHERE tenant = ? AND kind = ? AND key = ?",
                        (tenant, kind, key)).fetchone()
        if row is None:
            return None
        try:
            return _read_job(c, row[0]), row[1]
        except JobNotFound:
            return None

    if dedupe.key_digest and (found := lookup("key", dedupe.key_digest)):
        job, request_hash = found
        if request_hash != dedupe.request_hash:
            raise IdempotencyKeyReused(job.id)
        return job
    found = lookup("request", dedupe.request_hash)
    if found and replays(found[0], _read_version(c, found[0])):
        _remember(c, tenant, dedupe, found[0].id, only_key=True)
        return found[0]
    return None


def _remember(c: sqlite3.Connection, tenant: str, dedupe: Dedupe, job_id: str, only_key: bool = False) -> None:
    entries = [] if only_key else [("request", dedupe.request_hash)]
    if dedupe.key_digest:
        entries.append(("key", dedupe.key_digest))
    c.executemany("INSERT OR REPLACE INTO job_dedupe (tenant, kind, key, job_id, request_hash, expires_at)"
                  " VALUES (?, ?, ?, ?, ?, ?)",
                  [(tenant, kind, key, job_id, dedupe.request_hash, now() + dedupe.window_s) for kind, key in entries])


class SqliteMetadataStore:
    def __init__(self, db: _Db):
        self.db = db

    async def ping(self) -> None:
        await self.db.call(lambda c: c.execute("SELECT 1").fetchone())

    async def submit_job(self, tenant, adapter, num_examples, examples, options,
                         quota: TenantQuota | None = None) -> Job:
        job, _ = await self.submit_job_once(tenant, adapter, num_examples, examples, options, quota)
        return job

    async def submit_job_once(self, tenant, adapter, num_examples, examples, options,
                              quota: TenantQuota | None = None, dedupe: Dedupe | None = None,
                              kind: JobKind = JobKind.ADAPT) -> tuple[Job, bool]:
        validate_tenant(tenant)
        validate_name(adapter)
        examples_json = json.dumps(examples)
        creates = adapters_created(kind, adapter, examples, options)
        counters, name_column = _counters_table(kind)

        def tx(c: sqlite3.Connection) -> tuple[Job, bool]:
            _drop_expired(c)
            if dedupe is not None and (replayed := _replay(c, tenant, dedupe)) is not None:
                return replayed, True
            if quota is not None:  # inside BEGIN IMMEDIATE: no other writer between this count and the insert
                check_quota(quota, tenant, **_quota_counts(c, tenant, creates))
                check_bytes(quota, tenant, _usage(c, tenant))
            row = c.execute(f"SELECT last_version FROM {counters} WHERE tenant = ? AND {name_column} = ?",
                            (tenant, adapter)).fetchone()
            version = (row[0] if row else 0) + 1
            c.execute(f"INSERT OR REPLACE INTO {counters} (tenant, {name_column}, last_version) VALUES (?, ?, ?)",
                      (tenant, adapter, version))
            job = Job(id=new_job_id(), tenant=tenant, adapter=adapter, version=version, kind=kind,
                      num_examples=num_examples, options=dict(options),
                      request_hash=dedupe.request_hash if dedupe else None)
            _write_version(c, AdapterVersion(tenant=tenant, adapter=adapter, version=version, job_id=job.id,
                                             num_examples=num_examples, created_at=job.created_at, kind=kind))
            _write_job(c, job)
            _append_events(c, job.id, changed_job_events(job, None))
            c.execute("INSERT INTO examples (job_id, data) VALUES (?, ?)", (job.id, examples_json))
            c.execute("INSERT INTO queue (job_id) VALUES (?)", (job.id,))
            if dedupe is not None:
                _remember(c, tenant, dedupe, job.id)
            return job, False

        return await self.db.call(tx, write=True)

    async def list_jobs(self, tenant: str, limit: int, after: str | None = None, adapter: str | None = None,
                        status: JobStatus | None = None) -> JobPage:
        created = "json_extract(record, '$.created_at')"

        def read(c: sqlite3.Connection) -> JobPage:
            where = ["json_extract(record, '$.tenant') = ?", "(expires_at IS NULL OR expires_at > ?)"]
            args: list[Any] = [tenant, now()]
            if after is not None:
                cursor = _read_job(c, after)
                if cursor.tenant != tenant:
                    raise JobNotFound(after)
                where.append(f"({created} < ? OR ({created} = ? AND id < ?))")
                args += [cursor.created_at, cursor.created_at, cursor.id]
            if adapter is not None:
                where.append("json_extract(record, '$.adapter') = ?")
                args.append(adapter)
            if status is not None:
                where.append("json_extract(record, '$.status') = ?")
                args.append(JobStatus(status).value)
            rows = c.execute(f"SELECT record FROM jobs WHERE {' AND '.join(where)} ORDER BY {created} DESC, id DESC"
                             " LIMIT ?", (*args, limit + 1)).fetchall()
            jobs = [Job.from_dict(json.loads(r[0])) for r in rows]
            return JobPage(jobs[:limit], len(jobs) > limit)

        return await self.db.call(read)

    async def cancel_job(self, job_id: str, tenant: str | None = None) -> Job:
        job, _, _ = await self._change_job(job_id, cancel_change, tenant=tenant)
        return job

    async def list_job_events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEvent]:
        rows = await self.db.call(lambda c: c.execute(
            "SELECT record FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (job_id, after, limit)).fetchall())
        return [JobEvent.from_dict(json.loads(r[0])) for r in rows]

    async def get_job(self, job_id: str, tenant: str | None = None) -> Job:
        job = await self.db.call(lambda c: _read_job(c, job_id))
        if tenant is not None and job.tenant != tenant:
            raise JobNotFound(job_id)
        return job

    async def get_job_examples(self, job_id: str) -> list[dict[str, str]]:
        row = await self.db.call(
            lambda c: c.execute("SELECT data FROM examples WHERE job_id = ?", (job_id,)).fetchone())
        if row is None:
            raise JobNotFound(job_id)
        return json.loads(row[0])

    async def _change_job(self, job_id: str, change: Callable[[Job, AdapterVersion | None], bool],
                          events: Sequence[JobEvent] = (), tenant: str | None = None):
        def tx(c: sqlite3.Connection):
            job = _read_job(c, job_id)
            if tenant is not None and job.tenant != tenant:
                raise JobNotFound(job_id)
            version = _read_version(c, job)
            owned = version if owns(version, job) else None
            previous = job.status
            if not change(job, owned):
                return job, owned, False
            _write_job(c, job)
            if owned is not None:
                _write_version(c, owned)
                if job.status is JobStatus.SUCCEEDED and previous is not JobStatus.SUCCEEDED:
                    _became_ready(c, owned)
            _append_events(c, job_id, changed_job_events(job, previous, events))
            return job, owned, True

        return await self.db.call(tx, write=True)

    async def update_job(self, job_id: str, *, events: Sequence[JobEvent] = (), **changes: Any) -> Job:
        job, _, _ = await self._change_job(job_id, update_change(changes), events)
        return job

    async def finish_job(self, job_id: str, metrics: dict[str, Any], size_bytes: int = 0) -> bool:
        job, owned, written = await self._change_job(job_id, finish_change(metrics, size_bytes))
        return written or (job.status is JobStatus.SUCCEEDED and owned is not None)

    async def fail_job(self, job_id: str, error: str, code: str = JobErrorCode.TRAINING_ERROR.value) -> None:
        await self._change_job(job_id, fail_change(error, code))

    async def list_adapters(self, tenant: str) -> list[Adapter]:
        return await self.db.call(lambda c: _list_named(c, tenant, JobKind.ADAPT))

    async def get_adapter(self, tenant: str, name: str) -> Adapter:
        return await self._get_named(tenant, name, JobKind.ADAPT)

    async def _get_named(self, tenant: str, name: str, kind: JobKind) -> Adapter:
        """get_adapter (kind ADAPT) and get_init (kind INIT): the same records in two tables."""
        versions = await self.db.call(lambda c: _read_versions(c, tenant, name, kind))
        if not versions:
            raise (InitNotFound if kind is JobKind.INIT else AdapterNotFound)(name)
        return Adapter(tenant, name, versions)

    async def resolve(self, tenant: str, name: str, version: int | None) -> AdapterVersion:
        def read(c: sqlite3.Connection) -> AdapterVersion:
            if version is not None:
                row = c.execute("SELECT record FROM versions WHERE tenant = ? AND adapter = ? AND version = ?",
                                (tenant, name, version)).fetchone()
                head = c.execute("SELECT pruned_through FROM adapter_heads WHERE tenant = ? AND adapter = ?",
                                 (tenant, name)).fetchone() if row is None else None
                return pick_pinned(name, version, AdapterVersion.from_dict(json.loads(row[0])) if row else None,
                                   head[0] if head else 0)
            row = c.execute("SELECT v.record FROM adapter_heads h JOIN versions v ON v.tenant = h.tenant AND"
                            " v.adapter = h.adapter AND v.version = h.latest WHERE h.tenant = ? AND h.adapter = ?",
                            (tenant, name)).fetchone()
            if row is not None:
                return AdapterVersion.from_dict(json.loads(row[0]))
            # No latest: no ready version (the list names the newest one's status), or one recorded before
            # the pointer existed.
            return pick_version(name, _read_versions(c, tenant, name), None)

        return await self.db.call(read)

    async def prune_versions(self, tenant: str, adapter: str, keep: int) -> list[AdapterVersion]:
        def tx(c: sqlite3.Connection) -> list[AdapterVersion]:
            pruned = retention_plan(_read_versions(c, tenant, adapter), keep)
            if not pruned:
                return []
            c.executemany("DELETE FROM versions WHERE tenant = ? AND adapter = ? AND version = ?",
                          [(tenant, adapter, v.version) for v in pruned])
            c.execute("INSERT INTO adapter_heads (tenant, adapter, pruned_through) VALUES (?, ?, ?)"
                      " ON CONFLICT (tenant, adapter) DO UPDATE SET pruned_through = max(pruned_through,"
                      " excluded.pruned_through)", (tenant, adapter, max(v.version for v in pruned)))
            _add_usage(c, tenant, -_stored_bytes(pruned))
            return pruned

        return await self.db.call(tx, write=True)

    async def tenant_usage(self, tenant: str) -> int:
        return await self.db.call(lambda c: _usage(c, tenant))

    async def delete_adapter(self, tenant: str, name: str) -> list[AdapterVersion]:
        return await self._delete_named(tenant, name, JobKind.ADAPT)

    async def _delete_named(self, tenant: str, name: str, kind: JobKind) -> list[AdapterVersion]:
        """delete_adapter (kind ADAPT) and delete_init (kind INIT): the same records in two tables."""
        init = kind is JobKind.INIT
        table, name_column = _versions_table(kind)
        not_found, reason = (InitNotFound, INIT_DELETED_ERROR) if init else (AdapterNotFound, ADAPTER_DELETED_ERROR)

        def tx(c: sqlite3.Connection) -> list[AdapterVersion]:
            versions = _read_versions(c, tenant, name, kind)
            if not versions:
                raise not_found(name)
            # Cancel in-flight jobs too, so a worker that claims one later skips it (see redis_store).
            for v in versions:
                try:
                    job = _read_job(c, v.job_id)
                except JobNotFound:
                    continue
                previous = job.status
                # Only jobs of `kind` train what is deleted: a task adapter an init family registered names the
                # init's job, and the init lives on.
                if not job.status.finished and job.kind is kind:
                    cancel_change(job, None, reason, JobErrorCode.ADAPTER_DELETED.value)
                    _write_job(c, job)
                    _append_events(c, job.id, changed_job_events(job, previous))
            c.execute(f"DELETE FROM {table} WHERE tenant = ? AND {name_column} = ?", (tenant, name))
            if not init:  # an init has no head (latest pointer, pruned mark): the row is the same-named adapter's
                c.execute("DELETE FROM adapter_heads WHERE tenant = ? AND adapter = ?", (tenant, name))
            _add_usage(c, tenant, -_stored_bytes(versions))
            return versions

        return await self.db.call(tx, write=True)

    # ------------------------------------------------------------ API keys
    async def create_api_key(self, key: ApiKey) -> None:
        await self.db.call(lambda c: c.execute(
            "INSERT INTO api_keys (id, key_hash, tenant, record) VALUES (?, ?, ?, ?)",
            (key.id, key.key_hash, key.tenant, json.dumps(key.to_dict()))), write=True)

    async def api_key_by_hash(self, key_hash: str) -> ApiKey | None:
        row = await self.db.call(
            lambda c: c.execute("SELECT record FROM api_keys WHERE key_hash = ?", (key_hash,)).fetchone())
        return ApiKey.from_dict(json.loads(row[0])) if row else None

    async def list_api_keys(self, tenant: str | None = None) -> list[ApiKey]:
        def read(c: sqlite3.Connection):
            if tenant is None:
                return c.execute("SELECT record FROM api_keys").fetchall()
            return c.execute("SELECT record FROM api_keys WHERE tenant = ?", (tenant,)).fetchall()

        keys = [ApiKey.from_dict(json.loads(r[0])) for r in await self.db.call(read)]
        return sorted(keys, key=lambda k: k.created_at)

    async def revoke_api_key(self, key_id: str) -> ApiKey:
        def tx(c: sqlite3.Connection) -> ApiKey:
            row = c.execute("SELECT record FROM api_keys WHERE id = ?", (key_id,)).fetchone()
            if row is None:
                raise ApiKeyNotFound(key_id)
            record = ApiKey.from_dict(json.loads(row[0]))
            if record.revoked_at is None:
                record.revoked_at = now()
                c.execute("UPDATE api_keys SET record = ? WHERE id = ?", (json.dumps(record.to_dict()), key_id))
            return record

        return await self.db.call(tx, write=True)

    # ------------------------------------------------------------ uploaded versions
    async def allocate_version(self, tenant: str, adapter: str) -> int:
        validate_tenant(tenant)
        validate_name(adapter)

        def tx(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT last_version FROM counters WHERE tenant = ? AND adapter = ?",
                            (tenant, adapter)).fetchone()
            version = (row[0] if row else 0) + 1
            c.execute("INSERT OR REPLACE INTO counters (tenant, adapter, last_version) VALUES (?, ?, ?)",
                      (tenant, adapter, version))
            return version

        return await self.db.call(tx, write=True)

    async def add_version(self, version: AdapterVersion, quota: TenantQuota | None = None) -> None:
        def tx(c: sqlite3.Connection) -> None:
            if quota is not None:
                counts = _adapter_counts(c, version.tenant, [version.adapter])
                check_upload_quota(quota, version.tenant, counts["adapter_count"], counts["new_adapters"])
                check_bytes(quota, version.tenant, _usage(c, version.tenant), version.size_bytes)
            _write_version(c, version)
            if version.status is VersionStatus.READY:
                _became_ready(c, version)

        await self.db.call(tx, write=True)

    # ------------------------------------------------------------ inits
    async def submit_init_job(self, tenant, name, num_examples, tasks, options,
                              quota: TenantQuota | None = None) -> Job:
        job, _ = await self.submit_job_once(tenant, name, num_examples, tasks, options, quota, kind=JobKind.INIT)
        return job

    async def list_inits(self, tenant: str) -> list[Adapter]:
        return await self.db.call(lambda c: _list_named(c, tenant, JobKind.INIT))

    async def get_init(self, tenant: str, name: str) -> Adapter:
        return await self._get_named(tenant, name, JobKind.INIT)

    async def resolve_init(self, tenant: str, name: str, version: int | None) -> AdapterVersion:
        versions = await self.db.call(lambda c: _read_versions(c, tenant, name, JobKind.INIT))
        return pick_init_version(name, versions, version)

    async def delete_init(self, tenant: str, name: str) -> list[AdapterVersion]:
        return await self._delete_named(tenant, name, JobKind.INIT)

    # ------------------------------------------------------------ job metrics
    async def add_stats(self, increments: dict[str, float]) -> None:
        await self.db.call(lambda c: c.executemany(
            "INSERT INTO stats (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value", list(increments.items())), write=True)

    async def read_stats(self) -> dict[str, float]:
        return dict(await self.db.call(lambda c: c.execute("SELECT name, value FROM stats").fetchall()))

    async def close(self) -> None:
        self.db.close()


def _adapter_counts(c: sqlite3.Connection, tenant: str, creates: Sequence[str]) -> dict[str, int]:
    """The tenant's adapter names, and how many of `creates` are new (check_upload_quota's counts)."""
    count = c.execute("SELECT count(DISTINCT adapter) FROM versions WHERE tenant = ?", (tenant,)).fetchone()[0]
    new = sum(c.execute("SELECT 1 FROM versions WHERE tenant = ? AND adapter = ? LIMIT 1",
                        (tenant, name)).fetchone() is None for name in set(creates))
    return {"adapter_count": count, "new_adapters": new}


def _quota_counts(c: sqlite3.Connection, tenant: str, creates: Sequence[str]) -> dict[str, int]:
    """check_quota's counts: the tenant's jobs in flight, and _adapter_counts."""
    active = c.execute("SELECT count(*) FROM jobs WHERE expires_at IS NULL AND json_extract(record, '$.tenant') = ?",
                       (tenant,)).fetchone()[0]
    return {"active_jobs": active, **_adapter_counts(c, tenant, creates)}


@dataclass
class SqliteLease:
    job_id: str
    delivery_count: int
    consumer: str
    token: str


class SqliteJobQueue:
    """The queue table is the lease table: a row is free when it has no owner or its lease expired."""

    def __init__(self, db: _Db, settings: Settings):
        self.db = db
        self.lease_s = settings.lease_s

    def _try_claim(self, c: sqlite3.Connection, consumer: str) -> SqliteLease | None:
        t = now()
        row = c.execute("SELECT seq, job_id, delivery_count FROM queue WHERE owner IS NULL OR lease_expires_at <= ?"
                        " ORDER BY seq LIMIT 1", (t,)).fetchone()
        if row is None:
            return None
        seq, job_id, count = row
        token = uuid.uuid4().hex
        c.execute("UPDATE queue SET owner = ?, token = ?, lease_expires_at = ?, delivery_count = ? WHERE seq = ?",
                  (consumer, token, t + self.lease_s, count + 1, seq))
        return SqliteLease(job_id, count + 1, consumer, token)

    async def claim(self, consumer: str, block_ms: int) -> SqliteLease | None:
        deadline = time.monotonic() + max(0, block_ms) / 1000
        while True:
            lease = await self.db.call(lambda c: self._try_claim(c, consumer), write=True)
            if lease is not None or time.monotonic() >= deadline:
                return lease
            # Polling is fine: an embedded deployment has one or two workers and jobs take minutes.
            await asyncio.sleep(min(POLL_INTERVAL_S, max(0.0, deadline - time.monotonic())))

    async def heartbeat(self, lease: SqliteLease) -> None:
        def tx(c: sqlite3.Connection) -> int:
            return c.execute("UPDATE queue SET lease_expires_at = ? WHERE job_id = ? AND token = ?",
                             (now() + self.lease_s, lease.job_id, lease.token)).rowcount

        if not await self.db.call(tx, write=True):
            raise LeaseLost(lease.job_id)

    async def ack(self, lease: SqliteLease) -> None:
        await self.db.call(lambda c: c.execute("DELETE FROM queue WHERE job_id = ?", (lease.job_id,)), write=True)

    async def depth(self) -> QueueDepth:
        def read(c: sqlite3.Connection) -> QueueDepth:
            leased, total = c.execute("SELECT count(*) FILTER (WHERE owner IS NOT NULL), count(*) FROM queue").fetchone()
            return QueueDepth(waiting=total - leased, leased=leased)

        return await self.db.call(read)

    async def close(self) -> None:
        self.db.close()
