"""Cancel with a real worker process, on both stores: a running job cancelled (or whose adapter is deleted)
stops within a step or two, writes nothing and ends cancelled; the worker then takes the next job, whose event
log shows every step with its loss, the held-out evaluation and the end; bad options fail with a code. The
worker process of tests/test_worker.py on its tiny Llama: stopping is about the worker's checks, not the model."""
from __future__ import annotations

import time

import pytest

from adapters.backend import open_backend
from adapters.names import vllm_name
from adapters.records import JobStatus, VersionStatus, now
from test_inner_loop import save_tiny_model
from test_worker import EXAMPLES, WorkerProcess, cleanup_redis, make_settings, redis_available, watch

LONG = 2000  # the most steps a job may ask for: it is still training when cancelled
# Stopping takes a progress report's round trip (reports are at most PROGRESS_INTERVAL_S apart) plus up to two
# steps; then the worker acks and claims the next job. Slack for a busy 2-core machine.
SLACK_S = 4.0


@pytest.fixture(scope="module", params=["sqlite", pytest.param("redis", marks=pytest.mark.skipif(
    not redis_available(), reason="no Redis on 127.0.0.1:6379"))])
def worker(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"cancel-{request.param}")
    settings = make_settings(request.param, root, str(save_tiny_model(root / "tiny-base")))
    with pytest.MonkeyPatch.context() as env:
        # One torch thread: on a shared 2-core box the default oversubscribes and a step takes seconds.
        env.setenv("METALORA_WORKER_THREADS", "1")
        proc = WorkerProcess(settings, root / "worker.log")
    yield settings, proc
    proc.stop()
    cleanup_redis(settings)


def pace_s(events) -> float:
    """Seconds per step from the step events' timestamps (step 1 includes warm-up, so it is left out)."""
    steps = [e for e in events if e.type == "step" and e.data["step"] >= 2]
    if len(steps) < 2:
        return 0.0
    return (steps[-1].created_at - steps[0].created_at) / (steps[-1].data["step"] - steps[0].data["step"])


async def stop_running_job(worker, name: str, stop) -> None:
    """Submit a long job, wait until it reports steps, `stop` it, and check that it stopped quickly and wrote
    nothing: the next job starts within a couple of steps and succeeds with a full event log."""
    settings, proc = worker
    backend = open_backend(settings)
    store = backend.store
    try:
        job = await store.submit_job("default", name, len(EXAMPLES), EXAMPLES, {"steps": LONG})
        running, _ = await watch(store, job.id, proc, until=lambda j: j.status is JobStatus.RUNNING and j.step >= 3)
        assert running.estimated_finish is not None and running.estimated_finish > now()
        stopped_at = time.time()
        await stop(store, job)
        after = await store.submit_job("default", f"{name}-next", 4, EXAMPLES[:4],
                                       {"steps": 2, "holdout_fraction": 0.25})
        done, _ = await watch(store, after.id, proc)
        assert done.status is JobStatus.SUCCEEDED, done.error

        cancelled = await store.get_job(job.id)
        assert cancelled.status is JobStatus.CANCELLED and cancelled.estimated_finish is None
        events = await store.list_job_events(job.id)
        assert [e.type for e in events[:2]] == ["queued", "started"] and events[-1].type == "cancelled"
        assert all(e.type == "step" and e.data["loss"] > 0 for e in events[2:-1]) and len(events) > 4
        pace = pace_s(events)
        # One job at a time: the next one started only once the cancelled one had stopped training.
        print(f"\n{name}: {pace:.3f} s/step; next job started {done.started_at - stopped_at:.2f} s after the stop")
        assert done.started_at - stopped_at < 2 * pace + SLACK_S
        assert not (settings.adapter_root / vllm_name("default", name, job.version)).exists()
        assert not [p.name for p in settings.adapter_root.iterdir() if p.name.startswith(".tmp-")]
        assert "cancelled: training stopped" in proc.output()

        log = [e.type for e in await store.list_job_events(after.id)]
        assert log == ["queued", "started", "step", "step", "evaluation", "succeeded"], log
        return cancelled
    finally:
        await backend.close()


async def test_cancel_stops_a_running_job(worker):
    async def cancel(store, job):
        await store.cancel_job(job.id, tenant="default")

    cancelled = await stop_running_job(worker, "cancelled", cancel)
    assert cancelled.error_code is None
    backend = open_backend(worker[0])
    try:
        adapter = await backend.store.get_adapter("default", "cancelled")
        assert [v.status for v in adapter.versions] == [VersionStatus.CANCELLED]
    finally:
        await backend.close()


async def test_deleting_the_adapter_stops_its_running_job(worker):
    async def delete(store, job):
        await store.delete_adapter("default", job.adapter)

    cancelled = await stop_running_job(worker, "deleted", delete)
    assert cancelled.error_code == "adapter_deleted"


async def test_bad_options_fail_with_a_code(worker):
    settings, proc = worker
    backend = open_backend(settings)
    try:
        job = await backend.store.submit_job("default", "bad", 3, EXAMPLES[:3], {"stepz": 3})
        done, _ = await watch(backend.store, job.id, proc)
        assert (done.status, done.error_code) == (JobStatus.FAILED, "invalid_input") and "stepz" in done.error
        events = await backend.store.list_job_events(job.id)
        assert [e.type for e in events] == ["queued", "started", "failed"]
        assert (events[-1].level, events[-1].data["code"]) == ("error", "invalid_input")
    finally:
        await backend.close()
