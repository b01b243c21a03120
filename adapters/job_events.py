"""A job's event log: what each event says, built once for both stores and the worker.

Stores append a status event whenever a change moves a job to another status (`status_event`), in the same
transaction as the change; the worker adds step and evaluation events to its progress reports. Events get
their per-job `id` from the store that appends them; only the newest `keys.JOB_EVENTS_KEPT` are kept.
"""
from __future__ import annotations

from typing import Any

from adapters.records import Job, JobEvent, JobEventType, JobStatus, now

# The event that ends a job's log: an event stream stops after it.
TERMINAL_EVENTS = frozenset({JobEventType.SUCCEEDED.value, JobEventType.FAILED.value, JobEventType.CANCELLED.value})


def _event(job_id: str, kind: JobEventType, message: str, level: str = "info", **data: Any) -> JobEvent:
    return JobEvent(id=0, job_id=job_id, type=kind.value, message=message, created_at=now(), level=level, data=data)


def status_event(job: Job, previous: JobStatus | None) -> JobEvent | None:
    """The event for a job that just moved from `previous` (None: just created) to `job.status`."""
    status = job.status
    if status is previous:
        return None
    if status is JobStatus.QUEUED and previous is None:
        return _event(job.id, JobEventType.QUEUED, f"job queued: {job.adapter}@v{job.version},"
                      f" {job.num_examples} examples", adapter=job.adapter, version=job.version)
    if status is JobStatus.QUEUED:
        return _event(job.id, JobEventType.REQUEUED, "worker stopped; the job waits for another attempt",
                      level="warning")
    if status is JobStatus.RUNNING:
        return _event(job.id, JobEventType.STARTED, f"training started (attempt {job.attempts})",
                      attempt=job.attempts)
    if status is JobStatus.SUCCEEDED:
        return _event(job.id, JobEventType.SUCCEEDED, f"{job.adapter}@v{job.version} is ready",
                      model=f"{job.adapter}@v{job.version}")
    if status is JobStatus.FAILED:
        return _event(job.id, JobEventType.FAILED, f"job failed: {job.error}", level="error",
                      error=job.error, code=job.error_code)
    reason = f": {job.error}" if job.error else ""
    return _event(job.id, JobEventType.CANCELLED, f"job cancelled{reason}", level="warning",
                  step=job.step, code=job.error_code)


def step_event(job_id: str, step: int, total_steps: int, loss: float) -> JobEvent:
    return _event(job_id, JobEventType.STEP, f"step {step}/{total_steps}: loss {loss:.4f}",
                  step=step, total_steps=total_steps, loss=loss)


def evaluation_event(job_id: str, metrics: dict[str, Any]) -> JobEvent:
    """The held-out loss before and after the K steps (or the training loss when nothing was held out)."""
    on = metrics.get("eval_on", "holdout")
    before, after = metrics["loss_before"], metrics["loss_after"]
    return _event(job_id, JobEventType.EVALUATION, f"{on} loss {before:.4f} -> {after:.4f}",
                  eval_on=on, loss_before=before, loss_after=after, num_holdout=metrics.get("num_holdout"))


def validation_event(job_id: str, step: int, total_steps: int, method: str,
                     losses: dict[str, float | None]) -> JobEvent:
    """An init family's outer step: each task's loss on its held-back slice at the current init."""
    shown = ", ".join(f"{task} {'-' if loss is None else f'{loss:.4f}'}" for task, loss in losses.items())
    return _event(job_id, JobEventType.EVALUATION,
                  f"outer step {step}/{total_steps} ({method}): validation loss {shown}", step=step, total_steps=total_steps, method=method, validation_loss=dict(losses))


def numbered(events: list[JobEvent], last_id: int) -> list[JobEvent]:
    """`events` with ids continuing after `last_id` (the store's newest)."""
    for offset, event in enumerate(events, 1):
        event.id = last_id + offset
    return events
