"""The training worker: claim a job, train it on the resident engine, write the adapter atomically,
mark it ready, ack. `metalora worker` runs `main(settings)`.

Failure policy:
- bad data or options (ValueError from encoding/config), a timeout, any training error: the job fails
  with the message and is acked; retrying a deterministic failure would only fail again.
- the process dies (crash, OOM kill, SIGKILL): nothing is acked, the lease expires and another worker
  claims the job; `max_job_attempts` deliveries bound that.
- SIGTERM: stop claiming, abort the current job at its next step and leave it un-acked (status back to
  queued), so another worker (or this one restarted) takes it once the lease expires.
- the store is unreachable: the job is left un-acked for the same redelivery.
- cancelled (POST /adapt/{id}/cancel, or its adapter deleted): the store marks it cancelled at once; the next
  progress report's answer says so, training stops, nothing is written, the job is acked.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import socket
import time
import uuid
from concurrent.futures import Future
from pathlib import Path

import httpx

from adapters.artifacts import ArtifactExists, ArtifactStore, open_artifacts
from adapters.backend import Backend, open_backend
from adapters.base_model import base_model_path
from adapters.errors import AdapterNotFound, ArtifactCorrupt, JobNotFound, QuotaExceeded, StoreUnavailable
from adapters.job_stats import StepClock, job_observation
from adapters.job_events import evaluation_event, step_event, validation_event
from adapters.layout import ADAPT_RECORD, ADAPTER_WEIGHTS, JOB_RECORD, SHARED_INIT_META
from adapters.logs import configure_logging
from adapters.names import init_folder_name, parse_ref, version_label, vllm_name
from adapters.records import AdapterVersion, Job, JobErrorCode, JobKind, JobStatus, VersionStatus, now
from adapters.settings import Settings
from adapters.store import JobLease, LeaseLost, TenantQuota
from adapters.replicas import engine_headers
from adapters.retention import folder_bytes, prune
from adapters.warmup import load_everywhere, unload_everywhere
from trainer.config import NonFiniteLoss
from trainer.model_prep import ensure_base_model

log = logging.getLogger("metalora.worker")

CLAIM_BLOCK_MS = 1000  # also how quickly an idle worker notices a stop request
PROGRESS_INTERVAL_S = 0.5  # progress writes per job are bounded, whatever the step time
ORPHAN_MAX_AGE_S = 600.0  # older `.tmp-*` folders are from dead writers (a save takes seconds)


class JobAborted(Exception):
    """Raised from the step callback to stop training: timeout, lost lease, shutdown or cancel."""


CANCELLED = "cancelled"  # JobAborted's reason when the store says the job finished meanwhile


class _Progress:
    """The step callback, run in the training thread. It aborts training on a stop request or a lost lease, past
    the job timeout, and when a progress report's answer shows the job finished meanwhile (cancelled, or its
    adapter deleted): the job's status is checked at every report, so training stops within a step or two.
    Reports are throttled; each carries the step events since the last one and the estimated finish."""

    def __init__(self, worker: "Worker", job_id: str, total: int, abort: list[str], started: float):
        self.worker, self.job_id, self.total, self.abort = worker, job_id, total, abort
        self.deadline = started + worker.settings.job_timeout_s
        self.loop = asyncio.get_running_loop()
        self.pending: list[Future] = []  # at most one report in flight, so reports cannot overtake each other
        self.events: list = []
        self.last_report = 0.0
        self.first_step_at: float | None = None
        self.metrics: dict | None = None  # reported with the next report

    def check(self, step: int) -> None:
        """Raise JobAborted on a stop request, a lost lease, a cancel or past the timeout."""
        if self.abort:
            raise JobAborted(self.abort[0])
        if self._finished_meanwhile():
            raise JobAborted(CANCELLED)
        if time.monotonic() > self.deadline:
            raise JobAborted(f"timed out after {self.worker.settings.job_timeout_s:g}s (METALORA_JOB_TIMEOUT_S)"
                             f" at step {step}/{self.total}")

    def __call__(self, step: int, loss: float, metrics: dict | None = None, events: list | None = None) -> None:
        """`metrics`/`events`: what a family job reports with an outer step (its method and validation losses)."""
        self.check(step)
        t = time.monotonic()
        self.events.append(step_event(self.job_id, step, self.total, loss))
        self.events.extend(events or ())
        if metrics is not None:
            self.metrics = metrics
        if self.first_step_at is None:
            self.first_step_at = t
        if (step == 1 or t - self.last_report >= PROGRESS_INTERVAL_S) and (not self.pending or self.pending[-1].done()):
            self.last_report = t
            changes = {"step": step, "total_steps": self.total, "loss": loss}
            if self.metrics is not None:
                changes["metrics"], self.metrics = self.metrics, None
            if step > 1:  # step 1's time includes warm-up; later steps give the pace
                pace = (t - self.first_step_at) / (step - 1)
                changes["estimated_finish"] = now() + max(0, self.total - step) * pace
            self.pending[:] = [asyncio.run_coroutine_threadsafe(
                self.worker.store.update_job(self.job_id, events=self.unreported(), **changes), self.loop)]

    def _finished_meanwhile(self) -> bool:
        report = self.pending[-1] if self.pending else None
        if report is None or not report.done() or report.cancelled() or report.exception() is not None:
            return False
        return report.result().status.finished

    def unreported(self) -> list:
        events, self.events = self.events, []
        return events


def shared_init_path(settings: Settings, base_dir: Path) -> Path | None:
    value = settings.shared_init
    if value == "none":
        return None
    if value == "auto":
        candidate = Path(__file__).parent / "shared_init" / base_dir.name
        return candidate if (candidate / ADAPTER_WEIGHTS).is_file() else None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ValueError(f"METALORA_SHARED_INIT={value!r} is not a folder (use auto, none or a path)")
    return path


def build_engine(settings: Settings):
    # Here, not at the top: the engine imports torch, transformers and peft, which a worker run with another
    # engine (the tests' fakes) never needs.
    from trainer.engine import AdaptEngine

    base_dir = base_model_path(settings)
    if not (base_dir / "config.json").is_file():
        base_dir = ensure_base_model(settings)
    return AdaptEngine(base_dir, shared_init_path(settings, base_dir))


class Worker:
    def __init__(self, settings: Settings, backend: Backend, artifacts: ArtifactStore, engine, stop: asyncio.Event):
        self.settings = settings
        self.store, self.queue = backend.store, backend.queue
        self.artifacts = artifacts
        self.engine = engine
        self.stop = stop
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        # The exact --model string vLLM is started with (see adapters/base_model.py).
        self.base_model_name = str(base_model_path(settings))

    async def run(self) -> None:
        log.info("worker %s ready (base model %s, init %s)", self.consumer, self.base_model_name,
                 "shared" if self.engine.shared else "standard")
        while not self.stop.is_set():
            try:
                lease = await self.queue.claim(self.consumer, CLAIM_BLOCK_MS)
            except StoreUnavailable as exc:
                log.warning("store unavailable (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            if lease is not None:
                try:
                    await self.process(lease)
                except StoreUnavailable as exc:
                    # Not acked: the lease expires and the job is delivered again.
                    log.warning("job %s: store unavailable (%s); left for redelivery", lease.job_id, exc)

    async def process(self, lease: JobLease) -> None:
        try:
            job = await self.store.get_job(lease.job_id)
        except JobNotFound:
            await self.queue.ack(lease)
            return
        if job.status.finished:  # acked late, or its adapter was deleted while it waited
            await self.queue.ack(lease)
            return
        attempts, limit = lease.delivery_count, self.settings.max_job_attempts
        if attempts > limit:
            message = (f"gave up after {limit} attempts: each time the worker training it stopped"
                       " before finishing (crash, out of memory, or shutdown)")
            await self.store.fail_job(job.id, message, JobErrorCode.ATTEMPTS_EXHAUSTED.value)
            await self.queue.ack(lease)
            await self._observe(job.id)
            log.info("job %s failed: %s", job.id, message)
            return
        await self._run_job(job, lease)

    async def _run_job(self, job: Job, lease: JobLease) -> None:
        name = _folder(job)
        init_job = job.kind is JobKind.INIT
        started = time.monotonic()
        running = await self.store.update_job(job.id, status=JobStatus.RUNNING, attempts=lease.delivery_count,
                                              started_at=now(), step=0, error=None)
        if running.status.finished:  # cancelled since it was claimed
            await self.queue.ack(lease)
            return
        abort: list[str] = []  # set by the heartbeat or a stop request; read by the training thread
        heartbeat = asyncio.create_task(self._heartbeat(lease, abort))
        watch_stop = asyncio.create_task(self._on_stop(abort))
        try:
            if self._written_by(name, job.id) and await asyncio.to_thread(self._intact, name):
                # A previous attempt wrote the folder and died before marking it ready.
                metrics = self.artifacts.read_json(name, SHARED_INIT_META if init_job else ADAPT_RECORD)["metrics"]
                log.info("job %s start %s: adapter already written by attempt before, finishing", job.id, name)
            elif init_job:
                metrics = await self._train_family_and_write(job, lease, name, abort, started)
            else:
                metrics = await self._train_and_write(job, lease, name, abort, started)
            if init_job and (job.options or {}).get("register_task_adapters"):
                metrics["task_adapters"] = await self._register_task_adapters(job, name, abort, started)
        except JobAborted as exc:
            reason = str(exc)
            if reason.startswith("timed out"):
                await self._fail(job, lease, reason, abort, JobErrorCode.TIMEOUT.value)
            elif reason == CANCELLED:
                await self.queue.ack(lease)
                await self._observe(job.id)
                log.info("job %s cancelled: training stopped, nothing written", job.id)
            elif reason == "shutdown":
                await self.store.update_job(job.id, status=JobStatus.QUEUED, step=0)
                log.info("job %s released on shutdown; it is redelivered when its lease expires", job.id)
            else:
                log.warning("job %s abandoned: %s", job.id, reason)
            return
        except StoreUnavailable:
            raise
        except Exception as exc:  # bad data, bad options, errors inside training: not worth retrying
            if not isinstance(exc, ValueError):
                log.exception("job %s: training error", job.id)
            code = (exc.code if isinstance(exc, NonFiniteLoss) else JobErrorCode.INVALID_INPUT.value
                    if isinstance(exc, ValueError) else JobErrorCode.TRAINING_ERROR.value)
            await self._fail(job, lease, f"{exc}" if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}",
                             abort, code)
            return
        finally:
            heartbeat.cancel()
            watch_stop.cancel()
        if not init_job:  # an init is never served; its task adapters were warmed as they were registered
            # Before the job reports succeeded: the first request for the version finds it loaded (adapters/warmup.py).
            metrics["warm"] = await self._warm(name)
        if await self.store.finish_job(job.id, metrics, size_bytes=await self._size(name)):
            await self.queue.ack(lease)
            await self._observe(job.id, metrics.get("step_seconds", []))
            await self._retain(job)
            if init_job:
                log.info("job %s succeeded: init %s in %.1fs (%s), validation loss %s -> %s", job.id, name,
                         time.monotonic() - started, metrics["method"], metrics["validation_loss_before"],
                         metrics["validation_loss_after"])
            else:
                log.info("job %s succeeded: %s in %.1fs, loss %.3f -> %.3f (%s init)", job.id, name,
                         time.monotonic() - started, metrics["loss_before"], metrics["loss_after"], metrics["init"])
        else:
            # The adapter was deleted while training; its folder must not outlive it, nor its load.
            async with httpx.AsyncClient(headers=engine_headers(self.settings.vllm_api_key)) as client:
                await unload_everywhere(client, self.settings.vllm_urls, name)
            await asyncio.to_thread(self.artifacts.delete, name)
            await self.queue.ack(lease)
            await self._observe(job.id)
            log.info("job %s discarded: cancelled or its adapter deleted while it was written", job.id)

    async def _train_and_write(self, job: Job, lease: JobLease, name: str, abort: list[str], started: float) -> dict:
        options = dict(job.options or {})
        init_ref = options.pop("init", None)  # a tenant's init, "name@vN" (resolved by the gateway at submit)
        train = self.engine.train
        if init_ref is None:
            config = self.engine.default_config.merged(options)
        else:
            shared = await asyncio.to_thread(self._load_family_init, job.tenant, init_ref)
            config = self.engine.defaults_for(shared).merged(options)
            train = functools.partial(self.engine.train, shared=shared)
        examples = await self.store.get_job_examples(job.id)
        # With steps="auto" the total is the budget; the job ends at the K it chose.
        await self.store.update_job(job.id, total_steps=config.step_budget)
        log.info("job %s start %s: attempt %d/%d, %d examples, %s steps", job.id, name, lease.delivery_count,
                 self.settings.max_job_attempts, len(examples), config.steps)
        on_step, pending = self._progress_reporter(job.id, config.step_budget, abort, started)
        clock = StepClock()
        outcome = await asyncio.to_thread(train, examples, config, clock.wrap(on_step))
        if pending:  # let the last throttled report land before the final one
            await asyncio.wrap_future(pending[-1])
        last_events = [*on_step.unreported(), evaluation_event(job.id, outcome.metrics)]
        reported = await self.store.update_job(job.id, step=outcome.metrics["steps_run"],
                                               loss=outcome.metrics["train_losses"][-1], events=last_events)
        if reported.status.finished:  # cancelled during the last steps or the evaluation: write nothing
            raise JobAborted(CANCELLED)
        t_write = time.perf_counter()
        await asyncio.to_thread(self._write, job, name)
        metrics = dict(outcome.metrics, step_seconds=clock.times)
        metrics["timings"] = {**metrics.get("timings", {}), "write_s": time.perf_counter() - t_write}
        if init_ref is not None:
            metrics["init_version"] = init_ref
        return metrics

    def _load_family_init(self, tenant: str, init_ref: str):
        """The tenant's init version an adapt job names; ValueError (invalid_input) when it was deleted since."""
        ref = parse_ref(init_ref)
        folder = init_folder_name(tenant, ref.name, ref.version)
        if not self.artifacts.exists(folder):
            raise ValueError(f"init {init_ref!r} no longer exists: it was deleted after this job was submitted")
        self.artifacts.verify(folder)
        return self.engine.load_init(self.artifacts.path(folder))

    async def _train_family_and_write(self, job: Job, lease: JobLease, name: str, abort: list[str],
                                      started: float) -> dict:
        """Meta-train the init of a family job (trainer/family.py) and write it as a shared-init folder. Progress:
        outer step i of N (the job's step / total_steps), and the method and each task's validation loss in
        the job's metrics and events."""
        from trainer.family import FamilyConfig, train_family  # imports torch, like build_engine

        config = FamilyConfig.from_options(job.options or {})
        tasks = await self.store.get_job_examples(job.id)
        await self.store.update_job(job.id, total_steps=config.outer_steps)
        log.info("job %s start init %s: attempt %d/%d, %d tasks, %d outer steps", job.id, name, lease.delivery_count,
                 self.settings.max_job_attempts, len(tasks), config.outer_steps)
        progress, pending = self._progress_reporter(job.id, config.outer_steps, abort, started)
        latest: dict = {}

        def on_outer_step(report) -> None:
            latest.update(method=report.method, outer_step=report.step, outer_steps=report.total,
                          validation_loss=report.validation_loss)
            if report.step == 0:
                progress.check(0)
                progress.metrics = dict(latest)
                return
            progress(report.step, report.query_loss, metrics=dict(latest), events=[validation_event(
                job.id, report.step, report.total, report.method, report.validation_loss)])

        metrics = await asyncio.to_thread(train_family, self.engine, tasks, config, on_outer_step)
        if pending:
            await asyncio.wrap_future(pending[-1])
        reported = await self.store.update_job(job.id, step=config.outer_steps, metrics=dict(latest),
                                               events=progress.unreported())
        if reported.status.finished:
            raise JobAborted(CANCELLED)
        meta = {"metrics": metrics, "init": version_label(job.adapter, job.version), "job_id": job.id}
        await asyncio.to_thread(self._write, job, name,
                                lambda tmp: self.engine.save_init(tmp, config.adapt_config(), self.base_model_name,
                                                                  meta))
        return metrics

    async def _register_task_adapters(self, job: Job, init_name: str, abort: list[str], started: float) -> list[dict]:
        """Each task's adapter, K steps from the family's init on its examples (as an adapt job with "init"
        would train it), registered as an ordinary adapter version named after the task. A retry of the job
        skips the tasks an earlier attempt registered."""
        tasks = await self.store.get_job_examples(job.id)
        shared = await asyncio.to_thread(self.engine.load_init, self.artifacts.path(init_name))
        config = self.engine.defaults_for(shared)
        progress = _Progress(self, job.id, config.steps, abort, started)
        init_ref = version_label(job.adapter, job.version)
        registered = []
        for task in tasks:
            done = await self._registered_by(job, task["name"])
            if done is None:
                outcome = await asyncio.to_thread(self.engine.train, task["examples"], config,
                                                  lambda step, loss: progress.check(step), shared)
                done = await self._register_task(job, task, outcome.metrics, init_ref)
            registered.append(done)
        return registered

    async def _register_task(self, job: Job, task: dict, metrics: dict, init_ref: str) -> dict:
        version = await self.store.allocate_version(job.tenant, task["name"])
        name = vllm_name(job.tenant, task["name"], version)
        metrics = dict(metrics, init_version=init_ref, family_job=job.id)
        await asyncio.to_thread(self._write, job, name, None,
                                {"job_id": job.id, "tenant": job.tenant, "adapter": task["name"], "version": version})
        metrics["warm"] = await self._warm(name)
        record = AdapterVersion(tenant=job.tenant, adapter=task["name"], version=version, job_id=job.id,
                                num_examples=len(task["examples"]), status=VersionStatus.READY, ready_at=now(),
                                metrics=metrics, size_bytes=await self._size(name))
        quota = TenantQuota(max_adapters=self.settings.quota_max_adapters,
                            max_bytes=self.settings.quota_max_stored_bytes)
        try:
            await self.store.add_version(record, quota)
        except QuotaExceeded as exc:
            await asyncio.to_thread(self.artifacts.delete, name)
            raise ValueError(f"task adapter {task['name']!r}: {exc}") from None
        return _task_summary(record)

    async def _registered_by(self, job: Job, task: str) -> dict | None:
        try:
            adapter = await self.store.get_adapter(job.tenant, task)
        except AdapterNotFound:
            return None
        mine = [v for v in adapter.versions if v.job_id == job.id and v.status is VersionStatus.READY]
        return _task_summary(mine[-1]) if mine else None

    def _progress_reporter(self, job_id: str, total: int, abort: list[str], started: float):
        progress = _Progress(self, job_id, total, abort, started)
        return progress, progress.pending

    def _write(self, job: Job, name: str, save=None, record: dict | None = None) -> None:
        """Write folder `name` atomically: `save(tmp)` (default: the engine's last adapter) and JOB_RECORD."""
        record = record or {"job_id": job.id, "tenant": job.tenant, "adapter": job.adapter, "version": job.version}
        try:
            with self.artifacts.staging(name) as tmp:
                if save is None:
                    self.engine.save(tmp, self.base_model_name)
                else:
                    save(tmp)
                (tmp / JOB_RECORD).write_text(json.dumps(record))
        except ArtifactExists:
            if not self._written_by(name, job.id):
                raise
            # Another attempt of this job (a worker whose lease we took over) wrote the same adapter first.

    def _intact(self, name: str) -> bool:
        """Whether a folder an earlier attempt wrote still matches its checksums; a damaged one is removed so
        this attempt trains and writes it again."""
        try:
            self.artifacts.verify(name)
            return True
        except ArtifactCorrupt as exc:
            log.warning("%s; removing it and training again", exc)
            self.artifacts.delete(name)
            return False

    def _written_by(self, name: str, job_id: str) -> bool:
        record = self.artifacts.read_json(name, JOB_RECORD)
        return record is not None and record.get("job_id") == job_id

    async def _fail(self, job: Job, lease: JobLease, message: str, abort: list[str] | None = None,
                    code: str = JobErrorCode.TRAINING_ERROR.value) -> None:
        if abort and abort[0].startswith("lease lost"):
            # Another worker holds the job now; failing it here would void that worker's result.
            log.warning("job %s: %s after losing its lease; left to the new holder", job.id, message)
            return
        await self.store.fail_job(job.id, message, code)
        await self.queue.ack(lease)
        await self._observe(job.id)
        log.info("job %s failed: %s", job.id, message)

    async def _size(self, name: str) -> int:
        """The written version's bytes, for the tenant's stored-bytes quota."""
        return await asyncio.to_thread(folder_bytes, Path(self.artifacts.serving_path(name)))

    async def _retain(self, job: Job) -> None:
        """Retention (adapters/retention.py) once a version is ready: the adapter keeps its newest
        METALORA_RETAIN_VERSIONS ready versions. Never fails the job that just succeeded."""
        if job.kind is not JobKind.ADAPT:
            return
        try:
            async with httpx.AsyncClient(headers=engine_headers(self.settings.vllm_api_key)) as client:
                await prune(self.store, self.artifacts, job.tenant, job.adapter, self.settings.retain_versions,
                            functools.partial(unload_everywhere, client, self.settings.vllm_urls))
        except StoreUnavailable as exc:  # the next version's retention prunes what this one did not
            log.warning("job %s: retention skipped, store unavailable (%s)", job.id, exc)

    async def _warm(self, name: str) -> dict:
        """Load the written version into every vLLM replica (METALORA_VLLM_URLS); replicas that are down are
        skipped and load it on first use. The result goes into the job's metrics (`warm`)."""
        async with httpx.AsyncClient(headers=engine_headers(self.settings.vllm_api_key)) as client:
            result = await load_everywhere(client, self.settings.vllm_urls, name, self.artifacts.serving_path(name))
        if not result.warm:
            log.warning("%s is not loaded on every replica: refused %s, unreachable %s", name, result.refused,
                        result.unreachable)
        return result.to_dict()

    async def _observe(self, job_id: str, step_seconds: list[float] = ()) -> None:
        """Add the finished job to the store's job counters (adapters/job_stats.py, read by GET /metrics)."""
        try:
            job = await self.store.get_job(job_id)
            duration = job.finished_at - job.started_at if job.finished_at and job.started_at else None
            await self.store.add_stats(job_observation(job.status.value, duration, list(step_seconds), job.error_code))
        except Exception as exc:  # metrics must never fail a job
            log.warning("job %s: could not record its metrics: %s", job_id, exc)

    async def _heartbeat(self, lease: JobLease, abort: list[str]) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            try:
                await self.queue.heartbeat(lease)
            except LeaseLost:
                abort.append("lease lost to another worker")
                return
            except StoreUnavailable as exc:
                log.warning("heartbeat for %s failed (%s); retrying", lease.job_id, exc)

    async def _on_stop(self, abort: list[str]) -> None:
        await self.stop.wait()
        abort.append("shutdown")


def _folder(job: Job) -> str:
    """The folder a job writes: an adapter version (vLLM serves it), or an init version (never served)."""
    if job.kind is JobKind.INIT:
        return init_folder_name(job.tenant, job.adapter, job.version)
    return vllm_name(job.tenant, job.adapter, job.version)


def _task_summary(version: AdapterVersion) -> dict:
    m = version.metrics
    return {"adapter": version.adapter, "version": version.version,
            "model": version_label(version.adapter, version.version), "loss_before": m.get("loss_before"), "loss_after": m.get("loss_after")}


async def run_worker(settings: Settings, *, stop: asyncio.Event | None = None, engine=None) -> None:
    stop = stop or asyncio.Event()
    if engine is None:
        engine = await asyncio.to_thread(build_engine, settings)
    artifacts = open_artifacts(settings)
    removed = await asyncio.to_thread(artifacts.sweep_orphans, ORPHAN_MAX_AGE_S)
    if removed:
        log.info("removed %d orphaned staging folder(s)", len(removed))
    backend = open_backend(settings)
    try:
        await Worker(settings, backend, artifacts, engine, stop).run()
    finally:
        await backend.close()


def main(settings: Settings) -> None:
    configure_logging(settings.log_level)
    if settings.worker_threads:
        import torch  # here, as in build_engine: only a real engine needs it

        torch.set_num_threads(settings.worker_threads)
    engine = build_engine(settings)  # before the loop: a SIGTERM during the slow load just kills us

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_worker(settings, stop=stop, engine=engine)

    asyncio.run(serve())
    log.info("worker stopped")


if __name__ == "__main__":
    main(Settings())
