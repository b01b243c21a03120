"""Jobs like OpenAI fine-tuning jobs, at the store level, on both stores (SQLite file, real Redis): the job
list (newest first, cursor, filters), cancel, the bounded per-job event log, and submit_job_once's replays."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from adapters import keys as K
from adapters.backend import Backend
from adapters.errors import IdempotencyKeyReused, JobNotCancellable, JobNotFound
from adapters.idempotency import Dedupe, key_digest, request_fingerprint
from adapters.job_events import step_event
from adapters.records import JobErrorCode, JobStatus, VersionStatus
from test_store_contract import EXAMPLES, backend  # noqa: F401 (backend: the two-store fixture)

WINDOW_S = 60.0


async def submit(b: Backend, name="adp", tenant="acme", options=None):
    return await b.store.submit_job(tenant, name, len(EXAMPLES), EXAMPLES, options or {"steps": 5})


def dedupe(name="adp", options=None, key: str | None = None, window_s: float = WINDOW_S) -> Dedupe:
    return Dedupe(request_fingerprint("base", name, EXAMPLES, options or {"steps": 5}), window_s,
                  key_digest(key) if key else None)


async def once(b: Backend, d: Dedupe, name="adp", tenant="acme", options=None):
    return await b.store.submit_job_once(tenant, name, len(EXAMPLES), EXAMPLES, options or {"steps": 5}, dedupe=d)


def types(events) -> list[str]:
    return [e.type for e in events]


# ---------------------------------------------------------------- list
async def test_list_newest_first_with_cursor_and_filters(backend: Backend):
    s = backend.store
    jobs = [await submit(backend, name=n) for n in ("a", "b", "a", "c", "a")]
    await submit(backend, name="a", tenant="globex")
    ids = [j.id for j in reversed(jobs)]

    page = await s.list_jobs("acme", limit=10)
    assert [j.id for j in page.jobs] == ids and not page.has_more
    first = await s.list_jobs("acme", limit=2)
    assert [j.id for j in first.jobs] == ids[:2] and first.has_more
    rest = await s.list_jobs("acme", limit=2, after=first.jobs[-1].id)
    assert [j.id for j in rest.jobs] == ids[2:4] and rest.has_more
    last = await s.list_jobs("acme", limit=2, after=rest.jobs[-1].id)
    assert [j.id for j in last.jobs] == ids[4:] and not last.has_more

    await s.fail_job(jobs[2].id, "boom")
    only_a = await s.list_jobs("acme", limit=10, adapter="a")
    assert [j.id for j in only_a.jobs] == [jobs[4].id, jobs[2].id, jobs[0].id]
    failed = await s.list_jobs("acme", limit=10, status=JobStatus.FAILED)
    assert [j.id for j in failed.jobs] == [jobs[2].id]
    queued_a = await s.list_jobs("acme", limit=1, adapter="a", status=JobStatus.QUEUED)
    assert [j.id for j in queued_a.jobs] == [jobs[4].id] and queued_a.has_more
    assert (await s.list_jobs("initech", limit=10)).jobs == []
    with pytest.raises(JobNotFound):  # another tenant's job is no cursor
        await s.list_jobs("globex", limit=10, after=jobs[0].id)


async def test_list_pages_through_jobs_created_in_the_same_instant(backend: Backend, monkeypatch):
    # Equal created_at: the id breaks the tie, the same way on both stores, so no page repeats or skips one.
    monkeypatch.setattr("adapters.records.time", SimpleNamespace(time=lambda: 1_700_000_000.0))
    jobs = [await submit(backend, name=f"n{i}") for i in range(5)]
    seen, after = [], None
    while True:
        page = await backend.store.list_jobs("acme", limit=2, after=after)
        seen += [j.id for j in page.jobs]
        if not page.has_more:
            break
        after = page.jobs[-1].id
    assert seen == sorted((j.id for j in jobs), reverse=True)


# ---------------------------------------------------------------- cancel
async def test_cancel_queued_and_running_jobs(backend: Backend):
    s, q = backend.store, backend.queue
    queued = await submit(backend, name="q")
    cancelled = await s.cancel_job(queued.id, tenant="acme")
    assert cancelled.status is JobStatus.CANCELLED and cancelled.finished_at is not None
    assert (await s.get_adapter("acme", "q")).versions[0].status is VersionStatus.CANCELLED
    assert (await s.cancel_job(queued.id)).to_dict() == cancelled.to_dict()  # again: a no-op
    lease = await q.claim("w", 0)  # still delivered: the worker sees a finished job and only acks it
    assert lease.job_id == queued.id and (await s.get_job(lease.job_id)).status.finished

    running = await submit(backend, name="r")
    await s.update_job(running.id, status=JobStatus.RUNNING, step=2, total_steps=5, loss=1.0,
                       estimated_finish=1e10)
    await s.cancel_job(running.id)
    # The worker's next progress report changes nothing and tells it the job was cancelled.
    report = await s.update_job(running.id, step=3, loss=0.9, events=[step_event(running.id, 3, 5, 0.9)])
    assert (report.status, report.step, report.estimated_finish) == (JobStatus.CANCELLED, 2, None)
    assert await s.finish_job(running.id, {"loss_after": 0.1}) is False
    assert types(await s.list_job_events(running.id)) == ["queued", "started", "cancelled"]
    with pytest.raises(JobNotFound):
        await s.cancel_job(running.id, tenant="globex")


async def test_finished_jobs_cannot_be_cancelled(backend: Backend):
    s = backend.store
    done, failed = await submit(backend), await submit(backend)
    await s.finish_job(done.id, {})
    await s.fail_job(failed.id, "boom", JobErrorCode.INVALID_INPUT.value)
    for job, status in ((done, "succeeded"), (failed, "failed")):
        with pytest.raises(JobNotCancellable) as info:
            await s.cancel_job(job.id)
        assert info.value.status == status
    assert (await s.get_job(failed.id)).error_code == "invalid_input"


async def test_deleting_an_adapter_cancels_its_jobs(backend: Backend):
    s = backend.store
    running = await submit(backend)
    await s.update_job(running.id, status=JobStatus.RUNNING, step=1)
    await s.delete_adapter("acme", "adp")
    job = await s.get_job(running.id)
    assert (job.status, job.error_code) == (JobStatus.CANCELLED, "adapter_deleted")
    events = await s.list_job_events(running.id)
    assert types(events) == ["queued", "started", "cancelled"] and events[-1].data["code"] == "adapter_deleted"


# ---------------------------------------------------------------- events
async def test_event_log_of_a_job(backend: Backend):
    s = backend.store
    job = await submit(backend)
    await s.update_job(job.id, status=JobStatus.RUNNING, attempts=1)
    await s.update_job(job.id, step=2, loss=1.5, events=[step_event(job.id, 1, 5, 2.0), step_event(job.id, 2, 5, 1.5)])
    await s.fail_job(job.id, "out of memory")
    events = await s.list_job_events(job.id)
    assert types(events) == ["queued", "started", "step", "step", "failed"]
    assert [e.id for e in events] == [1, 2, 3, 4, 5] and {e.job_id for e in events} == {job.id}
    assert events[3].data == {"step": 2, "total_steps": 5, "loss": 1.5}
    assert (events[-1].level, events[-1].data["code"]) == ("error", "training_error")
    assert types(await s.list_job_events(job.id, after=2, limit=2)) == ["step", "step"]
    assert await s.list_job_events(job.id, after=5) == []
    await s.update_job(job.id, events=[step_event(job.id, 3, 5, 1.0)])  # after the end: nothing appended
    assert len(await s.list_job_events(job.id)) == 5


async def test_event_log_keeps_the_newest(backend: Backend, monkeypatch):
    monkeypatch.setattr(K, "JOB_EVENTS_KEPT", 4)
    s = backend.store
    job = await submit(backend)
    await s.update_job(job.id, status=JobStatus.RUNNING)
    for step in range(1, 6):
        await s.update_job(job.id, step=step, events=[step_event(job.id, step, 5, 1.0 / step)])
    await s.finish_job(job.id, {})
    events = await s.list_job_events(job.id)
    assert [e.id for e in events] == [5, 6, 7, 8] and types(events)[-1] == "succeeded"
    assert [e.id for e in await s.list_job_events(job.id, after=1, limit=2)] == [5, 6]
    assert [e.id for e in await s.list_job_events(job.id, after=6)] == [7, 8]


# ---------------------------------------------------------------- submit_job_once
async def test_the_same_request_replays_its_job(backend: Backend):
    s = backend.store
    first, replayed = await once(backend, dedupe())
    assert not replayed and first.request_hash == dedupe().request_hash
    again, replayed = await once(backend, dedupe())
    assert replayed and again.id == first.id
    other, replayed = await once(backend, dedupe(options={"steps": 6}), options={"steps": 6})
    assert not replayed and other.version == 2
    elsewhere, replayed = await s.submit_job_once("globex", "adp", 2, EXAMPLES, {"steps": 5}, dedupe=dedupe())
    assert not replayed and elsewhere.tenant == "globex"

    await s.update_job(first.id, status=JobStatus.RUNNING)
    await s.finish_job(first.id, {})
    assert (await once(backend, dedupe()))[0].id == first.id  # succeeded: still the answer
    await s.delete_adapter("acme", "adp")
    fresh, replayed = await once(backend, dedupe())  # its version is gone: train again
    assert not replayed and fresh.version == 3
    await s.cancel_job(fresh.id)
    retried, replayed = await once(backend, dedupe())  # cancelled (or failed): train again
    assert not replayed and retried.version == 4


async def test_idempotency_key_replays_whatever_became_of_its_job(backend: Backend):
    s = backend.store
    job, _ = await once(backend, dedupe(key="k-1"))
    await s.fail_job(job.id, "boom")
    again, replayed = await once(backend, dedupe(key="k-1"))
    assert replayed and again.id == job.id and again.status is JobStatus.FAILED
    with pytest.raises(IdempotencyKeyReused):
        await once(backend, dedupe(options={"steps": 9}, key="k-1"), options={"steps": 9})
    assert [v.version for v in (await s.get_adapter("acme", "adp")).versions] == [1]
    # A new key for the same (failed) request trains again; that key then replays the new job.
    second, replayed = await once(backend, dedupe(key="k-2"))
    assert not replayed and second.version == 2
    assert (await once(backend, dedupe(key="k-2")))[0].id == second.id


async def test_replay_needs_no_quota_and_concurrent_duplicates_make_one_job(backend: Backend):
    from adapters.store import TenantQuota

    s = backend.store
    results = await asyncio.gather(*(once(backend, dedupe()) for _ in range(6)))
    assert len({job.id for job, _ in results}) == 1 and sum(not r for _, r in results) == 1
    full = TenantQuota(max_active_jobs=1)
    job, replayed = await s.submit_job_once("acme", "adp", 2, EXAMPLES, {"steps": 5}, quota=full, dedupe=dedupe())
    assert replayed and job.id == results[0][0].id


async def test_the_window_ends(backend: Backend):
    first, _ = await once(backend, dedupe(key="k", window_s=0.3))
    await asyncio.sleep(1.2)  # Redis expiries have one-second resolution
    again, replayed = await once(backend, dedupe(key="k", window_s=0.3))
    assert not replayed and again.id != first.id
