"""The gateway's one service object: every route calls exactly one method here and maps the result.

Nothing in here knows about HTTP status codes: failures are the typed errors of adapters/errors.py and
server/errors.py, mapped to statuses in one table (server/errors.py).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from adapters.adapt_options import DEFAULTS
from adapters.artifacts import open_artifacts
from adapters.lora_limits import rank_problem
from adapters.errors import QuotaExceeded, StoreUnavailable
from adapters.names import parse_ref, validate_name, version_label, vllm_name
from adapters.records import Adapter, AdapterVersion, Job
from adapters.settings import Settings
from adapters.store import JobQueue, MetadataStore, TenantQuota
from adapters.token_count import example_lengths
from server.errors import InvalidRequest, ModelNotFound
from server.protocol import AdaptRequest, ModelList
from server.adapter_io import AdapterFiles, Download
from server.metrics import GatewayMetrics, check_scraper, render
from server.proxy import ProxiedResponse, ProxiedStream, Target, forward, parse_body
from server.upstream import UpstreamPool

log = logging.getLogger("metalora.gateway")


# ---------------------------------------------------------------- example-length validation
class ExampleTokenCounter:
    """Counts an example's tokens by the trainer's rule (adapters/token_count.py) with the base model's
    tokenizer.json, so the gateway needs only the `tokenizers` library."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "ExampleTokenCounter":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise RuntimeError(
                f"{path} not found: the gateway needs the base model's tokenizer.json to validate example"
                " lengths (run `metalora prepare-model`, or set METALORA_BASE_MODEL to a model folder)")
        return cls(Tokenizer.from_file(str(path)))

    def lengths(self, examples: list[tuple[str, str]]) -> list[int]:
        return example_lengths(self.tokenizer, examples)


@dataclass(frozen=True)
class Health:
    """Ready to serve: the store answers and at least one replica is healthy."""

    ok: bool
    store: str  # "ok", or why not
    upstreams: list[dict]  # UpstreamPool.snapshot()


class Gateway:
    def __init__(self, settings: Settings, store: MetadataStore, pool: UpstreamPool,
                 counter: ExampleTokenCounter, base_model_name: str, queue: JobQueue | None = None):
        self.settings = settings
        self.store = store
        self.pool = pool
        self.counter = counter
        self.base_model_name = base_model_name
        self.started_at = int(time.time())
        self.quota = TenantQuota(max_active_jobs=settings.quota_max_active_jobs,
                                 max_adapters=settings.quota_max_adapters)
        self.queue = queue  # only /metrics reads it (queue depth)
        self.files = AdapterFiles(settings, store, pool, base_model_name)
        self.metrics = GatewayMetrics()

    # ------------------------------------------------------------ adapt jobs
    async def submit_adapt(self, tenant: str, request: AdaptRequest) -> Job:
        """Validate everything, THEN write: a rejected request leaves no trace in the store."""
        name = validate_name(request.adapter)
        s = self.settings
        n = len(request.examples)
        if not s.min_examples <= n <= s.max_examples:
            raise InvalidRequest(
                f"examples: got {n} examples; between {s.min_examples} and {s.max_examples} are required",
                param="examples")
        size = sum(len(e.prompt.encode()) + len(e.completion.encode()) for e in request.examples)
        if size > s.quota_max_example_bytes:
            raise QuotaExceeded(
                f"quota exceeded: the examples hold {size} bytes of text; the limit per job is"
                f" {s.quota_max_example_bytes} bytes", quota="max_example_bytes")
        options = request.options()
        problem = rank_problem(options["rank"], s) if "rank" in options else None
        if problem:
            raise InvalidRequest(f"rank: {problem}", param="rank")
        max_seq_len = options.setdefault("max_seq_len", min(DEFAULTS["max_seq_len"], s.vllm_max_model_len))
        if max_seq_len > s.vllm_max_model_len:
            raise InvalidRequest(
                f"max_seq_len: {max_seq_len} exceeds the model context of {s.vllm_max_model_len} tokens",
                param="max_seq_len")
        pairs = [(e.prompt, e.completion) for e in request.examples]
        lengths = await asyncio.to_thread(self.counter.lengths, pairs)
        for index, length in enumerate(lengths):
            if length > max_seq_len:
                raise InvalidRequest(
                    f"examples.{index}: prompt + completion + EOS is {length} tokens; the limit is"
                    f" max_seq_len={max_seq_len} (model context {s.vllm_max_model_len})",
                    param=f"examples.{index}", code="example_too_long")
        examples = [{"prompt": p, "completion": c} for p, c in pairs]
        return await self.store.submit_job(tenant, name, n, examples, options, quota=self.quota)

    async def get_job(self, tenant: str, job_id: str) -> Job:
        return await self.store.get_job(job_id, tenant)

    async def wait_job(self, tenant: str, job_id: str, timeout_s: float) -> Job:
        """Poll the store until the job finished or `timeout_s` passed; return it either way."""
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        job = await self.store.get_job(job_id, tenant)
        while not job.status.finished:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 1.5, 1.0)
            job = await self.store.get_job(job_id, tenant)
        return job

    # ------------------------------------------------------------ adapters and models
    async def list_adapters(self, tenant: str) -> list[Adapter]:
        return await self.store.list_adapters(tenant)

    async def get_adapter(self, tenant: str, name: str) -> Adapter:
        return await self.store.get_adapter(tenant, validate_name(name))

    async def list_models(self, tenant: str) -> ModelList:
        adapters = await self.store.list_adapters(tenant)
        return ModelList.from_adapters(self.base_model_name, adapters, self.started_at)

    async def delete_adapter(self, tenant: str, name: str) -> list[AdapterVersion]:
        """Delete the records (from then on every request for it is a 404), then best effort: the artifact
        folders, and unload it from every replica so none keeps serving it from its LoRA cache."""
        removed = await self.store.delete_adapter(tenant, validate_name(name))
        names = [vllm_name(tenant, v.adapter, v.version) for v in removed]
        await asyncio.gather(self._delete_artifacts(names), *(
            self.pool.broadcast("/v1/unload_lora_adapter", {"lora_name": n}) for n in names))
        return removed

    async def _delete_artifacts(self, names: list[str]) -> None:
        try:
            artifacts = open_artifacts(self.settings)
            for n in names:
                await asyncio.to_thread(artifacts.delete, n)
        except Exception:
            log.exception("could not delete the artifacts of %s", names)

    # ------------------------------------------------------------ adapter files (server/adapter_io.py)
    async def download_adapter(self, tenant: str, name: str, version: int | None) -> Download:
        return await self.files.download(tenant, name, version)

    async def upload_version(self, tenant: str, name: str, files: dict[str, bytes] | bytes) -> AdapterVersion:
        return await self.files.upload(tenant, name, files)

    # ------------------------------------------------------------ metrics (server/metrics.py)
    async def metrics_page(self, authorization: str | None) -> bytes:
        check_scraper(self.settings, authorization)
        return await render(self.metrics, self.store, self.queue, self.pool)

    # ------------------------------------------------------------ health
    async def health(self) -> Health:
        try:
            await asyncio.wait_for(self.store.ping(), timeout=2.0)
            store = "ok"
        except StoreUnavailable as exc:
            store = f"unavailable: {exc}"
        except Exception as exc:
            store = f"error: {type(exc).__name__}: {exc}"
        upstreams = self.pool.snapshot()
        return Health(ok=store == "ok" and any(u["healthy"] for u in upstreams), store=store, upstreams=upstreams)

    # ------------------------------------------------------------ OpenAI-compatible inference
    async def resolve_target(self, tenant: str, body: dict) -> Target:
        model = body.get("model")
        adapter = body.pop("adapter", None)
        if adapter is not None:
            if not isinstance(adapter, str):
                raise InvalidRequest("adapter: must be a string like 'name' or 'name@v2'", param="adapter")
            if model is not None and model != self.base_model_name:
                raise ModelNotFound(
                    f"completion request for another base model: {model!r} (this server serves"
                    f" {self.base_model_name!r}; pass that as model, or the adapter name alone)")
            ref = parse_ref(adapter)
        else:
            if not isinstance(model, str) or not model:
                raise InvalidRequest("model: required, the base model name or an adapter ('name' or"
                                     " 'name@v2')", param="model")
            if model == self.base_model_name:
                return Target(model, model, None)
            ref = parse_ref(model)
        version = await self.store.resolve(tenant, ref.name, ref.version)
        served = vllm_name(tenant, version.adapter, version.version)
        return Target(served, version_label(version.adapter, version.version), served)

    async def proxy(self, tenant: str, raw_body: bytes, path: str = "/v1/completions"
                    ) -> ProxiedResponse | ProxiedStream:
        with self.metrics.request(tenant, path) as observed:
            body = parse_body(raw_body)
            target = await self.resolve_target(tenant, body)
            observed.routed(target)
            return observed.answered(await forward(self.pool, path, body, target))
