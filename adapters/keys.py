"""Every Redis key name and TTL metalora uses, in one place (arq-constants style).

All keys start with `Settings.redis_prefix`, so several deployments or test runs can share one Redis
and `SCAN MATCH {prefix}:*` finds everything one of them owns.
"""
from __future__ import annotations

from dataclasses import dataclass

# Finished jobs stay readable for a week so clients can still poll a job they submitted long ago.
FINISHED_JOB_TTL_S = 7 * 24 * 3600
# Examples are deleted when their job finishes; this TTL only bounds what a crashed deployment leaks.
EXAMPLES_TTL_S = 14 * 24 * 3600
# A job's event log keeps its newest events only (both stores): enough for every step of a long job.
JOB_EVENTS_KEPT = 1000

JOBS_GROUP = "workers"
STREAM_FIELD_JOB_ID = "job_id"


@dataclass(frozen=True)
class Keys:
    prefix: str

    def versions(self, tenant: str, name: str) -> str:
        """Hash: version number -> AdapterVersion JSON."""
        return f"{self.prefix}:adapter:{tenant}:{name}:versions"

    def next_version(self, tenant: str, name: str) -> str:
        """Counter of the last allocated version. Kept when the adapter is deleted: a version number is
        never reused, because vLLM caches LoRAs by name and the old folder name must stay unique."""
        return f"{self.prefix}:adapter:{tenant}:{name}:next_version"

    def latest(self, tenant: str, name: str) -> str:
        """String: the adapter's newest ready version number, the one record resolve(name) reads."""
        return f"{self.prefix}:adapter:{tenant}:{name}:latest"

    def pruned_through(self, tenant: str, name: str) -> str:
        """String: the highest version number retention removed (a pinned request for it is version_pruned)."""
        return f"{self.prefix}:adapter:{tenant}:{name}:pruned_through"

    def tenant_bytes(self, tenant: str) -> str:
        """Counter: bytes of the tenant's stored adapter versions (the max_bytes quota)."""
        return f"{self.prefix}:tenant:{tenant}:bytes"

    def adapter_names(self, tenant: str) -> str:
        """Set of the tenant's adapter names that have at least one version."""
        return f"{self.prefix}:adapters:{tenant}"

    def init_versions(self, tenant: str, name: str) -> str:
        """Hash: version number -> AdapterVersion JSON (kind init) of a tenant's init (POST /v1/inits)."""
        return f"{self.prefix}:init:{tenant}:{name}:versions"

    def init_next_version(self, tenant: str, name: str) -> str:
        """Counter of an init's last allocated version; kept on delete, like next_version."""
        return f"{self.prefix}:init:{tenant}:{name}:next_version"

    def init_names(self, tenant: str) -> str:
        """Set of the tenant's init names that have at least one version."""
        return f"{self.prefix}:inits:{tenant}"

    def active_jobs(self, tenant: str) -> str:
        """Set of the tenant's job ids that may still be queued or running (the in-flight quota). Members are
        removed when a job finishes; submit_job also prunes finished/expired ones it finds, so a member left
        behind by a crash cannot hold a quota slot forever."""
        return f"{self.prefix}:tenant:{tenant}:active_jobs"

    @property
    def api_keys(self) -> str:
        """Hash: sha256 hex of an API key -> ApiKey JSON. Only the hash is stored, never the key."""
        return f"{self.prefix}:apikeys:by_hash"

    @property
    def api_key_ids(self) -> str:
        """Hash: key id -> sha256 hex (for `keys revoke <id>` and listing)."""
        return f"{self.prefix}:apikeys:by_id"

    def job(self, job_id: str) -> str:
        """String: Job JSON."""
        return f"{self.prefix}:job:{job_id}"

    def job_examples(self, job_id: str) -> str:
        """String: JSON list of examples."""
        return f"{self.prefix}:job:{job_id}:examples"

    def job_events(self, job_id: str) -> str:
        """List of JobEvent JSON, oldest first, trimmed to JOB_EVENTS_KEPT; expires with its finished job."""
        return f"{self.prefix}:job:{job_id}:events"

    def tenant_jobs(self, tenant: str) -> str:
        """Sorted set: the tenant's job ids scored by created_at (job listing). Members whose job expired are
        pruned when a listing meets them."""
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def idempotency_key(self, tenant: str, key_digest: str) -> str:
        """String: {"job_id", "request_hash"} for a client's Idempotency-Key; expires after the window."""
        return f"{self.prefix}:tenant:{tenant}:idempotency:{key_digest}"

    def request_dedupe(self, tenant: str, request_hash: str) -> str:
        """String: the job id created for a request fingerprint (adapters/idempotency.py); expires after the
        window."""
        return f"{self.prefix}:tenant:{tenant}:request:{request_hash}"

    @property
    def jobs_stream(self) -> str:
        return f"{self.prefix}:jobs:stream"

    @property
    def jobs_group(self) -> str:
        return JOBS_GROUP

    @property
    def stats(self) -> str:
        """Hash: job metric counter name (adapters/job_stats.py) -> value; kept forever, like any counter."""
        return f"{self.prefix}:stats"
