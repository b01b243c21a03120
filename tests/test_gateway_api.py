"""The gateway API against the real stores: jobs, adapters, models, delete, health, and the OpenAI proxy.

Jobs are driven to completion directly through the store API (no worker). The proxy is exercised against
tiny stand-in replicas (tests/gateway_helpers.py); the real-vLLM end-to-end test lives elsewhere.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from uuid import uuid4

import pytest

from adapters.artifacts import LocalArtifactStore
from adapters.names import DEFAULT_TENANT, vllm_name
from adapters.records import JobStatus
from adapters.settings import Settings
from gateway_helpers import ServerThread, fake_replica, gateway_env, tokenizer_dir
from helpers import REDIS_URL

EXAMPLES = [{"prompt": "hello world", "completion": "positive"}, {"prompt": "bad world", "completion": "negative"}]




@pytest.fixture(scope="module")
def replicas():
    apps = [fake_replica("r0"), fake_replica("r1")]
    servers = [ServerThread(app).start() for app in apps]
    yield list(zip(apps, servers))
    for server in servers:
        server.stop()


@pytest.fixture(params=["sqlite", "redis"])
async def env(request, tmp_path: Path, replicas):
    for app, _ in replicas:
        app.state.calls.clear()
        app.state.healthy = True
    common = dict(data_dir=tmp_path / "data", base_model=str(tokenizer_dir(tmp_path)),
                  vllm_urls=[server.url for _, server in replicas], health_interval_s=0.1)
    if request.param == "sqlite":
        settings = Settings(redis_url=None, **common)
    else:
        settings = Settings(redis_url=REDIS_URL, redis_prefix=f"test-gwapi-{uuid4().hex}", **common)
    async with gateway_env(settings) as (client, backend):
        yield client, backend, settings


async def train_directly(backend, settings, name: str, loss: float = 0.5) -> str:
    """What the worker would do: submit, run, write the artifact folder, finish. Returns the job id."""
    store = backend.store
    job = await store.submit_job(DEFAULT_TENANT, name, len(EXAMPLES), EXAMPLES, {"steps": 4})
    await store.update_job(job.id, status=JobStatus.RUNNING, step=4, total_steps=4, loss=loss)
    with LocalArtifactStore(settings.adapter_root).staging(vllm_name(DEFAULT_TENANT, name, job.version)) as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    assert await store.finish_job(job.id, {"loss_before": 2.0, "loss_after": loss})
    return job.id


def base_name(client) -> str:
    return client.app.state.gateway.base_model_name


# ---------------------------------------------------------------- jobs
async def test_submit_then_poll_job_progress(env):
    client, backend, _ = env
    response = await client.post("/adapt", json={"adapter": "sentiment", "examples": EXAMPLES, "steps": 7,
                                                 "learning_rate": 0.001})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/adapt/{job['id']}"
    assert (job["adapter"], job["version"], job["model"], job["status"]) == ("sentiment", 1, "sentiment@v1",
                                                                               "queued")
    assert job["options"] == {"steps": 7, "learning_rate": 0.001, "max_seq_len": 256}
    assert job["num_examples"] == 2 and job["step"] == 0 and job["loss"] is None and job["error"] is None
    assert (await backend.store.get_job_examples(job["id"])) == EXAMPLES

    await backend.store.update_job(job["id"], status=JobStatus.RUNNING, step=3, total_steps=7, loss=1.25)
    polled = (await client.get(f"/adapt/{job['id']}")).json()
    assert (polled["status"], polled["step"], polled["total_steps"], polled["loss"]) == ("running", 3, 7, 1.25)
    assert polled["started_at"] is not None

    await backend.store.fail_job(job["id"], "out of memory")
    polled = (await client.get(f"/adapt/{job['id']}")).json()
    assert (polled["status"], polled["error"]) == ("failed", "out of memory")

    second = (await client.post("/adapt", json={"adapter": "sentiment", "examples": EXAMPLES})).json()
    assert second["version"] == 2


async def test_wait_returns_when_the_job_finishes_or_times_out(env):
    client, backend, _ = env

    async def finish_soon():
        while True:
            adapters = await backend.store.list_adapters(DEFAULT_TENANT)
            if adapters:
                job_id = adapters[0].versions[-1].job_id
                break
            await asyncio.sleep(0.05)
        await backend.store.update_job(job_id, status=JobStatus.RUNNING, total_steps=4)
        await asyncio.sleep(0.3)
        await backend.store.finish_job(job_id, {"loss_after": 0.1})

    finisher = asyncio.create_task(finish_soon())
    response = await client.post("/adapt?wait=true&timeout=10", json={"adapter": "waited", "examples": EXAMPLES})
    await finisher
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded" and response.json()["metrics"] == {"loss_after": 0.1}
    assert response.headers["location"].startswith("/adapt/job-")

    started = asyncio.get_running_loop().time()
    response = await client.post("/adapt?wait=true&timeout=0.3", json={"adapter": "slow", "examples": EXAMPLES})
    assert response.status_code == 202 and response.json()["status"] == "queued"
    assert asyncio.get_running_loop().time() - started < 3
    job_id = response.json()["id"]
    response = await client.get(f"/adapt/{job_id}?wait=true&timeout=0.2")
    assert response.status_code == 200 and response.json()["status"] == "queued"


# ---------------------------------------------------------------- adapters and models
async def test_list_get_models_and_versions(env):
    client, backend, settings = env
    first = await train_directly(backend, settings, "sentiment", loss=0.4)
    second = await train_directly(backend, settings, "sentiment", loss=0.3)
    await backend.store.submit_job(DEFAULT_TENANT, "sentiment", 2, EXAMPLES, {})  # v3 queued
    await backend.store.submit_job(DEFAULT_TENANT, "pending", 2, EXAMPLES, {})  # nothing ready

    listed = (await client.get("/v1/adapters")).json()
    assert listed["object"] == "list"
    assert sorted(a["name"] for a in listed["data"]) == ["pending", "sentiment"]

    adapter = (await client.get("/v1/adapters/sentiment")).json()
    assert (adapter["ready_version"], adapter["latest_version"], adapter["status"]) == (2, 3, "queued")
    assert [(v["version"], v["status"], v["model"]) for v in adapter["versions"]] == [
        (1, "ready", "sentiment@v1"), (2, "ready", "sentiment@v2"), (3, "queued", "sentiment@v3")]
    v1 = adapter["versions"][0]
    assert v1["job_id"] == first and v1["num_examples"] == 2 and v1["metrics"]["loss_after"] == 0.4
    assert v1["created_at"] > 0 and v1["ready_at"] >= v1["created_at"]
    assert adapter["versions"][1]["job_id"] == second

    pending = (await client.get("/v1/adapters/pending")).json()
    assert (pending["ready_version"], pending["status"]) == (None, "queued")

    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    ids = [m["id"] for m in models["data"]]
    base = base_name(client)
    assert ids[0] == base and sorted(ids[1:]) == ["sentiment", "sentiment@v1", "sentiment@v2"]
    for card in models["data"][1:]:
        assert card["parent"] == base and card["owned_by"] == DEFAULT_TENANT and card["object"] == "model"

    response = await client.get("/v1/adapters/unknown")
    assert response.status_code == 404 and response.json()["error"]["code"] == "adapter_not_found"
    response = await client.get("/v1/adapters/UPPER")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_adapter_name"


async def test_delete_removes_records_artifacts_and_unloads_everywhere(env, replicas):
    client, backend, settings = env
    await train_directly(backend, settings, "sentiment")
    await train_directly(backend, settings, "sentiment")
    await train_directly(backend, settings, "other")
    artifacts = LocalArtifactStore(settings.adapter_root)
    served = [vllm_name(DEFAULT_TENANT, "sentiment", v) for v in (1, 2)]
    assert all(artifacts.exists(n) for n in served)
    assert (await client.post("/v1/completions", json={"model": "sentiment", "prompt": "hi"})).status_code == 200

    response = await client.delete("/v1/adapters/sentiment")
    assert response.status_code == 200, response.text
    assert response.json() == {"name": "sentiment", "object": "adapter.deleted", "deleted": True,
                               "versions": [1, 2]}
    assert not any(artifacts.exists(n) for n in served)
    assert artifacts.exists(vllm_name(DEFAULT_TENANT, "other", 1))
    for app, _ in replicas:  # every replica was told, not only the one that served it
        unloaded = sorted(body["lora_name"] for path, body in app.state.calls if path == "/v1/unload_lora_adapter")
        assert unloaded == served

    for model in ("sentiment", "sentiment@v1", "sentiment@v2"):
        response = await client.post("/v1/completions", json={"model": model, "prompt": "hi"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "adapter_not_found"
    assert (await client.get("/v1/adapters/sentiment")).status_code == 404
    assert "sentiment" not in [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
    assert (await client.delete("/v1/adapters/sentiment")).status_code == 404

    # A new adapter under the same name never reuses a deleted version number (vLLM caches by name).
    job = (await client.post("/adapt", json={"adapter": "sentiment", "examples": EXAMPLES})).json()
    assert job["version"] == 3


# ---------------------------------------------------------------- the OpenAI-compatible proxy
def served_by(response) -> str:
    return response.json()["served_by"]


async def test_completions_resolve_forward_and_rewrite_model(env, replicas):
    client, backend, settings = env
    await train_directly(backend, settings, "sentiment")
    await train_directly(backend, settings, "sentiment")
    base = base_name(client)

    body = {"model": "sentiment", "prompt": "hi", "max_tokens": 5, "temperature": 0, "logprobs": 2,
            "stop": ["\n"], "user": "u1", "n": 1}
    response = await client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["model"] == "sentiment@v2"  # newest ready version, client-visible name
    assert data["echo"] == {"max_tokens": 5, "temperature": 0, "logprobs": 2, "stop": ["\n"], "user": "u1", "n": 1}
    calls = [c for app, _ in replicas for c in app.state.calls if c[0] == "/v1/completions"]
    assert calls[-1][1]["model"] == vllm_name(DEFAULT_TENANT, "sentiment", 2) and "adapter" not in calls[-1][1]

    pinned = await client.post("/v1/completions", json={"model": "sentiment@v1", "prompt": "hi"})
    assert pinned.json()["model"] == "sentiment@v1"
    via_field = await client.post("/v1/completions", json={"model": base, "adapter": "sentiment@v1", "prompt": "x"})
    assert via_field.json()["model"] == "sentiment@v1" and "adapter" not in via_field.json()["echo"]
    plain = await client.post("/v1/completions", json={"model": base, "prompt": "x"})
    assert plain.json()["model"] == base

    # Affinity: the same adapter version always lands on the same replica.
    assert len({served_by(await client.post("/v1/completions", json=body)) for _ in range(6)}) == 1


async def test_streaming_rewrites_each_chunk_and_passes_done(env):
    client, backend, settings = env
    await train_directly(backend, settings, "sentiment")
    async with client.stream("POST", "/v1/completions",
                             json={"model": "sentiment", "prompt": "hi", "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = (await response.aread()).decode()
    events = [e for e in text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert len(chunks) == 3
    internal = vllm_name(DEFAULT_TENANT, "sentiment", 1)
    for i, chunk in enumerate(chunks):
        assert chunk["model"] == "sentiment@v1"
        # Only the model field is rewritten: generated text mentioning the name stays as generated.
        assert chunk["choices"][0]["text"].endswith(f':{i} "model": {internal}')


async def test_upstream_errors_pass_through_in_our_shape(env):
    client, backend, settings = env
    await train_directly(backend, settings, "sentiment")
    response = await client.post("/v1/completions", json={"model": "sentiment", "prompt": "error"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == "upstream_error"
    assert "sentiment@v1" in error["message"] and "~" not in error["message"]


async def test_openai_client_works_against_the_gateway(env):
    import httpx
    import openai

    client, backend, settings = env
    await train_directly(backend, settings, "sentiment")
    transport = httpx.ASGITransport(app=client.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
        oai = openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=http, max_retries=0)
        completion = await oai.completions.create(model="sentiment", prompt="hi", max_tokens=3)
        assert completion.model == "sentiment@v1" and completion.choices[0].text.startswith("from ")
        stream = await oai.completions.create(model="sentiment", prompt="hi", stream=True)
        chunks = [chunk async for chunk in stream]
        assert len(chunks) == 3 and {c.model for c in chunks} == {"sentiment@v1"}
        models = await oai.models.list()
        assert {m.id for m in models.data} >= {"sentiment", "sentiment@v1"}
        with pytest.raises(openai.NotFoundError):
            await oai.completions.create(model="missing", prompt="hi")


# ---------------------------------------------------------------- health
async def test_health_reflects_store_and_upstreams(env, replicas):
    client, _, _ = env
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["store"] == "ok"
    assert [u["healthy"] for u in body["upstreams"]] == [True, True]

    for app, _ in replicas:
        app.state.healthy = False
    pool = client.app.state.gateway.pool
    for _ in range(100):
        if not any(u.healthy for u in pool.upstreams):
            break
        await asyncio.sleep(0.05)
    response = await client.get("/health")
    assert response.status_code == 503 and response.json()["status"] == "degraded"
    response = await client.post("/v1/completions", json={"model": base_name(client), "prompt": "hi"})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "upstream_unavailable"
