"""Lifecycle enums and the records kept in the metadata store.

Records are plain dataclasses with `to_dict`/`from_dict` so both stores (Redis hashes of JSON, SQLite
rows of JSON) serialise them the same way; wire models in `server/protocol.py` convert from them.
"""
from __future__ import annotations

import re
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

from adapters.errors import JobNotFound


class JobStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class VersionStatus(str, Enum):
    # A version exists from the moment its job is accepted, so `name@v2` can be reported as "queued".
    QUEUED = "queued"
    RUNNING = "running"
    READY = "ready"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobKind(str, Enum):
    """What a job trains. Both kinds share the queue, the workers and every job rule; the kind says which
    namespace its version record lives in (an adapter's versions, or an init's)."""

    ADAPT = "adapt"  # POST /adapt: one adapter version
    INIT = "init"  # POST /v1/inits: one version of a tenant's meta-learned init (trainer/family.py)


class JobErrorCode(str, Enum):
    """Why a job failed (or was cancelled by something other than its client): stable codes for clients."""

    INVALID_INPUT = "invalid_input"  # examples or options the trainer rejects: retrying cannot help
    TIMEOUT = "job_timeout"
    ATTEMPTS_EXHAUSTED = "max_attempts_exceeded"  # its workers kept dying (crash, OOM kill, shutdown)
    TRAINING_ERROR = "training_error"
    NON_FINITE_LOSS = "non_finite_loss"  # training diverged (NaN / inf); a lower learning rate or alpha may help
    ADAPTER_DELETED = "adapter_deleted"


class JobEventType(str, Enum):
    QUEUED = "queued"
    STARTED = "started"
    REQUEUED = "requeued"  # its worker shut down mid-job; another attempt follows
    STEP = "step"
    EVALUATION = "evaluation"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


def now() -> float:
    return time.time()


JOB_ID_PATTERN = re.compile(r"job-[0-9a-f]{20}")


def new_job_id() -> str:
    return "job-" + uuid.uuid4().hex[:20]


def check_job_id(job_id: object) -> str:
    """A job id as new_job_id makes it, else JobNotFound: no job has another id, and a store must never build a
    key from one (on Redis, `<id>:examples` would name the job's examples)."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
        raise JobNotFound(str(job_id)[:100])
    return job_id


class _Record:
    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known})  # type: ignore[call-arg]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)  # type: ignore[call-overload]
        for key, value in data.items():
            if isinstance(value, Enum):
                data[key] = value.value
        return data


@dataclass
class Job(_Record):
    id: str
    tenant: str
    adapter: str
    version: int
    num_examples: int
    status: JobStatus = JobStatus.QUEUED
    created_at: float = field(default_factory=now)
    updated_at: float = field(default_factory=now)
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    error: str | None = None
    attempts: int = 0
    # Training options the client chose (steps, learning_rate, ...), validated by the gateway.
    options: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    error_code: str | None = None  # a JobErrorCode value, beside the human-readable `error`
    # While running: when the worker expects the last step to end (its step time so far x steps left).
    estimated_finish: float | None = None
    # adapters/idempotency.py's fingerprint of the request that created the job.
    request_hash: str | None = None
    kind: JobKind = JobKind.ADAPT  # INIT: `adapter` and `version` name an init version

    def __post_init__(self):
        self.status = JobStatus(self.status)
        self.kind = JobKind(self.kind)


@dataclass
class JobEvent(_Record):
    """One entry of a job's event log. `id` counts from 1 per job, so `after=<id>` resumes a listing."""

    id: int
    job_id: str
    type: str  # a JobEventType value
    message: str
    created_at: float = field(default_factory=now)
    level: str = "info"  # "info" | "warning" | "error"
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdapterVersion(_Record):
    tenant: str
    adapter: str
    version: int
    job_id: str
    num_examples: int
    status: VersionStatus = VersionStatus.QUEUED
    created_at: float = field(default_factory=now)
    ready_at: float | None = None
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    kind: JobKind = JobKind.ADAPT  # INIT: a version of an init (`adapter` is the init's name)
    size_bytes: int = 0  # its files, counted in the tenant's stored bytes from when it is ready

    def __post_init__(self):
        self.status = VersionStatus(self.status)
        self.kind = JobKind(self.kind)


@dataclass
class Adapter:
    """An adapter name in a tenant's namespace and all its versions, oldest first."""

    tenant: str
    name: str
    versions: list[AdapterVersion]

    @property
    def newest_ready(self) -> AdapterVersion | None:
        ready = [v for v in self.versions if v.status is VersionStatus.READY]
        return ready[-1] if ready else None

    @property
    def created_at(self) -> float:
        return self.versions[0].created_at if self.versions else 0.0
