"""An init family through a real worker process (SQLite; the tiny Llama of tests/test_inner_loop.py, so it is about
the worker's path, not the model): the job reports outer step i of N with the method and each task's validation
loss, writes a complete shared-init folder, registers the task adapters as ordinary ready versions, and an adapt
job naming the init starts from it and records which init version it came from. The real model on the real stack:
tests/test_inits_stack.py."""
from __future__ import annotations

import json
import shutil

import pytest

from adapters.backend import open_backend
from adapters.layout import ADAPT_RECORD, SHARED_INIT_FILES, SHARED_INIT_META
from adapters.names import init_folder_name, vllm_name
from adapters.records import JobKind, JobStatus, VersionStatus
from test_inner_loop import save_tiny_model
from test_worker import WorkerProcess, make_settings, watch

TASKS = [{"name": name, "examples": [{"prompt": f"Word: {w}\nAnswer:", "completion": f" {left}{w}{right}"}
                                     for w in "apple river candle mountain pencil garden window bottle".split()]}
         for name, (left, right) in {"square": ("[[", "]]"), "angle": ("<<", ">>"), "curly": ("{{", "}}")}.items()]
OPTIONS = {"outer_steps": 3, "steps": 2, "support_size": 3, "query_size": 3, "max_seq_len": 64,
           "register_task_adapters": True}


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    root = tmp_path_factory.mktemp("inits-worker")
    settings = make_settings("sqlite", root, str(save_tiny_model(root / "tiny-base")))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("METALORA_WORKER_THREADS", "1")  # a shared 2-core box: the default oversubscribes
        proc = WorkerProcess(settings, root / "worker.log")
    yield settings, proc
    proc.stop()


async def test_family_job_writes_an_init_registers_task_adapters_and_adapt_starts_from_it(worker):
    settings, proc = worker
    backend = open_backend(settings)
    store = backend.store
    try:
        job = await store.submit_init_job("default", "formats", 24, TASKS, OPTIONS)
        done, seen = await watch(store, job.id, proc, deadline_s=300)
        assert done.status is JobStatus.SUCCEEDED, (done.error, proc.output()[-3000:])
        assert (done.kind, done.step, done.total_steps) == (JobKind.INIT, 3, 3)
        m = done.metrics
        assert m["method"] == "fomaml" and [s["step"] for s in m["outer_steps"]] == [0, 1, 2, 3]
        assert set(m["validation_loss_after"]) == {"square", "angle", "curly"}
        events = await store.list_job_events(job.id)
        validations = [e for e in events if e.type == "evaluation"]
        assert [e.data["step"] for e in validations] == [1, 2, 3]
        assert all(e.data["method"] == "fomaml" and set(e.data["validation_loss"]) == {"square", "angle", "curly"}
                   for e in validations)

        init = await store.resolve_init("default", "formats", None)
        assert (init.version, init.status) == (1, VersionStatus.READY)
        folder = settings.adapter_root / init_folder_name("default", "formats", 1)
        assert set(SHARED_INIT_FILES) <= {p.name for p in folder.iterdir()}
        meta = json.loads((folder / SHARED_INIT_META).read_text())
        assert meta["adapt_config"]["steps"] == 2 and meta["init"] == "formats@v1"
        # An init is never an adapter.
        assert {a.name for a in await store.list_adapters("default")} == {"square", "angle", "curly"}

        for summary in m["task_adapters"]:
            version = await store.resolve("default", summary["adapter"], None)
            assert (version.version, version.job_id, version.metrics["init_version"]) == (1, job.id, "formats@v1")
            record = json.loads((settings.adapter_root / vllm_name("default", summary["adapter"], 1)
                                 / ADAPT_RECORD).read_text())
            assert record["metrics"]["init"] == "shared" and record["shared_init"] == str(folder)

        examples = TASKS[0]["examples"]
        adapt = await store.submit_job("default", "fourth", len(examples), examples, {"init": "formats@v1"})
        done, _ = await watch(store, adapt.id, proc)
        assert done.status is JobStatus.SUCCEEDED, done.error
        # The init's procedure is the job's default (K = 2), and the version records where it started.
        m = done.metrics
        assert (m["init"], m["init_version"], m["steps"]) == ("shared", "formats@v1", 2)
        assert (await store.resolve("default", "fourth", None)).metrics["init_version"] == "formats@v1"

        # An init deleted after a job naming it was queued: the job fails as bad input, nothing written.
        late = await store.submit_job("default", "late", len(examples), examples, {"init": "formats@v1"})
        await store.delete_init("default", "formats")
        shutil.rmtree(folder)  # what the gateway's DELETE /v1/inits does after the records
        done, _ = await watch(store, late.id, proc)
        assert (done.status, done.error_code) == (JobStatus.FAILED, "invalid_input") and "formats@v1" in done.error
    finally:
        await backend.close()
