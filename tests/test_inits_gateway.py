"""Init families over HTTP on both stores (SQLite file, real Redis): POST /v1/inits queues a job of kind init,
GET/DELETE /v1/inits, POST /adapt with "init" (pinned to a version, recorded in the job's options), and every bad
input answered in the one error shape with nothing written. Jobs are driven through the store API (no worker;
tests/test_inits_stack.py runs the real one)."""
from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import pytest

from adapters.records import JobKind, JobStatus
from adapters.settings import Settings
from gateway_helpers import free_port, gateway_env, tokenizer_dir
from helpers import REDIS_URL

EXAMPLES = [{"prompt": "hello world", "completion": "positive"}, {"prompt": "bad world", "completion": "negative"}]
MAX_EXAMPLES = 5


def family(*names: str, examples=EXAMPLES) -> list[dict]:
    return [{"name": n, "examples": examples} for n in names]


@pytest.fixture(params=["sqlite", "redis"])
async def env(request, tmp_path: Path):
    common = dict(data_dir=tmp_path / "data", base_model=str(tokenizer_dir(tmp_path)), max_examples=MAX_EXAMPLES,
                  vllm_urls=[f"http://127.0.0.1:{free_port()}"], health_interval_s=0.2)
    if request.param == "sqlite":
        settings = Settings(redis_url=None, **common)
    else:
        settings = Settings(redis_url=REDIS_URL, redis_prefix=f"test-inits-{uuid4().hex}", **common)
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
