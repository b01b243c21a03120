"""Version retention, the latest pointer and the stored-bytes quota (issue 19, item 2), on both stores.

- resolve(name) reads the adapter's latest pointer and the one record it names: the other versions' records
  are made unreadable and resolution still answers (reading the version list would fail on them);
- prune_versions keeps the newest N ready versions, never the latest nor one queued or running; a pinned pruned
  version is 404 version_pruned, through the gateway too;
- the tenant's stored bytes go up when a version is ready and down when it is pruned or deleted; a job is refused
  (429 quota_exceeded, nothing written) once the tenant is at its limit, an upload that would pass it.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from uuid import uuid4

import pytest
import redis.asyncio as aioredis

from adapters import keys as K
from adapters.backend import Backend, open_backend
from adapters.errors import AdapterNotFound, AdapterNotReady, QuotaExceeded, VersionPruned
from adapters.records import AdapterVersion, JobStatus, VersionStatus
from adapters.artifacts import LocalArtifactStore
from adapters.names import vllm_name
from adapters.retention import LEFTOVER_MIN_AGE_S, folder_bytes, prune
from adapters.settings import Settings
from adapters.store import TenantQuota
from gateway_helpers import free_port, gateway_env
from helpers import REDIS_URL, drop_redis_keys
from test_gateway_validation import make_settings
from test_store_contract import backend, backend_settings, submit  # noqa: F401  (the two-store fixture)
from test_upload import (  # noqa: F401  (replica: the stand-in replica fixture)
    adapter_files, assert_nothing_left, multipart, replica, settings_for,
)


async def ready(b: Backend, size: int = 0, name: str = "adp"):
    job = await submit(b, name=name)
    assert await b.store.finish_job(job.id, {}, size_bytes=size)
    return job


async def break_record(b: Backend, settings, tenant: str, name: str, version: int) -> None:
    """Make one version record unparseable, straight in the backing store."""
    if settings.redis_url:
        client = aioredis.from_url(settings.redis_url)
        await client.hset(K.Keys(settings.redis_prefix).versions(tenant, name), str(version), "{not json")
        await client.aclose()
    else:
        with sqlite3.connect(settings.sqlite_path) as c:
            c.execute("UPDATE versions SET record = '{not json' WHERE tenant = ? AND adapter = ? AND version = ?",
                      (tenant, name, version))


@pytest.fixture(params=["sqlite", "redis"])
async def two(request, tmp_path):
    """A backend and its settings (break_record needs the settings)."""
    settings = backend_settings(request.param, tmp_path)
    b = open_backend(settings)
    yield b, settings
    await b.close()
    if settings.redis_url:
        await drop_redis_keys(settings)


async def test_resolution_reads_one_record_not_the_version_list(two):
    b, settings = two
    for _ in range(3):
        await ready(b)
    await submit(b)  # v4 queued
    for version in (1, 2, 4):
        await break_record(b, settings, "acme", "adp", version)
    assert (await b.store.resolve("acme", "adp", None)).version == 3
    assert (await b.store.resolve("acme", "adp", 3)).version == 3


async def test_latest_moves_only_forward(backend: Backend):  # noqa: F811
    s = backend.store
    jobs = [await submit(backend) for _ in range(3)]
    await s.finish_job(jobs[2].id, {})
    await s.finish_job(jobs[1].id, {})  # finishing late does not make v2 the latest
    assert (await s.resolve("acme", "adp", None)).version == 3
    with pytest.raises(AdapterNotReady):
        await s.resolve("acme", "adp", 1)


async def test_retention_keeps_the_newest_ready_and_never_the_latest_or_in_flight(backend: Backend):  # noqa: F811
    s = backend.store
    await ready(backend, 100)  # v1
    failed = await submit(backend)  # v2
    await s.fail_job(failed.id, "boom")
    await ready(backend, 100)  # v3
    await ready(backend, 100)  # v4
    running = await submit(backend)  # v5
    await s.update_job(running.id, status=JobStatus.RUNNING)
    assert await s.tenant_usage("acme") == 300

    assert [v.version for v in await s.prune_versions("acme", "adp", 1)] == [1, 2, 3]
    assert [v.version for v in (await s.get_adapter("acme", "adp")).versions] == [4, 5]
    assert await s.tenant_usage("acme") == 100
    assert await s.prune_versions("acme", "adp", 1) == []
    for version in (1, 2, 3):
        with pytest.raises(VersionPruned) as info:
            await s.resolve("acme", "adp", version)
        assert info.value.code == "version_pruned" and isinstance(info.value, AdapterNotFound)
    with pytest.raises(AdapterNotFound) as info:  # never allocated: not found, not pruned
        await s.resolve("acme", "adp", 9)
    assert info.value.code == "adapter_not_found"
    assert (await s.resolve("acme", "adp", None)).version == 4

    # v6 finishes before v5: it is the latest, and v5 finishing later is the one pruned.
    v6 = await submit(backend)
    await s.finish_job(v6.id, {}, size_bytes=50)
    assert [v.version for v in await s.prune_versions("acme", "adp", 1)] == [4]
    await s.finish_job(running.id, {}, size_bytes=70)
    assert [v.version for v in await s.prune_versions("acme", "adp", 1)] == [5]
    assert (await s.resolve("acme", "adp", None)).version == 6
    assert await s.tenant_usage("acme") == 50

    await s.delete_adapter("acme", "adp")
    assert await s.tenant_usage("acme") == 0
    with pytest.raises(AdapterNotFound) as info:  # after a delete, an old pin is simply gone
        await s.resolve("acme", "adp", 2)
    assert info.value.code == "adapter_not_found"


async def test_stored_bytes_quota(backend: Backend):  # noqa: F811
    s = backend.store
    quota = TenantQuota(max_bytes=250)
    await ready(backend, 100)
    await ready(backend, 100)
    job = await s.submit_job("acme", "adp", 2, [{"prompt": "a", "completion": "b"}] * 2, {}, quota=quota)
    await s.finish_job(job.id, {}, size_bytes=100)  # a job's size is known only once written: 300 now
    with pytest.raises(QuotaExceeded) as info:
        await s.submit_job("acme", "other", 1, [{"prompt": "a", "completion": "b"}], {}, quota=quota)
    assert info.value.quota == "max_bytes"
    assert [a.name for a in await s.list_adapters("acme")] == ["adp"]  # nothing written
    upload = AdapterVersion(tenant="acme", adapter="up", version=await s.allocate_version("acme", "up"),
                            job_id="upload-1", num_examples=0, status=VersionStatus.READY, size_bytes=10)
    with pytest.raises(QuotaExceeded):
        await s.add_version(upload, TenantQuota(max_bytes=305))
    await s.prune_versions("acme", "adp", 1)
    assert await s.tenant_usage("acme") == 100
    await s.add_version(upload, TenantQuota(max_bytes=305))  # room again after retention
    assert await s.tenant_usage("acme") == 110
    assert (await s.resolve("acme", "up", None)).version == 1  # an uploaded version is the latest at once
    assert (await s.submit_job("globex", "adp", 1, [{"prompt": "a", "completion": "b"}], {}, quota=quota)).version == 1


async def test_jobs_in_flight_do_not_hold_back_an_upload(backend: Backend):  # noqa: F811
    # An upload is no job: a tenant at its in-flight job limit can still upload; at its adapter limit it cannot.
    s = backend.store
    await s.submit_job("acme", "adp", 1, [{"prompt": "a", "completion": "b"}], {}, quota=TenantQuota(max_active_jobs=1))
    with pytest.raises(QuotaExceeded) as info:
        await s.submit_job("acme", "adp", 1, [{"prompt": "a", "completion": "b"}], {}, quota=TenantQuota(max_active_jobs=1))
    assert info.value.quota == "max_active_jobs"
    upload = AdapterVersion(tenant="acme", adapter="up", version=await s.allocate_version("acme", "up"),
                            job_id="upload-1", num_examples=0, status=VersionStatus.READY, size_bytes=10)
    with pytest.raises(QuotaExceeded) as info:
        await s.add_version(upload, TenantQuota(max_active_jobs=1, max_adapters=1))
    assert info.value.quota == "max_adapters"
    await s.add_version(upload, TenantQuota(max_active_jobs=1, max_adapters=2))
    assert (await s.resolve("acme", "up", None)).version == 1


@pytest.fixture(params=["sqlite", "redis"])
async def env(request, tmp_path):
    settings = make_settings(request.param, tmp_path, quota_max_stored_bytes=120)
    async with gateway_env(settings) as (client, backend):
        yield client, backend


async def test_gateway_answers_pruned_pins_and_the_bytes_quota(env):
    client, b = env
    for _ in range(3):
        job = await b.store.submit_job("default", "adp", 1, [{"prompt": "a", "completion": "b"}], {})
        await b.store.finish_job(job.id, {}, size_bytes=60)
    await b.store.prune_versions("default", "adp", 2)
    response = await client.post("/v1/completions", json={"model": "adp@v1", "prompt": "hi"})
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "version_pruned" and "adp@v1" in error["message"]
    body = {"adapter": "adp", "examples": [{"prompt": "hello world", "completion": "positive"}]}
    refused = await client.post("/adapt", json=body)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "quota_exceeded" and refused.json()["error"]["param"] == "max_bytes"
    assert [v["version"] for v in (await client.get("/v1/adapters/adp")).json()["versions"]] == [2, 3]
    assert json.loads((await client.get("/v1/adapters/adp")).text)["name"] == "adp"


async def test_prune_sweeps_the_folders_a_crash_left_once_they_are_old(backend: Backend, tmp_path):  # noqa: F811
    s = backend.store
    artifacts = LocalArtifactStore(tmp_path / "adapters")
    unloaded: list[str] = []

    async def unload(name: str) -> None:
        unloaded.append(name)

    def write(version: int) -> Path:  # a version's folder, as the worker leaves it
        folder = artifacts.path(vllm_name("acme", "adp", version))
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        return folder

    def age(folder: Path) -> None:
        old = time.time() - 2 * LEFTOVER_MIN_AGE_S
        os.utime(folder, (old, old))

    for version in (1, 2, 3):
        await ready(backend)
        write(version)
    # A crash between the records' removal and the folders': v1's record is gone, its folder stays.
    assert [v.version for v in await s.prune_versions("acme", "adp", 2)] == [1]
    await ready(backend)
    write(4)
    assert [v.version for v in await prune(s, artifacts, "acme", "adp", 2, unload)] == [2]
    assert sorted(artifacts.version_ages("acme", "adp")) == [1, 3, 4]  # v1 written just now: spared
    age(artifacts.path(vllm_name("acme", "adp", 1)))
    upload = write(await s.allocate_version("acme", "adp"))  # v5: an upload whose record is not written yet
    age(upload)
    await ready(backend)  # v6
    write(6)
    assert [v.version for v in await prune(s, artifacts, "acme", "adp", 2, unload)] == [3]
    assert sorted(artifacts.version_ages("acme", "adp")) == [4, 5, 6]  # v5 is above every version removed
    assert unloaded == [vllm_name("acme", "adp", v) for v in (2, 3, 1)]


# ---------------------------------------------------------------- uploads: the gateway's own retention and quota
@pytest.fixture(params=["sqlite", "redis"])
async def upload_env(request, tmp_path, replica):  # noqa: F811
    app, server = replica
    app.state.refuse, app.state.calls, app.state.loaded = False, [], set()

    @contextlib.asynccontextmanager
    async def env(**extra):
        common = {"vllm_urls": [server.url], "health_interval_s": 0.2, **extra}
        if request.param == "redis":
            common.update(redis_url=REDIS_URL, redis_prefix=f"test-retain-{uuid4().hex}")
        settings = settings_for(tmp_path / uuid4().hex, **common)
        async with gateway_env(settings) as (client, backend):
            yield client, backend, settings, app

    return env


async def test_an_upload_prunes_old_versions_files_and_loads(upload_env):
    async with upload_env(retain_versions=2) as (client, backend, settings, replica_app):
        for expected in (1, 2, 3):
            response = await client.post("/v1/adapters/keep/versions", files=multipart(adapter_files()))
            assert response.status_code == 201 and response.json()["version"] == expected, response.text
        assert sorted(p.name for p in settings.adapter_root.iterdir() if "keep" in p.name) == [
            "default~keep@v2", "default~keep@v3"]
        assert ("unload", {"lora_name": "default~keep@v1"}) in replica_app.state.calls
        assert "default~keep@v1" not in replica_app.state.loaded
        gone = await client.get("/v1/adapters/keep@v1/download")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "version_pruned"
        assert (await client.get("/v1/adapters/keep@v2/download")).status_code == 200
        assert [v["version"] for v in (await client.get("/v1/adapters/keep")).json()["versions"]] == [2, 3]
        one = (await backend.store.resolve("default", "keep", 3)).size_bytes
        assert one > 0 and await backend.store.tenant_usage("default") == 2 * one


async def test_deleting_an_adapter_removes_the_folders_retention_left(upload_env):
    async with upload_env(retain_versions=2) as (client, backend, settings, replica_app):
        for _ in range(3):
            assert (await client.post("/v1/adapters/keep/versions", files=multipart(adapter_files()))).status_code == 201
        # v1's folder back, as a crash between its record's prune and its folder's removal leaves it.
        leftover = settings.adapter_root / "default~keep@v1"
        shutil.copytree(settings.adapter_root / "default~keep@v2", leftover)
        old = time.time() - 2 * LEFTOVER_MIN_AGE_S
        os.utime(leftover, (old, old))
        assert (await client.delete("/v1/adapters/keep")).status_code == 200
        assert not [p.name for p in settings.adapter_root.iterdir() if "keep" in p.name]
        assert [c for c in replica_app.state.calls if c == ("unload", {"lora_name": "default~keep@v1"})]


async def test_an_upload_over_the_stored_bytes_quota_writes_nothing(upload_env):
    async with upload_env(quota_max_stored_bytes=1000) as (client, backend, settings, replica_app):
        response = await client.post("/v1/adapters/big/versions", files=multipart(adapter_files()))
        assert response.status_code == 429, response.text
        assert response.json()["error"]["code"] == "quota_exceeded"
        assert response.json()["error"]["param"] == "max_bytes"
        await assert_nothing_left(client, backend, settings, "big", replica_app)
        assert replica_app.state.calls == []  # refused before anything was written or loaded


# ---------------------------------------------------------------- the worker: retention after each job
async def test_the_worker_keeps_the_newest_versions_and_counts_their_bytes(tmp_path):
    from adapters.artifacts import open_artifacts
    from test_artifact_integrity import FakeEngine
    from trainer.worker import Worker

    settings = Settings(data_dir=tmp_path, redis_url=None, retain_versions=1,
                        vllm_urls=[f"http://127.0.0.1:{free_port()}"])
    b = open_backend(settings)
    artifacts = open_artifacts(settings)
    worker = Worker(settings, b, artifacts, FakeEngine(), asyncio.Event())
    try:
        for version in (1, 2, 3):
            job = await b.store.submit_job("acme", "adp", 1, [{"prompt": "2+2?", "completion": " 4"}], {})
            await worker.process(await b.queue.claim(worker.consumer, 1000))
            assert (await b.store.get_job(job.id)).status is JobStatus.SUCCEEDED
            assert [v.version for v in (await b.store.get_adapter("acme", "adp")).versions] == [version]
            assert sorted(p.name for p in settings.adapter_root.iterdir()) == [f"acme~adp@v{version}"]
        folder = folder_bytes(settings.adapter_root / "acme~adp@v3")
        assert folder > 0 and await b.store.tenant_usage("acme") == folder
        with pytest.raises(VersionPruned):
            await b.store.resolve("acme", "adp", 2)
    finally:
        await b.close()
