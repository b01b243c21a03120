"""Init families at the store level, on both stores (SQLite file, real Redis): an init job is an ordinary job on
the same queue, its versions live in their own namespace (never listed or resolved as adapters), and the job
rules (finish, cancel, delete, quota, tenancy) hold for it as for adapt jobs."""
from __future__ import annotations

import pytest

from adapters.backend import Backend
from adapters.errors import AdapterNotFound, InitNotFound, InitNotReady, QuotaExceeded
from adapters.records import AdapterVersion, JobErrorCode, JobKind, JobStatus, VersionStatus
from adapters.store import TenantQuota
from test_store_contract import EXAMPLES, backend  # noqa: F401 (backend: the two-store fixture)

TASKS = [{"name": "a", "examples": EXAMPLES}, {"name": "b", "examples": EXAMPLES}]


async def submit_init(b: Backend, name="desk", tenant="acme", quota=None):
    return await b.store.submit_init_job(tenant, name, 4, TASKS, {"outer_steps": 2}, quota=quota)


async def test_init_job_is_queued_on_the_shared_queue_and_versioned_apart_from_adapters(backend: Backend):
    s, q = backend.store, backend.queue
    job = await submit_init(backend)
    assert (job.kind, job.adapter, job.version, job.status) == (JobKind.INIT, "desk", 1, JobStatus.QUEUED)
    assert await s.get_job_examples(job.id) == TASKS
    lease = await q.claim("w1", 0)
    assert lease is not None and lease.job_id == job.id
    # An adapter of the same name is another namespace: its own version 1, and neither lists the other.
    adapt = await s.submit_job("acme", "desk", 2, EXAMPLES, {})
    assert adapt.version == 1 and adapt.kind is JobKind.ADAPT
    assert [a.name for a in await s.list_adapters("acme")] == ["desk"]
    assert [v.job_id for v in (await s.get_adapter("acme", "desk")).versions] == [adapt.id]
    assert [(i.name, [v.job_id for v in i.versions]) for i in await s.list_inits("acme")] == [("desk", [job.id])]

    with pytest.raises(InitNotReady):
        await s.resolve_init("acme", "desk", None)
    await s.update_job(job.id, status=JobStatus.RUNNING, step=1, total_steps=2)
    assert (await s.get_init("acme", "desk")).versions[0].status is VersionStatus.RUNNING
    assert await s.finish_job(job.id, {"method": "fomaml"}) is True
    v1 = await s.resolve_init("acme", "desk", None)
    assert (v1.version, v1.status, v1.kind, v1.metrics) == (1, VersionStatus.READY, JobKind.INIT, {"method": "fomaml"})
    assert (await s.resolve_init("acme", "desk", 1)).job_id == job.id
    # The adapter of the same name is untouched by the init's success.
    assert (await s.get_adapter("acme", "desk")).versions[0].status is VersionStatus.QUEUED

    second = await submit_init(backend)
    assert second.version == 2
    assert (await s.resolve_init("acme", "desk", None)).version == 1  # v2 is not ready
    with pytest.raises(InitNotFound):
        await s.resolve_init("acme", "desk", 7)


async def test_init_tenancy_delete_and_quota(backend: Backend):
    s = backend.store
    job = await submit_init(backend)
    with pytest.raises(InitNotFound):
        await s.resolve_init("other", "desk", None)
    with pytest.raises(InitNotFound):
        await s.get_init("other", "desk")
    with pytest.raises(InitNotFound):
        await s.delete_init("other", "desk")
    assert await s.list_inits("other") == []

    # Init jobs count against the tenant's jobs in flight, like adapt jobs; a refused one writes nothing.
    await s.submit_job("acme", "adp", 2, EXAMPLES, {})
    with pytest.raises(QuotaExceeded):
        await submit_init(backend, name="second", quota=TenantQuota(max_active_jobs=2))
    with pytest.raises(InitNotFound):
        await s.get_init("acme", "second")

    removed = await s.delete_init("acme", "desk")
    assert [v.version for v in removed] == [1]
    cancelled = await s.get_job(job.id)
    assert (cancelled.status, cancelled.error_code) == (JobStatus.CANCELLED, JobErrorCode.ADAPTER_DELETED.value)
    with pytest.raises(InitNotFound):
        await s.get_init("acme", "desk")
    # A worker finishing the cancelled job cannot resurrect the deleted init.
    assert await s.finish_job(job.id, {}) is False
    with pytest.raises(InitNotFound):
        await s.resolve_init("acme", "desk", None)
    # Numbers are never reused after a delete (a cached folder name must stay unique).
    assert (await submit_init(backend)).version == 2
    # InitNotFound is an AdapterNotFound (one 404 class), with its own code.
    assert issubclass(InitNotFound, AdapterNotFound) and InitNotFound.code == "init_not_found"


async def test_deleting_a_task_adapter_leaves_its_family_job_running(backend: Backend):
    """register_task_adapters adds versions owned by the init job while it still runs: deleting one of those
    adapters must not cancel the family's job."""
    s = backend.store
    job = await submit_init(backend)
    await s.update_job(job.id, status=JobStatus.RUNNING)
    version = await s.allocate_version("acme", "a")
    await s.add_version(AdapterVersion(tenant="acme", adapter="a", version=version, job_id=job.id, num_examples=2,
                                       status=VersionStatus.READY))
    assert [v.version for v in await s.delete_adapter("acme", "a")] == [version]
    assert (await s.get_job(job.id)).status is JobStatus.RUNNING
    assert await s.finish_job(job.id, {}) is True
    assert (await s.resolve_init("acme", "desk", None)).status is VersionStatus.READY
