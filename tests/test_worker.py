"""A real worker process against the real stores (SQLite in tmp_path, and Redis on 127.0.0.1:6379 under a
unique key prefix): jobs go queued -> running (with progress) -> succeeded with a complete adapter folder,
bad data fails the job with a message, and a job whose worker is SIGKILLed is finished by another one.

Uses the converted SmolLM2 when it is in the model cache, else a tiny Llama saved to tmp_path."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from safetensors import safe_open

from adapters.backend import open_backend
from adapters.base_model import base_model_path
from adapters.names import vllm_name
from adapters.records import JobStatus, VersionStatus
from adapters.settings import Settings
from test_inner_loop import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
REAL_MODEL = base_model_path(Settings())
USE_REAL = (REAL_MODEL / "config.json").is_file()
EXAMPLES = [{"prompt": f"Capital of {c}?", "completion": f" {city}."} for c, city in [
    ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Peru", "Lima"),
    ("Egypt", "Cairo"), ("Chile", "Santiago"), ("Kenya", "Nairobi"), ("Cuba", "Havana"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Mali", "Bamako"), ("Nepal", "Kathmandu"), ("Oman", "Muscat"), ("Laos", "Vientiane"),
    ("Fiji", "Suva"), ("Togo", "Lome"), ("Chad", "Ndjamena"), ("Qatar", "Doha"), ("Yemen", "Sanaa")]]
# Few steps on the real model (~0.7 s each on the dev box); more on the tiny one so progress is observable.
STEPS = 6 if USE_REAL else 60
KILL_STEPS = 14 if USE_REAL else 400
LEASE_S = 3.0
JOB_DEADLINE_S = 120.0


def redis_available() -> bool:
    try:
        import redis

        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=0.5).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> str:
    return "default" if USE_REAL else str(save_tiny_model(tmp_path_factory.mktemp("tiny-base")))


def make_settings(kind: str, root: Path, base_model: str) -> Settings:
    extra = {"redis_url": "redis://127.0.0.1:6379/0", "redis_prefix": f"mltest-{uuid.uuid4().hex[:10]}"} if kind == "redis" else {}
    return Settings(data_dir=root / "data", base_model=base_model, shared_init="none", lease_s=LEASE_S, **extra)


class WorkerProcess:
    def __init__(self, settings: Settings, log_path: Path):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
               "METALORA_DATA_DIR": str(settings.data_dir), "METALORA_BASE_MODEL": settings.base_model,
               "METALORA_SHARED_INIT": settings.shared_init, "METALORA_LEASE_S": str(settings.lease_s),
               "METALORA_REDIS_PREFIX": settings.redis_prefix}
        env.pop("METALORA_REDIS_URL", None)
        if settings.redis_url:
            env["METALORA_REDIS_URL"] = settings.redis_url
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from adapters.settings import Settings; from trainer.worker import main; main(Settings())"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def cleanup_redis(settings: Settings) -> None:
    if settings.redis_url:
        import redis

        client = redis.Redis.from_url(settings.redis_url)
        for key in client.scan_iter(match=f"{settings.redis_prefix}*"):
            client.delete(key)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("redis", marks=pytest.mark.skipif(
    not redis_available(), reason="no Redis on 127.0.0.1:6379"))])
def worker(request, tmp_path_factory, base_model):
    """One worker process per store kind, shared by the tests below (a model load costs seconds)."""
    root = tmp_path_factory.mktemp(f"worker-{request.param}")
    settings = make_settings(request.param, root, base_model)
    proc = WorkerProcess(settings, root / "worker.log")
    yield settings, proc
    proc.stop()
    cleanup_redis(settings)


async def watch(store, job_id: str, proc: WorkerProcess, deadline_s: float = JOB_DEADLINE_S, until=None):
    """Poll the job until it finishes (or `until(job)`); return every (status, step) seen."""
    seen = []
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        job = await store.get_job(job_id)
        if not seen or seen[-1] != (job.status, job.step):
            seen.append((job.status, job.step))
        if job.status.finished or (until and until(job)):
            return job, seen
        if proc.proc.poll() is not None and until is None:
            pytest.fail(f"worker exited with {proc.proc.returncode}:\n{proc.output()[-3000:]}")
        await asyncio.sleep(0.03)
    pytest.fail(f"job {job_id} did not finish in {deadline_s}s; seen {seen}\n{proc.output()[-3000:]}")


def assert_complete_adapter(settings: Settings, folder: Path, steps: int) -> None:
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "metalora_adapt.json", "metalora_job.json"} <= files
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_model_path(settings))
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
    record = json.loads((folder / "metalora_adapt.json").read_text())
    assert record["adapt_config"]["steps"] == steps and len(record["metrics"]["train_losses"]) == steps
    assert not [p.name for p in settings.adapter_root.iterdir() if p.name.startswith(".tmp-")]


async def test_job_runs_to_a_ready_adapter(worker):
    settings, proc = worker
    backend = open_backend(settings)
    try:
        job = await backend.store.submit_job("default", "capitals", len(EXAMPLES), EXAMPLES, {"steps": STEPS})
        assert job.status is JobStatus.QUEUED
        done, seen = await watch(backend.store, job.id, proc)
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert any(status is JobStatus.RUNNING and 0 < step for status, step in seen), seen
        assert (done.step, done.total_steps, done.attempts) == (STEPS, STEPS, 1)
        m = done.metrics
        assert m["init"] == "standard" and m["num_holdout"] == 2 and m["loss_after"] < m["loss_before"]
        version = await backend.store.resolve("default", "capitals", None)
        assert version.status is VersionStatus.READY and version.version == job.version
        assert_complete_adapter(settings, settings.adapter_root / vllm_name("default", "capitals", job.version), STEPS)
    finally:
        await backend.close()


async def test_poisoned_example_fails_job_with_message(worker):
    settings, proc = worker
    backend = open_backend(settings)
    try:
        examples = EXAMPLES[:5] + [{"prompt": "tell me " * 80, "completion": " no."}] + EXAMPLES[5:]
        job = await backend.store.submit_job("default", "poisoned", len(examples), examples,
                                             {"steps": 2, "max_seq_len": 64})
        done, _ = await watch(backend.store, job.id, proc)
        assert done.status is JobStatus.FAILED
        assert "example 5" in done.error and "max_seq_len=64" in done.error
        adapter = await backend.store.get_adapter("default", "poisoned")
        assert [v.status for v in adapter.versions] == [VersionStatus.FAILED]
        assert not (settings.adapter_root / vllm_name("default", "poisoned", job.version)).exists()
        # Bad options are the same kind of failure, named for the client.
        job = await backend.store.submit_job("default", "poisoned", 3, EXAMPLES[:3], {"stepz": 3})
        done, _ = await watch(backend.store, job.id, proc)
        assert done.status is JobStatus.FAILED and "stepz" in done.error
    finally:
        await backend.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.skipif(
    not redis_available(), reason="no Redis on 127.0.0.1:6379"))])
async def test_killed_worker_job_is_finished_by_another(kind, tmp_path, base_model):
    settings = make_settings(kind, tmp_path, base_model)
    backend = open_backend(settings)
    first = WorkerProcess(settings, tmp_path / "first.log")
    second = None
    try:
        job = await backend.store.submit_job("default", "survivor", len(EXAMPLES), EXAMPLES, {"steps": KILL_STEPS})
        _, seen = await watch(backend.store, job.id, first, until=lambda j: j.status is JobStatus.RUNNING and j.step > 0)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
        assert (await backend.store.get_job(job.id)).status is JobStatus.RUNNING
        second = WorkerProcess(settings, tmp_path / "second.log")
        done, _ = await watch(backend.store, job.id, second)
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert done.attempts == 2
        adapter = await backend.store.get_adapter("default", "survivor")
        assert [(v.version, v.status) for v in adapter.versions] == [(job.version, VersionStatus.READY)]
        assert [p.name for p in settings.adapter_root.iterdir()] == [vllm_name("default", "survivor", job.version)]
        assert_complete_adapter(settings, settings.adapter_root / vllm_name("default", "survivor", job.version), KILL_STEPS)
    finally:
        first.stop()
        if second:
            second.stop()
        await backend.close()
        cleanup_redis(settings)
