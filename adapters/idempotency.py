"""Submitting the same job twice (POST /adapt, POST /v1/inits) returns the first job instead of training again.

Two ways to say "the same": an `Idempotency-Key` the client sends (replayed whatever became of its job,
like Stripe's), and the request itself: same tenant, base model, adapter, examples and options. A request
replays a job that is queued, running or succeeded and whose version still exists; a failed or cancelled one
(or a deleted adapter) trains again. Both are remembered for `Settings.idempotency_window_s`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from adapters.records import AdapterVersion, Job, JobKind, JobStatus

# What clients may send as Idempotency-Key: visible ASCII, like a UUID or a request id.
MAX_KEY_LENGTH = 255

_REPLAYABLE = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED)


class InvalidIdempotencyKey(ValueError):
    pass


@dataclass(frozen=True)
class Dedupe:
    """What `submit_job_once` looks up and records: the request's fingerprint, the client's key (its
    digest, so any key is a safe store key), and for how long both are remembered."""

    request_hash: str
    window_s: float
    key_digest: str | None = None


def request_fingerprint(base_model: str, adapter: str, examples: list[dict[str, Any]], options: dict[str, Any],
                        kind: JobKind = JobKind.ADAPT) -> str:
    """sha256 of the canonical JSON of what the job trains on; the tenant scopes it in the store. An init
    family's (kind INIT: `adapter` its name, `examples` its tasks) names its kind, so it never matches an adapt
    request; an adapt request's leaves it out, so fingerprints and keys remembered before inits existed still
    match."""
    request = {"base_model": base_model, "adapter": adapter, "examples": examples, "options": options}
    if kind is not JobKind.ADAPT:
        request["kind"] = kind.value
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def key_digest(key: str) -> str:
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not all(33 <= ord(ch) <= 126 for ch in key):
        raise InvalidIdempotencyKey(
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} visible ASCII characters (a UUID, say)")
    return hashlib.sha256(key.encode()).hexdigest()


def replays(job: Job, version: AdapterVersion | None) -> bool:
    """Whether an identical request (no key) gets `job` back rather than a new job."""
    return job.status in _REPLAYABLE and version is not None and version.job_id == job.id
