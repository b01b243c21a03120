"""GET /metrics after real traffic, parsed with prometheus_client's own parser.

Job metrics: a real worker (the real engine on a tiny random Llama, so a job takes a second) trains and fails jobs
on both stores, loading each new version into a stand-in replica before it reports succeeded; the gateway then
reads the counters the worker added to the store. Request metrics: completions, streams (with and without
usage), upstream errors and unknown adapters through the gateway to a stand-in replica that answers like vLLM.
tests/test_io_stack.py checks the page once more against real vLLM."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from uuid import uuid4

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adapters.names import DEFAULT_TENANT, vllm_name
from adapters.records import JobStatus
from adapters.settings import Settings
from gateway_helpers import ServerThread, gateway_client, gateway_env
from helpers import REDIS_URL
from test_inner_loop import EXAMPLES, save_tiny_model
from trainer.engine import AdaptEngine
from trainer.worker import run_worker

STEPS = 4


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a metrics page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def vllm_like_replica():
    """Completions as vLLM answers them: `usage` in plain answers, and in a stream's last chunk only when
    `stream_options.include_usage` is set; prompt "error" gets vLLM's 400. LoRA load answered 200."""
    async def health(request: Request):
        return Response(status_code=200)

    async def completions(request: Request):
        body = await request.json()
        if body.get("prompt") == "error":
            return JSONResponse({"error": {"message": "bad", "type": "BadRequestError", "code": 400}}, 400)
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
        chunk = {"id": "c", "object": "text_completion", "model": body["model"],
                 "choices": [{"index": 0, "text": "hi", "finish_reason": None}]}
        if not body.get("stream"):
            return JSONResponse({**chunk, "usage": usage})

        async def events():
            for _ in range(3):
                yield f"data: {json.dumps({**chunk, 'usage': None}, separators=(',', ':'))}\n\n".encode()
            if (body.get("stream_options") or {}).get("include_usage"):
                last = {**chunk, "choices": [], "usage": usage}
                yield f"data: {json.dumps(last, separators=(',', ':'))}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def load(request: Request):
        request.app.state.loaded.append((await request.json())["lora_name"])
        return Response("Success")

    app = Starlette(routes=[Route("/health", health), Route("/v1/completions", completions, methods=["POST"]),
                            Route("/v1/load_lora_adapter", load, methods=["POST"])])
    app.state.loaded = []
    return app


@pytest.fixture(scope="module")
def replica():
    app = vllm_like_replica()
    with ServerThread(app) as server:
        yield app, server


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def engine(tiny_dir) -> AdaptEngine:
    return AdaptEngine(tiny_dir, shared_init=None, device="cpu")


@pytest.fixture(params=["sqlite", "redis"])
async def env(request, tmp_path, replica, tiny_dir):
    app, server = replica
    app.state.loaded.clear()
    extra = {"redis_url": REDIS_URL, "redis_prefix": f"test-metrics-{uuid4().hex}"} if request.param == "redis" else {}
    settings = Settings(data_dir=tmp_path / "data", base_model=str(tiny_dir), shared_init="none",
                        vllm_urls=[server.url], health_interval_s=0.2, **extra)
    async with gateway_env(settings) as (client, backend):
        yield client, backend, settings, app


async def wait_finished(store, job_id: str, timeout_s: float = 120.0):
    for _ in range(int(timeout_s / 0.05)):
        job = await store.get_job(job_id)
        if job.status.finished:
            return job
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job.status.value}")


async def test_job_metrics_come_from_the_worker_through_the_store(env, engine):
    client, backend, settings, replica_app = env
    page = samples((await client.get("/metrics")).text)
    assert page[("metalora_jobs_queued", ())] == 0 and page[("metalora_jobs_running", ())] == 0
    store = backend.store
    good = await store.submit_job(DEFAULT_TENANT, "ok", len(EXAMPLES), EXAMPLES, {"steps": STEPS})
    # One example longer than max_seq_len: the worker fails the job as bad input.
    bad_examples = [*EXAMPLES[:2], {"prompt": "x " * 200, "completion": " y"}]
    bad = await store.submit_job(DEFAULT_TENANT, "bad", 3, bad_examples, {"steps": STEPS, "max_seq_len": 32})
    page = samples((await client.get("/metrics")).text)
    assert page[("metalora_jobs_queued", ())] == 2

    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop=stop, engine=engine))
    try:
        good, bad = await wait_finished(store, good.id), await wait_finished(store, bad.id)
    finally:
        stop.set()
        await worker
    assert (good.status, bad.status) == (JobStatus.SUCCEEDED, JobStatus.FAILED)
    # Loaded into the replica before it reported succeeded, and said so on the version.
    assert replica_app.state.loaded == [vllm_name(DEFAULT_TENANT, "ok", 1)]
    metrics = good.metrics
    assert metrics["warm"]["warm"] is True and metrics["warm"]["loaded"] == settings.vllm_urls
    assert len(metrics["step_seconds"]) == STEPS - 1
    assert set(metrics["timings"]) >= {"encode_s", "reset_s", "eval_s", "steps_s", "write_s"}

    page = samples((await client.get("/metrics")).text)
    assert page[("metalora_jobs_queued", ())] == 0 and page[("metalora_jobs_running", ())] == 0
    assert page[("metalora_jobs_finished_total", (("status", "succeeded"),))] == 1
    assert page[("metalora_jobs_finished_total", (("status", "failed"),))] == 1
    assert page[("metalora_job_failures_total", (("code", bad.error_code),))] == 1
    assert page[("metalora_job_duration_seconds_count", ())] == 2
    assert page[("metalora_job_duration_seconds_bucket", (("le", "+Inf"),))] == 2
    assert page[("metalora_job_step_seconds_count", ())] == STEPS - 1
    assert page[("metalora_job_step_seconds_sum", ())] == pytest.approx(sum(metrics["step_seconds"]))
    assert page[("metalora_store_up", ())] == 1
    assert page[("metalora_upstream_healthy", (("url", settings.vllm_urls[0]),))] == 1


async def test_request_metrics_per_adapter_after_traffic(env):
    client, backend, settings, _ = env
    base = client.app.state.gateway.base_model_name
    job = await backend.store.submit_job(DEFAULT_TENANT, "sentiment", 1, EXAMPLES[:1], {})
    await backend.store.update_job(job.id, status=JobStatus.RUNNING)
    await backend.store.finish_job(job.id, {})

    async def complete(**body):
        return await client.post("/v1/completions", json={"prompt": "hello", **body})

    for _ in range(3):
        assert (await complete(model=base)).status_code == 200
    assert (await complete(model="sentiment")).status_code == 200
    assert (await complete(adapter="sentiment@v1", stream=True)).status_code == 200  # no usage asked
    assert (await complete(model="sentiment", stream=True, stream_options={"include_usage": True})).status_code == 200
    assert (await complete(model="sentiment", prompt="error")).status_code == 400
    assert (await complete(model="no-such-adapter")).status_code == 404
    assert (await complete(model="no-such-adapter-2")).status_code == 404

    page = samples((await client.get("/metrics")).text)
    ep = ("endpoint", "/v1/completions")

    def labels(adapter, *more):
        return tuple(sorted([("adapter", adapter), ("tenant", DEFAULT_TENANT), *more]))

    assert page[("metalora_requests_total", labels("__base__", ep))] == 3
    assert page[("metalora_requests_total", labels("sentiment", ep))] == 4
    assert page[("metalora_requests_total", labels("__unresolved__", ep))] == 2
    assert page[("metalora_request_errors_total", labels("sentiment", ep, ("code", "upstream_error")))] == 1
    assert page[("metalora_request_errors_total", labels("__unresolved__", ep, ("code", "adapter_not_found")))] == 2
    # usage: 3 base answers; 1 plain + 1 stream that asked for it on the adapter (version never a label)
    assert page[("metalora_prompt_tokens_total", labels("__base__"))] == 15
    assert page[("metalora_completion_tokens_total", labels("sentiment"))] == 6
    assert page[("metalora_request_duration_seconds_count", labels("sentiment", ep))] == 3
    assert page[("metalora_stream_first_chunk_seconds_count", labels("sentiment", ep))] == 2
    assert not any("no-such-adapter" in str(key) for key in page)


async def test_metrics_need_the_metrics_token_when_auth_is_required(tmp_path, tiny_dir):
    common = dict(data_dir=tmp_path / "data", base_model=str(tiny_dir), auth="required")
    async with gateway_client(Settings(**common)) as client:
        closed = await client.get("/metrics")
        assert closed.status_code == 401 and closed.json()["error"]["code"] == "metrics_token_unset"
    async with gateway_client(Settings(**common, metrics_token="s3cret")) as client:
        assert (await client.get("/metrics", headers={"Authorization": "Bearer nope"})).status_code == 401
        ok = await client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.headers["content-type"].startswith("text/plain")


def test_job_observation_counts_outcomes_and_keeps_cancelled_jobs_out_of_the_duration():
    from adapters.job_stats import decode, job_observation

    stats: dict[str, float] = {}
    for increments in (job_observation("succeeded", 3.0, [0.2, 0.4]), job_observation("failed", 70.0, [], "timeout"),
                       job_observation("cancelled", 9.0, [0.3])):
        for key, amount in increments.items():
            stats[key] = stats.get(key, 0) + amount
    decoded = decode(stats)
    assert decoded.finished == {"succeeded": 1, "failed": 1, "cancelled": 1}
    assert decoded.failures == {"timeout": 1}
    assert (decoded.duration.count, decoded.duration.sum) == (2, 73.0)
    assert dict(decoded.duration.buckets)[5.0] == 1 and dict(decoded.duration.buckets)[float("inf")] == 2
    assert decoded.step.count == 3 and dict(decoded.step.buckets)[0.25] == 1
