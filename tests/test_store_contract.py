"""One MetadataStore contract, run against both implementations (SQLite file, real Redis)."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from uuid import uuid4

import pytest

from adapters.backend import Backend, open_backend
from adapters.errors import (
    AdapterNotFound, AdapterNotReady, InvalidAdapterName, JobNotFound, StoreUnavailable,
)
from adapters.records import JobStatus, VersionStatus
from adapters.settings import Settings
from helpers import REDIS_URL, drop_redis_keys

EXAMPLES = [{"prompt": "2+2?", "completion": "4"}, {"prompt": "3+3?", "completion": "6"}]


def backend_settings(kind: str, tmp_path: Path) -> Settings:
    if kind == "sqlite":
        return Settings(data_dir=tmp_path, redis_url=None, lease_s=0.5)
    return Settings(data_dir=tmp_path, redis_url=REDIS_URL, redis_prefix=f"test-{uuid4().hex}", lease_s=0.5)




@pytest.fixture(params=["sqlite", "redis"])
async def backend(request, tmp_path):
    settings = backend_settings(request.param, tmp_path)
    b = open_backend(settings)
    yield b
    await b.close()
    if settings.redis_url:
        await drop_redis_keys(settings)


async def submit(b: Backend, name="adp", tenant="acme", examples=EXAMPLES):
    return await b.store.submit_job(tenant, name, len(examples), examples, {"steps": 5})


async def test_job_lifecycle_and_resolution(backend: Backend):
    s = backend.store
    job = await submit(backend)
    assert (job.status, job.version, job.options) == (JobStatus.QUEUED, 1, {"steps": 5})
    assert (await s.get_job(job.id, tenant="acme")).to_dict() == job.to_dict()
    assert await s.get_job_examples(job.id) == EXAMPLES

    running = await s.update_job(job.id, status=JobStatus.RUNNING, step=2, total_steps=5, loss=1.5)
    assert running.status is JobStatus.RUNNING and running.started_at is not None
    assert (await s.get_adapter("acme", "adp")).versions[0].status is VersionStatus.RUNNING

    assert await s.finish_job(job.id, {"eval_loss": 0.25}) is True
    done = await s.get_job(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.finished_at is not None and done.loss == 1.5
    v1 = await s.resolve("acme", "adp", None)
    assert (v1.version, v1.status, v1.metrics, v1.job_id) == (1, VersionStatus.READY, {"eval_loss": 0.25}, job.id)
    with pytest.raises(JobNotFound):  # examples are not kept once the job is done
        await s.get_job_examples(job.id)

    job2 = await submit(backend)
    assert (await s.resolve("acme", "adp", None)).version == 1  # v2 not ready: newest READY wins
    with pytest.raises(AdapterNotReady) as info:
        await s.resolve("acme", "adp", 2)
    assert info.value.status == "queued" and "queued" in str(info.value)
    await s.finish_job(job2.id, {})
    assert (await s.resolve("acme", "adp", None)).version == 2
    assert (await s.resolve("acme", "adp", 1)).version == 1


async def test_versions_count_per_tenant_and_name(backend: Backend):
    versions = [(await submit(backend, name=n, tenant=t)).version
                for t, n in [("a", "x"), ("a", "x"), ("b", "x"), ("a", "y"), ("a", "x"), ("b", "x")]]
    assert versions == [1, 2, 1, 1, 3, 2]


async def test_concurrent_submits_get_distinct_versions(backend: Backend):
    jobs = await asyncio.gather(*(submit(backend) for _ in range(10)))
    assert sorted(j.version for j in jobs) == list(range(1, 11))
    assert len({j.id for j in jobs}) == 10


@pytest.mark.parametrize("steps", [[], ["running"], ["running", "failed"]])
async def test_not_ready_names_newest_status(backend: Backend, steps):
    s = backend.store
    job = await submit(backend)
    for step in steps:
        if step == "running":
            await s.update_job(job.id, status=JobStatus.RUNNING)
        else:
            await s.fail_job(job.id, "out of memory")
    expected = steps[-1] if steps else "queued"
    with pytest.raises(AdapterNotReady) as info:
        await s.resolve("acme", "adp", None)
    assert info.value.status == expected and expected in str(info.value)
    if expected == "failed":
        assert (await s.get_adapter("acme", "adp")).versions[0].error == "out of memory"


async def test_not_found(backend: Backend):
    s = backend.store
    with pytest.raises(AdapterNotFound):
        await s.resolve("acme", "nope", None)
    with pytest.raises(AdapterNotFound):
        await s.get_adapter("acme", "nope")
    with pytest.raises(AdapterNotFound):
        await s.delete_adapter("acme", "nope")
    with pytest.raises(JobNotFound):
        await s.get_job("job-missing")
    await submit(backend)
    with pytest.raises(AdapterNotFound):
        await s.resolve("acme", "adp", 7)


async def test_tenant_isolation(backend: Backend):
    s = backend.store
    job = await submit(backend, tenant="acme")
    await s.finish_job(job.id, {})
    await submit(backend, name="other", tenant="globex")
    with pytest.raises(JobNotFound):
        await s.get_job(job.id, tenant="globex")
    with pytest.raises(AdapterNotFound):
        await s.resolve("globex", "adp", None)
    with pytest.raises(AdapterNotFound):
        await s.delete_adapter("globex", "adp")
    assert [a.name for a in await s.list_adapters("acme")] == ["adp"]
    assert [a.name for a in await s.list_adapters("globex")] == ["other"]
    assert await s.list_adapters("initech") == []


async def test_delete_never_resurrected_by_inflight_job(backend: Backend):
    s = backend.store
    done = await submit(backend)
    await s.finish_job(done.id, {})
    inflight = await submit(backend)
    await s.update_job(inflight.id, status=JobStatus.RUNNING)

    removed = await s.delete_adapter("acme", "adp")
    assert [v.version for v in removed] == [1, 2]
    assert await s.finish_job(inflight.id, {"eval_loss": 0.1}) is False
    await s.update_job(inflight.id, step=3)  # a late progress report must not revive it either
    with pytest.raises(AdapterNotFound):
        await s.get_adapter("acme", "adp")
    assert await s.list_adapters("acme") == []
    job = await s.get_job(inflight.id)
    assert job.status is JobStatus.CANCELLED and job.step == 0  # a worker claiming it later skips it

    # Version numbers are never reused: vLLM caches LoRAs by name, so v1 must never mean two things.
    again = await submit(backend)
    assert again.version == 3
    assert await s.finish_job(inflight.id, {}) is False
    assert (await s.get_adapter("acme", "adp")).versions[0].status is VersionStatus.QUEUED


async def test_finished_jobs_are_terminal(backend: Backend):
    s = backend.store
    job = await submit(backend)
    await s.fail_job(job.id, "boom")
    await s.update_job(job.id, status=JobStatus.RUNNING)
    assert await s.finish_job(job.id, {}) is False
    assert (await s.get_job(job.id)).status is JobStatus.FAILED
    with pytest.raises(AdapterNotReady):
        await s.resolve("acme", "adp", None)


async def test_update_rejects_identity_fields(backend: Backend):
    job = await submit(backend)
    with pytest.raises(ValueError):
        await backend.store.update_job(job.id, tenant="globex")
    assert (await backend.store.get_job(job.id)).tenant == "acme"


async def test_rejected_submit_writes_nothing(backend: Backend):
    s = backend.store
    with pytest.raises(InvalidAdapterName):
        await submit(backend, name="../etc")
    with pytest.raises(TypeError):  # unserialisable examples fail before any write
        await submit(backend, examples=[{"prompt": object()}])
    assert await s.list_adapters("acme") == []
    assert (await submit(backend)).version == 1
    assert await backend.queue.claim("w", 0) is not None
    assert await backend.queue.claim("w", 0) is None


async def test_unreachable_redis_fails_fast(tmp_path):
    b = open_backend(Settings(data_dir=tmp_path, redis_url="redis://127.0.0.1:1/0"))
    try:
        for call in (b.store.ping, lambda: submit(b), lambda: b.queue.claim("w", 100)):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call()
            assert time.monotonic() - started < 3
    finally:
        await b.close()


_SUBMITTER = """
import asyncio, sys
from adapters.backend import open_backend
from adapters.settings import Settings
async def main():
    b = open_backend(Settings(data_dir=sys.argv[1], redis_url=None))
    for _ in range(15):
        await b.store.submit_job("acme", "adp", 1, [{"prompt": "p", "completion": "c"}], {})
    await b.close()
asyncio.run(main())
"""


async def test_sqlite_file_shared_by_processes(tmp_path):
    # Two real processes on one file: BEGIN IMMEDIATE must serialise version allocation between them.
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", _SUBMITTER, str(tmp_path)], cwd=root) for _ in range(2)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    b = open_backend(Settings(data_dir=tmp_path, redis_url=None))
    try:
        versions = [v.version for v in (await b.store.get_adapter("acme", "adp")).versions]
        assert versions == list(range(1, 31))
    finally:
        await b.close()
