"""Init families over HTTP on both stores (SQLite file, real Redis): POST /v1/inits queues a job of kind init,
GET/DELETE /v1/inits, POST /adapt with "init" (pinned to a version, recorded in the job's options), and every bad
input answered in the one error shape with nothing written. Jobs are driven through the store API (no worker;
tests/test_inits_stack.py runs the real one)."""
from __future__ import annotations

from pathlib import Path

import pytest

from adapters.records import JobKind, JobStatus
from adapters.store import TenantQuota
from gateway_helpers import gateway_env, store_settings

EXAMPLES = [{"prompt": "hello world", "completion": "positive"}, {"prompt": "bad world", "completion": "negative"}]
MAX_EXAMPLES = 5


def family(*names: str, examples=EXAMPLES) -> list[dict]:
    return [{"name": n, "examples": examples} for n in names]


@pytest.fixture(params=["sqlite", "redis"])
async def env(request, tmp_path: Path):
    settings = store_settings(request.param, tmp_path, "test-inits", max_examples=MAX_EXAMPLES)
    async with gateway_env(settings) as (client, backend):
        yield client, backend


def error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}, response.text
    return response.json()["error"]


async def test_bad_inputs_get_the_one_error_shape_and_write_nothing(env):
    client, backend = env
    store = backend.store
    bad_bodies = {
        "one task only": ({"name": "desk", "tasks": family("a")}, 400, "invalid_task_count", "tasks"),
        "no task": ({"name": "desk", "tasks": []}, 400, "invalid_task_count", "tasks"),
        "65 tasks": ({"name": "desk", "tasks": family(*(f"t{i}" for i in range(65)))}, 400, "invalid_task_count",
                     "tasks"),
        "an empty task": ({"name": "desk", "tasks": [*family("a"), {"name": "b", "examples": []}]}, 400, None,
                          "tasks.1.examples"),
        "duplicate task names": ({"name": "desk", "tasks": family("a", "b", "a")}, 400, "duplicate_task_name",
                                 "tasks.2.name"),
        "too many examples in a task": ({"name": "desk", "tasks": [*family("a"), {
            "name": "b", "examples": EXAMPLES * 3}]}, 400, None, "tasks.1.examples"),
        "an example over max_seq_len": ({"name": "desk", "max_seq_len": 8, "tasks": [*family("a"), {
            "name": "b", "examples": [{"prompt": "hello world " * 20, "completion": "positive"}]}]}, 400,
            "example_too_long", "tasks.1.examples.0"),
        "a task name no adapter may have": ({"name": "desk", "tasks": family("a", "B/../c")}, 400,
                                            "invalid_adapter_name", "tasks.1.name"),
        "a bad init name": ({"name": "../desk", "tasks": family("a", "b")}, 400, "invalid_adapter_name", None),
        "an option out of bounds": ({"name": "desk", "outer_steps": 0, "tasks": family("a", "b")}, 400, None,
                                    "outer_steps"),
        "an unknown field": ({"name": "desk", "tasks": family("a", "b"), "outer_step": 3}, 400, None, "outer_step"),
        "a bad example": ({"name": "desk", "tasks": [*family("a"), {"name": "b", "examples": [{"prompt": "x"}]}]},
                          400, None, "tasks.1.examples.0.completion"),
    }
    for what, (body, status, code, param) in bad_bodies.items():
        err = error(await client.post("/v1/inits", json=body), status)
        assert code is None or err["code"] == code, (what, err)
        assert param is None or err.get("param") == param, (what, err)

    # /adapt naming an unknown init, another tenant's, or one with no ready version.
    other = await store.submit_init_job("other", "theirs", 4, family("a", "b"), {})
    await store.finish_job(other.id, {})
    mine = await store.submit_init_job("default", "queued-one", 4, family("a", "b"), {})
    for init, status, code in (("nope", 404, "init_not_found"), ("theirs", 404, "init_not_found"),
                               ("theirs@v1", 404, "init_not_found"), ("queued-one", 409, "init_not_ready"),
                               ("queued-one@v2", 404, "init_not_found"), ("Bad Name", 400, "invalid_adapter_name")):
        err = error(await client.post("/adapt", json={"adapter": "x", "examples": EXAMPLES, "init": init}), status)
        assert err["code"] == code, (init, err)
    error_get = error(await client.get("/v1/inits/theirs"), 404)
    assert error_get["code"] == "init_not_found"
    assert error(await client.delete("/v1/inits/theirs"), 404)["code"] == "init_not_found"

    # Nothing was written: the tenant's only job and init are the one made through the store above.
    assert [j.id for j in (await store.list_jobs("default", 100)).jobs] == [mine.id]
    assert [i.name for i in await store.list_inits("default")] == ["queued-one"]
    assert await store.list_adapters("default") == []
    assert (await store.get_init("other", "theirs")).newest_ready is not None


async def test_init_family_lifecycle_over_http(env):
    client, backend = env
    store = backend.store
    body = {"name": "desk", "tasks": family("refunds", "shipping", "returns"), "outer_steps": 2,
            "register_task_adapters": True}
    submitted = await client.post("/v1/inits", json=body)
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert (job["kind"], job["adapter"], job["version"], job["model"], job["status"]) == (
        "init", "desk", 1, "desk@v1", "queued")
    assert job["options"]["outer_steps"] == 2 and job["options"]["register_task_adapters"] is True
    assert job["num_examples"] == 6 and submitted.headers["location"] == f"/adapt/{job['id']}"
    record = await store.get_job(job["id"])
    assert record.kind is JobKind.INIT
    assert [t["name"] for t in await store.get_job_examples(job["id"])] == ["refunds", "shipping", "returns"]
    # The same job routes follow it.
    assert (await client.get(f"/adapt/{job['id']}")).json()["kind"] == "init"

    listed = (await client.get("/v1/inits")).json()
    assert [(i["name"], i["object"], i["status"], i["ready_version"]) for i in listed["data"]] == [
        ("desk", "init", "queued", None)]
    assert (await client.get("/v1/adapters")).json()["data"] == []  # an init is no adapter

    await store.update_job(job["id"], status=JobStatus.RUNNING)
    await store.finish_job(job["id"], {"method": "fomaml"})
    got = (await client.get("/v1/inits/desk")).json()
    assert (got["ready_version"], got["versions"][0]["metrics"]) == (1, {"method": "fomaml"})

    # /adapt pins the init to the version it resolved, in the job's options (and the idempotency fingerprint).
    for init in ("desk", "desk@v1"):
        adapt = await client.post("/adapt", json={"adapter": f"new-{init[-1]}", "examples": EXAMPLES, "init": init})
        assert adapt.status_code == 202, adapt.text
        assert adapt.json()["options"]["init"] == "desk@v1" and adapt.json()["kind"] == "adapt"
    plain = (await client.post("/adapt", json={"adapter": "plain", "examples": EXAMPLES})).json()
    assert "init" not in plain["options"]

    deleted = await client.delete("/v1/inits/desk")
    assert deleted.status_code == 200 and deleted.json() == {
        "name": "desk", "object": "init.deleted", "deleted": True, "versions": [1]}
    assert error(await client.get("/v1/inits/desk"), 404)["code"] == "init_not_found"
    err = error(await client.post("/adapt", json={"adapter": "later", "examples": EXAMPLES, "init": "desk"}), 404)
    assert err["code"] == "init_not_found"


async def submit(client, body: dict, headers=None) -> dict:
    response = await client.post("/v1/inits", json=body, headers=headers or {})
    assert response.status_code in (200, 202), response.text
    return response.json() | {"_replayed_header": response.headers.get("idempotent-replayed")}


async def test_init_submits_are_idempotent_like_adapt(env):
    """POST /v1/inits replays by the rule of POST /adapt (adapters/idempotency.py): an identical request within the
    window, or the same Idempotency-Key, returns the job it created, and says so."""
    client, backend = env
    body = {"name": "desk", "tasks": family("a", "b"), "outer_steps": 2}
    first = await submit(client, body)
    assert first["idempotent_replay"] is False and first["_replayed_header"] is None
    same = await submit(client, body)
    assert (same["id"], same["idempotent_replay"], same["_replayed_header"]) == (first["id"], True, "true")
    assert (await submit(client, body | {"outer_steps": 3}))["version"] == 2  # other options: another job
    # An adapt request is never a replay of an init job, even with the same name.
    adapt = await client.post("/adapt", json={"adapter": "desk", "examples": EXAMPLES})
    assert adapt.status_code == 202 and adapt.json()["kind"] == "adapt" and adapt.json()["idempotent_replay"] is False

    keyed = await submit(client, {"name": "keyed", "tasks": family("a", "b")}, {"Idempotency-Key": "init-1"})
    await client.post(f"/adapt/{keyed['id']}/cancel")
    replay = await submit(client, {"name": "keyed", "tasks": family("a", "b")}, {"Idempotency-Key": "init-1"})
    assert (replay["id"], replay["status"], replay["idempotent_replay"]) == (keyed["id"], "cancelled", True)
    reused = await client.post("/v1/inits", json={"name": "keyed", "tasks": family("a", "c")},
                               headers={"Idempotency-Key": "init-1"})
    assert error(reused, 422)["code"] == "idempotency_key_reused"
    # One key space per tenant: the key an init used cannot name an adapt job.
    reused = await client.post("/adapt", json={"adapter": "keyed", "examples": EXAMPLES},
                               headers={"Idempotency-Key": "init-1"})
    assert error(reused, 422)["code"] == "idempotency_key_reused"
    bad = error(await client.post("/v1/inits", json=body, headers={"Idempotency-Key": "a b"}), 400)
    assert bad["param"] == "Idempotency-Key"
    assert [v.version for v in (await backend.store.get_init("default", "keyed")).versions] == [1]

    gw = client.app.state.gateway
    gw.settings = gw.settings.model_copy(update={"idempotency_window_s": 0})
    again = await submit(client, body)
    assert (again["version"], again["idempotent_replay"]) == (3, False)


async def test_init_submits_follow_the_adapt_quota(env):
    """One quota rule for every job (adapters/store.py check_quota): jobs in flight, the stored-bytes limit, and the
    adapter names a job creates (an init family's task adapters when it registers them). Refused: 429
    quota_exceeded, nothing written; a replay needs no quota."""
    client, backend = env
    store = backend.store
    gw = client.app.state.gateway
    gw.quota = TenantQuota(max_active_jobs=2, max_adapters=3, max_bytes=1000)
    tasks = family("t1", "t2", "t3")

    # Adapter names: one stored adapter + 3 task adapters to register passes the limit of 3; without registering
    # them (an init is no adapter name) or with one of them existing already, the family fits.
    done = (await client.post("/adapt", json={"adapter": "t1", "examples": EXAMPLES})).json()
    await store.update_job(done["id"], status=JobStatus.RUNNING)
    await store.finish_job(done["id"], {}, size_bytes=10)
    over = error(await client.post("/v1/inits", json={"name": "x", "tasks": family("a", "b", "c"),
                                                       "register_task_adapters": True}), 429)
    assert (over["code"], over["param"]) == ("quota_exceeded", "max_adapters") and "3 new adapters" in over["message"]
    registered = await submit(client, {"name": "desk", "tasks": tasks, "register_task_adapters": True})
    plain = await submit(client, {"name": "other", "tasks": family("a", "b", "c", "d")})

    # Jobs in flight: the two init jobs above are the tenant's limit, for inits and adapt jobs alike.
    busy = error(await client.post("/v1/inits", json={"name": "third", "tasks": tasks}), 429)
    assert (busy["code"], busy["param"]) == ("quota_exceeded", "max_active_jobs")
    assert error(await client.post("/adapt", json={"adapter": "t1", "examples": EXAMPLES, "seed": 1}),
                 429)["param"] == "max_active_jobs"
    replay = await submit(client, {"name": "desk", "tasks": tasks, "register_task_adapters": True})
    assert (replay["id"], replay["idempotent_replay"]) == (registered["id"], True)

    # Stored bytes: an init's files count like an adapter's, and a tenant at its limit gets no new job of either
    # kind; deleting the init gives its bytes back.
    for job in (registered, plain):
        await store.update_job(job["id"], status=JobStatus.RUNNING)
    await store.finish_job(registered["id"], {}, size_bytes=990)
    assert await store.tenant_usage("default") == 1000
    full = error(await client.post("/v1/inits", json={"name": "third", "tasks": tasks}), 429)
    assert (full["code"], full["param"]) == ("quota_exceeded", "max_bytes")
    assert error(await client.post("/adapt", json={"adapter": "t1", "examples": EXAMPLES, "seed": 1}),
                 429)["param"] == "max_bytes"
    assert (await client.delete("/v1/inits/desk")).status_code == 200
    assert await store.tenant_usage("default") == 10
    assert (await client.post("/v1/inits", json={"name": "third", "tasks": tasks})).status_code == 202

    # Nothing a refusal wrote: the inits and adapters are the ones accepted above.
    assert sorted(i.name for i in await store.list_inits("default")) == ["other", "third"]
    assert [a.name for a in await store.list_adapters("default")] == ["t1"]
    assert [j.kind.value for j in (await store.list_jobs("default", 100)).jobs] == ["init", "init", "init", "adapt"]
