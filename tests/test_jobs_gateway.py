"""The job routes over HTTP on both stores: GET /adapt (list), POST /adapt/{id}/cancel, GET /adapt/{id}/events
(JSON and SSE), estimated_finish, and POST /adapt's Idempotency-Key / identical-request replays. Jobs are
driven through the store API (no worker; tests/test_worker_cancel.py has the real one)."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from adapters.job_events import evaluation_event, step_event
from adapters.records import JobStatus, now
from gateway_helpers import gateway_env, store_settings

EXAMPLES = [{"prompt": "hello world", "completion": "positive"}, {"prompt": "bad world", "completion": "negative"}]


@pytest.fixture(params=["sqlite", "redis"])
async def env(request, tmp_path: Path):
    settings = store_settings(request.param, tmp_path, "test-jobs")
    async with gateway_env(settings) as (client, backend):
        yield client, backend


async def adapt(client, name: str, headers=None, **options) -> dict:
    response = await client.post("/adapt", json={"adapter": name, "examples": EXAMPLES, **options},
                                 headers=headers or {})
    assert response.status_code in (200, 202), response.text
    return response.json() | {"_replayed_header": response.headers.get("idempotent-replayed")}


def error_code(response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["code"]


def sse_events(text: str) -> list[dict]:
    """Parse an SSE body: each frame's id, event name and JSON data."""
    frames = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if fields:
            frames.append({"id": int(fields["id"]), "event": fields["event"], "data": json.loads(fields["data"])})
    return frames


async def test_list_jobs_newest_first_with_cursor_and_filters(env):
    client, backend = env
    ids = [(await adapt(client, name, steps=steps))["id"] for name, steps in (("a", 3), ("b", 3), ("a", 4))]
    await backend.store.fail_job(ids[1], "boom")
    page = (await client.get("/adapt", params={"limit": 2})).json()
    assert page["object"] == "list" and [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = (await client.get("/adapt", params={"limit": 2, "after": page["data"][-1]["id"]})).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    by_adapter = (await client.get("/adapt", params={"adapter": "a"})).json()
    assert [j["id"] for j in by_adapter["data"]] == [ids[2], ids[0]]
    failed = (await client.get("/adapt", params={"status": "failed"})).json()["data"]
    assert [(j["id"], j["error_code"]) for j in failed] == [(ids[1], "training_error")]
    assert error_code(await client.get("/adapt", params={"status": "done"}), 400) == "invalid_request"
    assert error_code(await client.get("/adapt", params={"after": "job-nope"}), 400) == "invalid_request"
    assert error_code(await client.get("/adapt", params={"limit": 0}), 400) == "invalid_request"


async def test_cancel_over_http(env):
    client, backend = env
    job = await adapt(client, "c", steps=3)
    response = await client.post(f"/adapt/{job['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert (await client.post(f"/adapt/{job['id']}/cancel")).json()["status"] == "cancelled"
    adapter = (await client.get("/v1/adapters/c")).json()
    assert adapter["versions"][0]["status"] == "cancelled"

    done = await adapt(client, "d", steps=3)
    await backend.store.update_job(done["id"], status=JobStatus.RUNNING)
    await backend.store.finish_job(done["id"], {})
    assert error_code(await client.post(f"/adapt/{done['id']}/cancel"), 409) == "job_not_cancellable"
    assert error_code(await client.post("/adapt/job-nope/cancel"), 404) == "job_not_found"


async def test_events_as_a_list_and_as_a_stream(env):
    client, backend = env
    store = backend.store
    job = await adapt(client, "e", steps=2)
    await store.update_job(job["id"], status=JobStatus.RUNNING, attempts=1, total_steps=2,
                           estimated_finish=now() + 30)
    running = (await client.get(f"/adapt/{job['id']}")).json()
    assert running["estimated_finish"] > running["started_at"]

    async def train():  # what the worker reports, while a client follows the stream
        await asyncio.sleep(0.4)
        await store.update_job(job["id"], step=2, loss=0.5,
                               events=[step_event(job["id"], 1, 2, 0.9), step_event(job["id"], 2, 2, 0.5)])
        await asyncio.sleep(0.4)
        await store.update_job(job["id"], events=[evaluation_event(job["id"], {
            "loss_before": 2.0, "loss_after": 0.4, "eval_on": "holdout", "num_holdout": 1})])
        await store.finish_job(job["id"], {})

    streamed, _ = await asyncio.wait_for(asyncio.gather(
        client.get(f"/adapt/{job['id']}/events", params={"stream": "true"}), train()), 30)
    assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
    frames = sse_events(streamed.text)
    assert [f["event"] for f in frames] == ["queued", "started", "step", "step", "evaluation", "succeeded"]
    assert [f["id"] for f in frames] == [1, 2, 3, 4, 5, 6]
    assert frames[3]["data"]["data"] == {"step": 2, "total_steps": 2, "loss": 0.5}
    assert frames[4]["data"]["data"]["loss_after"] == 0.4

    listed = (await client.get(f"/adapt/{job['id']}/events", params={"after": 2, "limit": 3})).json()
    assert [e["type"] for e in listed["data"]] == ["step", "step", "evaluation"] and listed["has_more"]
    assert listed["data"][0]["object"] == "adapt.job.event"
    assert (await client.get(f"/adapt/{job['id']}")).json()["estimated_finish"] is None
    # A finished job's stream replays what follows Last-Event-ID and ends at once (Accept negotiates SSE).
    resumed = await client.get(f"/adapt/{job['id']}/events",
                               headers={"Accept": "text/event-stream", "Last-Event-ID": "5"})
    assert [f["event"] for f in sse_events(resumed.text)] == ["succeeded"]
    assert error_code(await client.get("/adapt/job-nope/events", params={"stream": "true"}), 404) == "job_not_found"


async def test_idempotent_submits(env):
    client, _ = env
    first = await adapt(client, "i", steps=3)
    assert first["idempotent_replay"] is False and first["_replayed_header"] is None
    same = await adapt(client, "i", steps=3)
    assert same["id"] == first["id"] and same["idempotent_replay"] is True and same["_replayed_header"] == "true"
    assert (await adapt(client, "i", steps=4))["version"] == 2  # other options: another job

    keyed = await adapt(client, "k", headers={"Idempotency-Key": "req-1"})
    await client.post(f"/adapt/{keyed['id']}/cancel")
    replay = await adapt(client, "k", headers={"Idempotency-Key": "req-1"})
    assert (replay["id"], replay["status"], replay["idempotent_replay"]) == (keyed["id"], "cancelled", True)
    reused = await client.post("/adapt", json={"adapter": "k", "examples": EXAMPLES[:1]},
                               headers={"Idempotency-Key": "req-1"})
    assert error_code(reused, 422) == "idempotency_key_reused"
    bad = await client.post("/adapt", json={"adapter": "k", "examples": EXAMPLES}, headers={"Idempotency-Key": "a b"})
    assert error_code(bad, 400) == "invalid_request" and bad.json()["error"]["param"] == "Idempotency-Key"
    assert [v["version"] for v in (await client.get("/v1/adapters/k")).json()["versions"]] == [1]


async def test_window_zero_turns_replays_off(env):
    client, _ = env
    gw = client.app.state.gateway
    gw.settings = gw.settings.model_copy(update={"idempotency_window_s": 0})
    first, second = await adapt(client, "z"), await adapt(client, "z")
    assert (first["version"], second["version"], second["idempotent_replay"]) == (1, 2, False)
