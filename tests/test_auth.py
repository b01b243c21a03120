"""API keys, tenant namespaces and per-tenant quotas, against the real stores (SQLite file, real Redis).

No vLLM: completions go to a stand-in replica (tests/gateway_helpers.py) that records the model name it was sent,
so the test sees exactly which vLLM-side name the gateway derived.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from uuid import uuid4

import pytest

from adapters.api_keys import hash_key, new_api_key
from adapters.names import vllm_name
from adapters.backend import open_backend
from adapters.errors import ApiKeyNotFound, QuotaExceeded
from adapters.records import JobStatus
from adapters.settings import Settings
from adapters.store import TenantQuota
from gateway_helpers import ServerThread, fake_replica, gateway_client, tokenizer_dir
from helpers import REDIS_URL, drop_redis_keys

EXAMPLES = [{"prompt": "hello world", "completion": "positive"}]




@pytest.fixture(scope="module")
def replica():
    app = fake_replica("r0")
    server = ServerThread(app).start()
    yield app, server
    server.stop()


def make_settings(kind: str, tmp_path: Path, replica_url: str, **extra) -> Settings:
    common = dict(data_dir=tmp_path / "data", base_model=str(tokenizer_dir(tmp_path)), vllm_urls=[replica_url],
                  health_interval_s=0.1, auth="required", **extra)
    if kind == "sqlite":
        return Settings(redis_url=None, **common)
    return Settings(redis_url=REDIS_URL, redis_prefix=f"test-auth-{uuid4().hex}", **common)


class Env:
    def __init__(self, client, backend, settings, replica_app, keys):
        self.client, self.backend, self.settings, self.replica, self.keys = (
            client, backend, settings, replica_app, keys)

    def as_(self, tenant: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}


@pytest.fixture(params=["sqlite", "redis"])
async def env(request, tmp_path, replica):
    app, server = replica
    app.state.calls.clear()
    settings = make_settings(request.param, tmp_path, server.url)
    backend = open_backend(settings)
    keys = {}
    for tenant in ("acme", "globex"):
        record, key = new_api_key(tenant, f"{tenant} test key")
        await backend.store.create_api_key(record)
        keys[tenant] = key
    try:
        async with gateway_client(settings, backend) as client:
            yield Env(client, backend, settings, app, keys)
    finally:
        await backend.close()
        if settings.redis_url:
            await drop_redis_keys(settings)


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    assert body["error"]["code"] == code, body
    return body["error"]


async def finish(settings: Settings, store, job_id: str) -> None:
    """What a worker leaves behind: the version's folder (which a delete must find and purge), then the record."""
    job = await store.get_job(job_id)
    folder = settings.adapter_root / vllm_name(job.tenant, job.adapter, job.version)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    await store.update_job(job_id, status=JobStatus.RUNNING, step=1, total_steps=1)
    assert await store.finish_job(job_id, {"loss_after": 0.1})


# ---------------------------------------------------------------- 401s
@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer mlk_not-a-real-key", "bearer x y",
    "Bearer " + "a" * 5000, "Token mlk_x",
])
async def test_missing_or_bad_keys_are_401_with_www_authenticate(env, header):
    headers = {} if header is None else {"Authorization": header}
    for method, path, body in [("GET", "/v1/adapters", None), ("GET", "/v1/models", None),
                               ("POST", "/adapt", {"adapter": "x", "examples": EXAMPLES}),
                               ("POST", "/v1/completions", {"model": "x", "prompt": "hi"}),
                               ("GET", "/adapt/job-123", None), ("DELETE", "/v1/adapters/x", None)]:
        response = await env.client.request(method, path, headers=headers, json=body)
        error = assert_error(response, 401, "missing_api_key" if not header else "invalid_api_key")
        assert error["type"] == "authentication_error"
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert await env.backend.store.list_adapters("acme") == []
    assert env.replica.state.calls == []


async def test_non_ascii_key_is_401_not_a_crash(env):
    response = await env.client.get("/v1/adapters", headers={"Authorization": "Bearer ключ".encode("utf-8")})
    assert_error(response, 401, "invalid_api_key")


async def test_health_stays_open(env):
    response = await env.client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


async def test_revoked_key_is_401_at_once(env):
    assert (await env.client.get("/v1/adapters", headers=env.as_("acme"))).status_code == 200
    (record,) = await env.backend.store.list_api_keys("acme")
    await env.backend.store.revoke_api_key(record.id)
    assert_error(await env.client.get("/v1/adapters", headers=env.as_("acme")), 401, "invalid_api_key")
    assert (await env.client.get("/v1/adapters", headers=env.as_("globex"))).status_code == 200


# ---------------------------------------------------------------- tenant namespaces
async def test_two_tenants_own_the_same_name_without_collision(env):
    client = env.client
    jobs = {}
    for tenant in ("acme", "globex"):
        response = await client.post("/adapt", headers=env.as_(tenant), json={"adapter": "sentiment",
                                                                             "examples": EXAMPLES})
        assert response.status_code == 202, response.text
        jobs[tenant] = response.json()
        assert jobs[tenant]["version"] == 1  # versions count per (tenant, name)
        await finish(env.settings, env.backend.store, jobs[tenant]["id"])

    for tenant, other in (("acme", "globex"), ("globex", "acme")):
        mine = (await client.get("/v1/adapters", headers=env.as_(tenant))).json()["data"]
        assert [(a["name"], a["versions"][0]["job_id"]) for a in mine] == [("sentiment", jobs[tenant]["id"])]
        # Another tenant's job is 404 (not 403): its existence does not leak.
        assert_error(await client.get(f"/adapt/{jobs[other]['id']}", headers=env.as_(tenant)), 404,
                     "job_not_found")
        assert_error(await client.get(f"/adapt/{jobs[other]['id']}?wait=true&timeout=1", headers=env.as_(tenant)),
                     404, "job_not_found")
        models = {m["id"]: m for m in (await client.get("/v1/models", headers=env.as_(tenant))).json()["data"]}
        assert models["sentiment"]["owned_by"] == tenant

    # The vLLM-side name comes from the key's tenant, whichever way the adapter is named.
    env.replica.state.calls.clear()
    for tenant in ("acme", "globex"):
        for body in ({"model": "sentiment", "prompt": "x"}, {"model": "sentiment@v1", "prompt": "x"}):
            response = await client.post("/v1/completions", headers=env.as_(tenant), json=body)
            assert response.status_code == 200, response.text
            assert response.json()["model"] == "sentiment@v1"
    assert [c[1]["model"] for c in env.replica.state.calls] == ["acme~sentiment@v1"] * 2 + ["globex~sentiment@v1"] * 2

    # Spelling another tenant's vLLM name is an invalid name, not a way in.
    for model in ("globex~sentiment@v1", "globex~sentiment", "../globex~sentiment@v1"):
        assert_error(await client.post("/v1/completions", headers=env.as_("acme"), json={"model": model}), 400,
                     "invalid_adapter_name")

    # Deleting is scoped too: acme deletes its own; globex's survives and still serves.
    assert (await client.delete("/v1/adapters/sentiment", headers=env.as_("acme"))).status_code == 200
    assert_error(await client.get("/v1/adapters/sentiment", headers=env.as_("acme")), 404, "adapter_not_found")
    assert (await client.get("/v1/adapters/sentiment", headers=env.as_("globex"))).status_code == 200
    assert_error(await client.delete("/v1/adapters/sentiment", headers=env.as_("acme")), 404, "adapter_not_found")
    assert (await client.post("/v1/completions", headers=env.as_("globex"),
                              json={"model": "sentiment", "prompt": "x"})).status_code == 200


async def test_a_tenant_only_adapter_is_404_for_the_other(env):
    client = env.client
    job = (await client.post("/adapt", headers=env.as_("acme"), json={"adapter": "secret",
                                                                      "examples": EXAMPLES})).json()
    await finish(env.settings, env.backend.store, job["id"])
    for method, path, body in [("GET", "/v1/adapters/secret", None), ("DELETE", "/v1/adapters/secret", None),
                               ("POST", "/v1/completions", {"model": "secret", "prompt": "x"}),
                               ("POST", "/v1/completions", {"model": "secret@v1", "prompt": "x"}),
                               ("POST", "/v1/completions", {"adapter": "secret", "prompt": "x"})]:
        response = await client.request(method, path, headers=env.as_("globex"), json=body)
        assert_error(response, 404, "adapter_not_found")
    assert (await client.get("/v1/adapters", headers=env.as_("globex"))).json()["data"] == []
    assert "secret" not in {m["id"] for m in (await client.get("/v1/models", headers=env.as_("globex"))).json()["data"]}
    assert (await client.get("/v1/adapters/secret", headers=env.as_("acme"))).status_code == 200


# ---------------------------------------------------------------- quotas through the API
async def _store_rows(env) -> int:
    total = 0
    for tenant in ("acme", "globex"):
        total += sum(len(a.versions) for a in await env.backend.store.list_adapters(tenant))
    return total


@pytest.fixture
async def tight_env(env):
    """The same gateway with small quotas (what METALORA_QUOTA_* would set)."""
    gw = env.client.app.state.gateway
    gw.settings = gw.settings.model_copy(update={"quota_max_active_jobs": 2, "quota_max_adapters": 3,
                                                 "quota_max_example_bytes": 200})
    gw.quota = TenantQuota(max_active_jobs=2, max_adapters=3)
    return env


async def test_active_job_quota_is_429_and_writes_nothing(tight_env):
    env = tight_env
    ids = []
    for name in ("a", "b"):
        response = await env.client.post("/adapt", headers=env.as_("acme"), json={"adapter": name,
                                                                                 "examples": EXAMPLES})
        assert response.status_code == 202
        ids.append(response.json()["id"])
    before = await _store_rows(env)
    error = assert_error(await env.client.post("/adapt", headers=env.as_("acme"),
                                               json={"adapter": "c", "examples": EXAMPLES}), 429, "quota_exceeded")
    assert "2 jobs (adapt or init) queued or running" in error["message"] and error["param"] == "max_active_jobs"
    assert await _store_rows(env) == before
    # Another tenant has its own quota.
    assert (await env.client.post("/adapt", headers=env.as_("globex"),
                                  json={"adapter": "c", "examples": EXAMPLES})).status_code == 202
    # A finished (or failed) job frees its slot.
    await finish(env.settings, env.backend.store, ids[0])
    assert (await env.client.post("/adapt", headers=env.as_("acme"),
                                  json={"adapter": "c", "examples": EXAMPLES})).status_code == 202
    await env.backend.store.fail_job(ids[1], "boom")
    assert (await env.client.post("/adapt", headers=env.as_("acme"),
                                  json={"adapter": "c", "examples": EXAMPLES})).status_code == 202


async def test_adapter_count_quota_allows_new_versions_of_existing_names(tight_env):
    env = tight_env
    for name in ("a", "b", "c"):
        job = (await env.client.post("/adapt", headers=env.as_("acme"),
                                     json={"adapter": name, "examples": EXAMPLES})).json()
        await finish(env.settings, env.backend.store, job["id"])
    error = assert_error(await env.client.post("/adapt", headers=env.as_("acme"),
                                               json={"adapter": "d", "examples": EXAMPLES}), 429, "quota_exceeded")
    assert "3 adapters" in error["message"] and error["param"] == "max_adapters"
    response = await env.client.post("/adapt", headers=env.as_("acme"), json={"adapter": "a", "examples": EXAMPLES,
                                                                             "seed": 1})  # not a replay of v1
    assert response.status_code == 202 and response.json()["version"] == 2
    await finish(env.settings, env.backend.store, response.json()["id"])
    assert (await env.client.delete("/v1/adapters/b", headers=env.as_("acme"))).status_code == 200
    assert (await env.client.post("/adapt", headers=env.as_("acme"),
                                  json={"adapter": "d", "examples": EXAMPLES})).status_code == 202


async def test_example_bytes_quota(tight_env):
    env = tight_env
    big = [{"prompt": "hello " * 20, "completion": "world " * 20}]  # 240 bytes > 200
    error = assert_error(await env.client.post("/adapt", headers=env.as_("acme"),
                                               json={"adapter": "a", "examples": big}), 429, "quota_exceeded")
    assert "240 bytes" in error["message"] and "200" in error["message"]
    assert await _store_rows(env) == 0


# ---------------------------------------------------------------- store contract: keys + quotas
@pytest.fixture(params=["sqlite", "redis"])
async def backend(request, tmp_path):
    if request.param == "sqlite":
        settings = Settings(data_dir=tmp_path, redis_url=None)
    else:
        settings = Settings(data_dir=tmp_path, redis_url=REDIS_URL, redis_prefix=f"test-keys-{uuid4().hex}")
    b = open_backend(settings)
    b.settings = settings
    yield b
    await b.close()
    if settings.redis_url:
        await drop_redis_keys(settings)


async def test_api_key_store_contract(backend):
    s = backend.store
    r1, k1 = new_api_key("acme", "ci")
    r2, k2 = new_api_key("globex", "")
    await s.create_api_key(r1)
    await s.create_api_key(r2)
    assert k1.startswith("mlk_") and len(k1) >= 40 and k1 != k2
    assert (await s.api_key_by_hash(hash_key(k1))).to_dict() == r1.to_dict()
    assert await s.api_key_by_hash(hash_key(k1 + "x")) is None
    assert [k.id for k in await s.list_api_keys()] == [r1.id, r2.id]
    assert [k.id for k in await s.list_api_keys("globex")] == [r2.id]
    revoked = await s.revoke_api_key(r1.id)
    assert revoked.revoked_at is not None and not revoked.active
    assert (await s.revoke_api_key(r1.id)).revoked_at == revoked.revoked_at  # idempotent
    assert not (await s.api_key_by_hash(hash_key(k1))).active
    assert (await s.api_key_by_hash(hash_key(k2))).active
    with pytest.raises(ApiKeyNotFound):
        await s.revoke_api_key("key_missing")
    with pytest.raises(ValueError):
        new_api_key("Not A Tenant")

    # The plaintext is nowhere in the store.
    settings = backend.settings
    if settings.redis_url:
        import redis.asyncio as aioredis

        client = aioredis.from_url(settings.redis_url, decode_responses=True)
        try:
            dump = ""
            async for key in client.scan_iter(match=f"{settings.redis_prefix}:*"):
                dump += json.dumps(await client.hgetall(key))
        finally:
            await client.aclose()
    else:
        with sqlite3.connect(settings.sqlite_path) as db:
            dump = "\n".join(db.iterdump())
    assert r1.key_hash in dump and k1 not in dump and k2 not in dump and k1[4:] not in dump


async def test_quota_is_checked_in_the_submit_transaction(backend):
    s = backend.store
    quota = TenantQuota(max_active_jobs=3, max_adapters=100)

    async def one(i):
        try:
            return await s.submit_job("acme", f"n{i}", 1, EXAMPLES, {}, quota=quota)
        except QuotaExceeded:
            return None

    results = await asyncio.gather(*(one(i) for i in range(12)))
    accepted = [j for j in results if j is not None]
    assert len(accepted) == 3  # never more than the limit, however the submits interleave
    assert len(await s.list_adapters("acme")) == 3
    # Names: a new name needs a free name slot; same for concurrent submits.
    await asyncio.gather(*(finish(backend.settings, s, j.id) for j in accepted))
    names = TenantQuota(max_active_jobs=100, max_adapters=5)

    async def named(i):
        try:
            return await s.submit_job("acme", f"m{i}", 1, EXAMPLES, {}, quota=names)
        except QuotaExceeded:
            return None

    results = await asyncio.gather(*(named(i) for i in range(8)))
    assert sum(r is not None for r in results) == 2
    assert len(await s.list_adapters("acme")) == 5


# ---------------------------------------------------------------- mode selection
def test_auth_mode_defaults():
    assert Settings(redis_url=REDIS_URL, auth="auto").auth_required
    assert not Settings(redis_url=None, auth="auto", host="127.0.0.1").auth_required
    assert not Settings(redis_url=None, auth="auto", host="localhost").auth_required
    assert Settings(redis_url=None, auth="auto", host="0.0.0.0").auth_required
    assert Settings(redis_url=None, auth="auto", host="gateway.example").auth_required
    assert not Settings(redis_url=REDIS_URL, auth="disabled").auth_required
    assert Settings(redis_url=None, auth="required").auth_required


async def test_disabled_auth_ignores_keys_and_warns_at_start(tmp_path, replica, caplog):
    _, server = replica
    settings = make_settings("sqlite", tmp_path, server.url).model_copy(update={"auth": "disabled"})
    backend = open_backend(settings)
    try:
        with caplog.at_level(logging.WARNING, logger="metalora.gateway"):
            async with gateway_client(settings, backend) as client:
                # OpenAI clients always send some key; an open server accepts any, as the default tenant.
                for headers in ({}, {"Authorization": "Bearer unused"}, {"Authorization": "garbage"}):
                    assert (await client.get("/v1/adapters", headers=headers)).status_code == 200
                response = await client.post("/adapt", json={"adapter": "a", "examples": EXAMPLES})
                assert response.status_code == 202
        assert any("authentication is DISABLED" in r.getMessage() for r in caplog.records)
        assert [a.name for a in await backend.store.list_adapters("default")] == ["a"]
    finally:
        await backend.close()


async def test_required_auth_without_keys_warns_at_start(tmp_path, replica, caplog):
    _, server = replica
    settings = make_settings("sqlite", tmp_path, server.url)
    backend = open_backend(settings)
    try:
        with caplog.at_level(logging.WARNING, logger="metalora.gateway"):
            async with gateway_client(settings, backend):
                pass
        assert any("no API key exists yet" in r.getMessage() for r in caplog.records)
    finally:
        await backend.close()


# ---------------------------------------------------------------- CLI
def test_keys_cli_round_trip(tmp_path, monkeypatch, capsys):
    from metalora.cli import main

    monkeypatch.setenv("METALORA_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("METALORA_REDIS_URL", raising=False)

    def run(*argv) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exit_:
            main(list(argv))
        out, err = capsys.readouterr()
        return exit_.value.code, out, err

    code, out, err = run("keys", "create", "--tenant", "acme", "--name", "ci runner")
    key = out.strip()
    assert code == 0 and key.startswith("mlk_") and "cannot be shown again" in err
    code, out, _ = run("keys", "list")
    assert code == 0 and "acme" in out and "ci runner" in out and "active" in out and key not in out
    key_id = out.splitlines()[1].split()[0]
    store = open_backend(Settings(data_dir=tmp_path, redis_url=None)).store
    record = asyncio.run(store.api_key_by_hash(hash_key(key)))
    assert record.id == key_id and record.tenant == "acme"
    assert run("keys", "revoke", key_id)[0] == 0
    assert "revoked" in run("keys", "list", "--tenant", "acme")[1]
    assert run("keys", "list", "--tenant", "other")[1].count("\n") == 1  # header only
    code, _, err = run("keys", "revoke", "key_nope")
    assert code == 1 and "not found" in err
    code, _, err = run("keys", "create", "--tenant", "Bad Tenant")
    assert code != 0
