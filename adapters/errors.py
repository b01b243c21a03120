"""Typed domain errors. The gateway maps each class to one HTTP status in one place."""
from __future__ import annotations


class MetaloraError(Exception):
    """Base class; `code` is the stable machine-readable error code clients see."""

    code = "internal_error"


class InvalidAdapterName(MetaloraError):
    code = "invalid_adapter_name"

    def __init__(self, name: object):
        super().__init__(
            f"invalid adapter name {name!r}: use 1-64 characters [a-z0-9._-] starting with a letter or digit,"
            " optionally followed by @v<N> to pin a version"
        )
        self.name = name


class AdapterNotFound(MetaloraError):
    code = "adapter_not_found"

    def __init__(self, ref: str):
        super().__init__(f"adapter {ref!r} not found")
        self.ref = ref


class AdapterNotReady(MetaloraError):
    code = "adapter_not_ready"

    def __init__(self, ref: str, status: str):
        super().__init__(f"adapter {ref!r} has no ready version yet (newest version is {status})")
        self.ref = ref
        self.status = status


class InitNotFound(AdapterNotFound):
    """An init (POST /v1/inits) the tenant does not have: unknown, deleted, or another tenant's."""

    code = "init_not_found"

    def __init__(self, ref: str):
        MetaloraError.__init__(self, f"init {ref!r} not found")
        self.ref = ref


class InitNotReady(AdapterNotReady):
    code = "init_not_ready"

    def __init__(self, ref: str, status: str):
        MetaloraError.__init__(self, f"init {ref!r} has no ready version yet (newest version is {status})")
        self.ref = ref
        self.status = status


class VersionPruned(AdapterNotFound):
    """A pinned `name@vN` that retention removed (METALORA_RETAIN_VERSIONS): gone for good, unlike a typo."""

    code = "version_pruned"

    def __init__(self, ref: str):
        MetaloraError.__init__(self, f"adapter version {ref!r} was pruned: only the newest ready versions of an adapter"
                                     " are kept (METALORA_RETAIN_VERSIONS)")
        self.ref = ref


class JobNotFound(MetaloraError):
    code = "job_not_found"

    def __init__(self, job_id: str):
        super().__init__(f"job {job_id!r} not found")
        self.job_id = job_id


class QuotaExceeded(MetaloraError):
    """A per-tenant limit (adapt jobs in flight, stored adapters, example bytes) would be exceeded;
    nothing was written. `quota` names the limit, for clients and logs."""

    code = "quota_exceeded"

    def __init__(self, message: str, quota: str):
        super().__init__(message)
        self.quota = quota


class AuthenticationFailed(MetaloraError):
    """No usable API key: missing, malformed, unknown or revoked. One class for all of them so a caller
    learns nothing about which keys exist; `code` says what to fix on the caller's side."""

    code = "invalid_api_key"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class ApiKeyNotFound(MetaloraError):
    code = "api_key_not_found"

    def __init__(self, key_id: str):
        super().__init__(f"API key {key_id!r} not found")
        self.key_id = key_id


class StoreUnavailable(MetaloraError):
    """The metadata store cannot be reached (Redis down, SQLite file locked) or could not commit a write (the
    write was rolled back); callers should retry later."""

    code = "store_unavailable"


class ArtifactStoreUnavailable(StoreUnavailable):
    """This process does not see the adapter store's files (a volume not mounted): nothing was deleted."""

    code = "adapter_store_unavailable"


class ArtifactCorrupt(MetaloraError):
    code = "adapter_artifact_corrupt"


class JobNotCancellable(MetaloraError):
    """Cancel asked of a job that already succeeded or failed (a cancelled one cancels again quietly)."""

    code = "job_not_cancellable"

    def __init__(self, job_id: str, status: str):
        super().__init__(f"job {job_id!r} already {status}; only queued or running jobs can be cancelled")
        self.job_id = job_id
        self.status = status


class IdempotencyKeyReused(MetaloraError):
    """An Idempotency-Key sent again with a different request; nothing was written."""

    code = "idempotency_key_reused"

    def __init__(self, job_id: str):
        super().__init__(f"this Idempotency-Key was used for another request (job {job_id!r}); use a new key for"
                         " a different request")
        self.job_id = job_id
