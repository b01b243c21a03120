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
from typing import AsyncIterator, Awaitable, Callable

from pydantic import ValidationError
from tokenizers import Tokenizer

from adapters.adapt_options import DEFAULTS
from adapters.artifacts import open_artifacts
from adapters.lora_limits import rank_problem
from adapters.chat_template import ChatTemplate, ChatTemplateError
from adapters.errors import (AdapterNotFound, AdapterNotReady, ArtifactStoreUnavailable, InvalidAdapterName,
                             JobNotFound, QuotaExceeded, StoreUnavailable)
from adapters.idempotency import Dedupe, InvalidIdempotencyKey, key_digest, request_fingerprint
from adapters.names import AdapterRef, parse_ref, parse_vllm_name, validate_name, version_label, vllm_name
from adapters.records import Adapter, AdapterVersion, Job, JobEvent, JobKind, JobStatus, VersionStatus
from adapters.replicas import unload_stale
from adapters.retention import sweep_leftovers
from adapters.settings import Settings
from adapters.store import JobPage, JobQueue, MetadataStore, TenantQuota
from adapters.token_count import example_lengths, is_chat
from server.errors import InvalidRequest
from server.job_stream import follow
from server.protocol import AdaptRequest, InferenceRouting, ModelList
from server.adapter_io import AdapterFiles, Download
from server.limits import Slot, TenantLimiter
from server.metrics import GatewayMetrics, check_scraper, render
from server.proxy import ProxiedResponse, ProxiedStream, Target, forward, parse_body
from server.upstream import UpstreamPool
from adapters.adapt_options import MAX_FAMILY_TASKS, MIN_FAMILY_TASKS
from adapters.errors import InitNotFound
from adapters.names import init_folder_name
from server.protocol import InitRequest

log = logging.getLogger("metalora.gateway")


# ---------------------------------------------------------------- example-length validation
class ExampleTokenCounter:
    """Counts an example's tokens by the trainer's rule (adapters/token_count.py) with the base model's
    tokenizer.json and chat template, so the gateway needs only the `tokenizers` library and jinja2."""

    def __init__(self, tokenizer: Tokenizer, chat: ChatTemplate | None = None):
        self.tokenizer = tokenizer
        self.chat = chat

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "ExampleTokenCounter":
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise RuntimeError(
                f"{path} not found: the gateway needs the base model's tokenizer.json to validate example"
                " lengths (run `metalora prepare-model`, or set METALORA_BASE_MODEL to a model folder)")
        return cls(Tokenizer.from_file(str(path)), ChatTemplate.from_model_dir(model_dir))

    def lengths(self, examples: list[dict]) -> list[int]:
        """Token counts of prompt/completion or messages examples; InvalidRequest when messages cannot be
        rendered with the base model's chat template."""
        try:
            return example_lengths(self.tokenizer, examples, self.chat)
        except ChatTemplateError as exc:
            raise InvalidRequest(f"examples: {exc}", param="examples", code="chat_template_unsupported") from None


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
                                 max_adapters=settings.quota_max_adapters, max_bytes=settings.quota_max_stored_bytes)
        self.queue = queue  # only /metrics reads it (queue depth)
        self.files = AdapterFiles(settings, store, pool, base_model_name)
        self.metrics = GatewayMetrics()
        pool.on_recovered = self.reconcile_replica
        self.limiter = TenantLimiter(settings.tenant_max_inflight, settings.tenant_requests_per_s,
                                     settings.tenant_request_burst)

    # ------------------------------------------------------------ adapt jobs
    async def submit_adapt(self, tenant: str, request: AdaptRequest,
                           idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Validate everything, THEN write: a rejected request leaves no trace in the store. Returns (job,
        replayed): replayed is the job an identical request or the same Idempotency-Key already created
        (adapters/idempotency.py)."""
        name = validate_name(request.adapter)
        self._check_example_count(request.examples, "examples")
        options = self._checked_options(request.options())
        examples = await self._checked_lengths(request.examples, options["max_seq_len"], "examples")
        if request.init is not None:
            options["init"] = await self._init_version(tenant, request.init)
        return await self._submit(tenant, JobKind.ADAPT, name, examples, options, idempotency_key)

    async def _submit(self, tenant: str, kind: JobKind, name: str, payload: list[dict], options: dict,
                      idempotency_key: str | None) -> tuple[Job, bool]:
        """Every job goes in here, adapt or init: one quota (self.quota, checked by the store with its writes)
        and one idempotency rule (adapters/idempotency.py)."""
        dedupe = self._dedupe(kind, name, payload, options, idempotency_key)
        num_examples = len(payload) if kind is JobKind.ADAPT else sum(len(t["examples"]) for t in payload)
        return await self.store.submit_job_once(tenant, name, num_examples, payload, options, quota=self.quota,
                                                dedupe=dedupe, kind=kind)

    # The limits of one job's examples, which an init family applies to each of its tasks.
    def _check_example_count(self, examples: list, param: str) -> None:
        s = self.settings
        n = len(examples)
        if not s.min_examples <= n <= s.max_examples:
            raise InvalidRequest(
                f"{param}: got {n} examples; between {s.min_examples} and {s.max_examples} are required",
                param=param)
        size = sum(e.text_bytes() for e in examples)
        if size > s.quota_max_example_bytes:
            raise QuotaExceeded(
                f"quota exceeded: the examples hold {size} bytes of text; the limit per job is"
                f" {s.quota_max_example_bytes} bytes", quota="max_example_bytes")

    def _checked_options(self, options: dict) -> dict:
        """The options with the serving engine's limits checked and max_seq_len set."""
        s = self.settings
        problem = rank_problem(options["rank"], s) if "rank" in options else None
        if problem:
            raise InvalidRequest(f"rank: {problem}", param="rank")
        max_seq_len = options.setdefault("max_seq_len", min(DEFAULTS["max_seq_len"], s.vllm_max_model_len))
        if max_seq_len > s.vllm_max_model_len:
            raise InvalidRequest(
                f"max_seq_len: {max_seq_len} exceeds the model context of {s.vllm_max_model_len} tokens",
                param="max_seq_len")
        return options

    async def _checked_lengths(self, request_examples: list, max_seq_len: int, param: str) -> list[dict]:
        """The examples as dicts, each within max_seq_len tokens by the trainer's rule."""
        examples = [e.model_dump() for e in request_examples]
        lengths = await asyncio.to_thread(self.counter.lengths, examples)
        for index, length in enumerate(lengths):
            if length > max_seq_len:
                what = ("the conversation in the chat template" if is_chat(examples[index])
                        else "prompt + completion + EOS")
                raise InvalidRequest(
                    f"{param}.{index}: {what} is {length} tokens; the limit is"
                    f" max_seq_len={max_seq_len} (model context {self.settings.vllm_max_model_len})",
                    param=f"{param}.{index}", code="example_too_long")
        return examples

    # ------------------------------------------------------------ init families (POST /v1/inits)
    async def submit_init(self, tenant: str, request: InitRequest,
                          idempotency_key: str | None = None) -> tuple[Job, bool]:
        """Validate the whole family (each task as one /adapt job's examples), THEN write: a rejected request
        leaves no trace. The job goes on the adapt jobs' queue, under the same quota and replay rule as
        submit_adapt: (job, replayed)."""
        name = validate_name(request.name)
        tasks = request.tasks
        if not MIN_FAMILY_TASKS <= len(tasks) <= MAX_FAMILY_TASKS:
            raise InvalidRequest(f"tasks: got {len(tasks)} tasks; an init family needs between {MIN_FAMILY_TASKS}"
                                 f" and {MAX_FAMILY_TASKS}", param="tasks", code="invalid_task_count")
        seen: set[str] = set()
        for index, task in enumerate(tasks):
            param = f"tasks.{index}.name"
            try:
                validate_name(task.name)  # a task adapter is registered under it
            except InvalidAdapterName as exc:
                raise InvalidRequest(f"{param}: {exc}", param=param, code=InvalidAdapterName.code) from None
            if task.name in seen:
                raise InvalidRequest(f"{param}: task name {task.name!r} appears twice; each task needs its own name",
                                     param=param, code="duplicate_task_name")
            seen.add(task.name)
            self._check_example_count(task.examples, f"tasks.{index}.examples")
        options = self._checked_options(request.options())
        family = [{"name": task.name,
                   "examples": await self._checked_lengths(task.examples, options["max_seq_len"],
                                                           f"tasks.{index}.examples")}
                  for index, task in enumerate(tasks)]
        if request.register_task_adapters:
            options["register_task_adapters"] = True
        return await self._submit(tenant, JobKind.INIT, name, family, options, idempotency_key)

    async def _init_version(self, tenant: str, ref: str) -> str:
        """The init version an adapt job starts from, pinned at submit ("name@vN"): a later version of the same
        init does not change what a queued job trains from."""
        try:
            parsed = parse_ref(ref)
        except InvalidAdapterName as exc:
            raise InvalidRequest(f"init: {exc}", param="init", code=InvalidAdapterName.code) from None
        version = await self.store.resolve_init(tenant, parsed.name, parsed.version)
        return version_label(version.adapter, version.version)

    async def list_inits(self, tenant: str) -> list[Adapter]:
        return await self.store.list_inits(tenant)

    async def get_init(self, tenant: str, name: str) -> Adapter:
        return await self.store.get_init(tenant, self._init_name(name))

    async def delete_init(self, tenant: str, name: str) -> list[AdapterVersion]:
        """Delete the records (adapt jobs naming it are refused from then on; queued ones fail at their start),
        then its folders. Adapters trained from it keep working: they are whole adapters."""
        removed = await self.store.delete_init(tenant, self._init_name(name))
        try:
            artifacts = open_artifacts(self.settings)
            for v in removed:
                await asyncio.to_thread(artifacts.delete, init_folder_name(tenant, v.adapter, v.version))
        except OSError:  # the records are gone: a folder left is an orphan, which the log must name
            log.exception("could not delete the folders of init %s", name)
        return removed

    @staticmethod
    def _init_name(name: str) -> str:
        try:
            return validate_name(name)
        except InvalidAdapterName:  # no init can have it: the 404 an unknown name gets
            raise InitNotFound(name) from None

    def _dedupe(self, kind: JobKind, name: str, payload: list[dict], options: dict,
                idempotency_key: str | None) -> Dedupe | None:
        window = self.settings.idempotency_window_s
        if window <= 0:
            return None
        try:
            digest = key_digest(idempotency_key) if idempotency_key is not None else None
        except InvalidIdempotencyKey as exc:
            raise InvalidRequest(str(exc), param="Idempotency-Key") from None
        return Dedupe(request_fingerprint(self.base_model_name, name, payload, options, kind), window, digest)

    async def get_job(self, tenant: str, job_id: str) -> Job:
        return await self.store.get_job(job_id, tenant)

    async def list_jobs(self, tenant: str, limit: int, after: str | None = None, adapter: str | None = None,
                        status: JobStatus | None = None) -> JobPage:
        try:
            return await self.store.list_jobs(tenant, limit, after, adapter, status)
        except JobNotFound:
            raise InvalidRequest(f"after: no job {after!r} to list from", param="after") from None

    async def cancel_job(self, tenant: str, job_id: str) -> Job:
        return await self.store.cancel_job(job_id, tenant)

    async def job_events(self, tenant: str, job_id: str, after: int, limit: int) -> tuple[list[JobEvent], bool]:
        """(the events after `after`, oldest first, at most `limit`; whether newer ones exist)."""
        await self.store.get_job(job_id, tenant)
        events = await self.store.list_job_events(job_id, after, limit + 1)
        return events[:limit], len(events) > limit

    async def follow_job_events(self, tenant: str, job_id: str, after: int) -> AsyncIterator[list[JobEvent]]:
        """The job's events after `after` as they come, until it ends (server/job_stream.py). Checks the job
        here, so an unknown one is a 404 before any stream starts."""
        await self.store.get_job(job_id, tenant)
        return follow(self.store, job_id, after)

    async def wait_job(self, tenant: str, job_id: str, timeout_s: float,
                       gone: Callable[[], Awaitable[bool]] | None = None) -> Job:
        """Poll the store until the job finished, `timeout_s` passed, or `gone()` says the client left (a wait
        nobody reads any more must not keep polling the store for up to an hour); return the job either way."""
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        job = await self.store.get_job(job_id, tenant)
        while not job.status.finished:
            left = deadline - time.monotonic()
            if left <= 0 or (gone is not None and await gone()):
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
        """Delete the records (from then on every request for it is a 404), then the artifact folders, and
        unload it from every replica so none keeps serving it from its LoRA cache (a replica unreachable now is
        cleaned when it recovers: reconcile_replica). The gateway purges the folders because it mounts the
        adapter store anyway (uploads, downloads); one whose ready versions' folders it cannot see deletes
        nothing (503 adapter_store_unavailable) rather than answer for a purge that did not happen."""
        name = validate_name(name)
        artifacts = open_artifacts(self.settings)
        adapter = await self.store.get_adapter(tenant, name)
        unseen = [v.version for v in adapter.versions if v.status is VersionStatus.READY
                  and not await asyncio.to_thread(artifacts.path(vllm_name(tenant, name, v.version)).is_dir)]
        if unseen:
            raise ArtifactStoreUnavailable(
                f"the gateway does not see the files of {name} version(s) {unseen} under {artifacts.root} (is the"
                " adapter volume mounted?); nothing was deleted")
        removed = await self.store.delete_adapter(tenant, name)
        names = [vllm_name(tenant, v.adapter, v.version) for v in removed]
        await asyncio.gather(self._delete_artifacts(artifacts, names), *(
            self.pool.broadcast("/v1/unload_lora_adapter", {"lora_name": n}) for n in names))
        # Folders retention lost track of (adapters/retention.py), or an upload that died before its record: no
        # record names any folder of the name now, and versions are never reused, so every old one goes.
        try:
            leftovers = await asyncio.to_thread(sweep_leftovers, artifacts, tenant, name, None, set())
        except Exception:  # the records are gone and the answer stands: the log names what is left
            log.exception("could not sweep the leftover folders of %s", name)
            leftovers = []
        await asyncio.gather(*(self.pool.broadcast("/v1/unload_lora_adapter", {"lora_name": n}) for n in leftovers))
        return removed

    async def _delete_artifacts(self, artifacts, names: list[str]) -> None:
        for n in names:
            try:
                await asyncio.to_thread(artifacts.delete, n)
            except OSError:  # the records are gone: the folder is an orphan now, which the log must name
                log.exception("could not delete the artifacts of %s", n)

    async def reconcile_replica(self, url: str) -> list[str]:
        """Unload from a replica that has just turned healthy every version the store no longer has (deleted
        while the replica was down or unreachable, it may still hold it). The names unloaded."""
        async def deleted(served: str) -> bool:
            parsed = parse_vllm_name(served)
            if parsed is None:
                return False
            try:
                await self.store.resolve(*parsed)
            except AdapterNotFound:
                return True
            except AdapterNotReady:  # still being trained or warmed: the worker loads it before it is ready
                return False
            return False

        return await unload_stale(self.pool.client, url, deleted)

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
        """Where an inference body goes; pops `adapter`, the one field vLLM must not see."""
        try:
            routing = InferenceRouting.model_validate(body)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(str(p) for p in error["loc"])
            raise InvalidRequest(f"{field}: {error['msg']}", param=field) from None
        body.pop("adapter", None)
        ref = self._adapter_ref(routing.model, routing.adapter)
        if ref is None:
            return Target(self.base_model_name, self.base_model_name, None)
        version = await self.store.resolve(tenant, ref.name, ref.version)
        served = vllm_name(tenant, version.adapter, version.version)
        return Target(served, version_label(version.adapter, version.version), served)

    def _adapter_ref(self, model: str | None, adapter: str | None) -> AdapterRef | None:
        """The adapter a request names, or None for the base model. `model` may be left out, the base model,
        or an adapter; `adapter` names an adapter, and with `model` both may name it (a pin in either holds)."""
        base = self.base_model_name
        if adapter is None:
            return None if model is None or model == base else parse_ref(model)
        ref = parse_ref(adapter)
        if model is None or model == base:
            return ref
        try:
            other = parse_ref(model)
        except InvalidAdapterName:
            other = None
        same = other is not None and other.name == ref.name and (
            other.version is None or ref.version is None or other.version == ref.version)
        if not same:
            raise InvalidRequest(
                f"model {model!r} and adapter {adapter!r} name different models: name the adapter in one of them"
                f" (model may also be the base model {base!r}, or left out)", param="adapter",
                code="model_adapter_mismatch")
        return AdapterRef(ref.name, ref.version or other.version)

    async def proxy(self, tenant: str, raw_body: bytes, path: str) -> ProxiedResponse | ProxiedStream:
        """One path for every inference endpoint (proxy.COMPLETIONS, proxy.CHAT_COMPLETIONS): vLLM renders a
        chat with the base model's template, the same one adapters trained on messages saw."""
        with self.metrics.request(tenant, path) as observed:
            slot = self.limiter.admit(tenant)  # before the store or vLLM sees anything of an over-limit tenant
            try:
                body = parse_body(raw_body)
                target = await self.resolve_target(tenant, body)
                observed.routed(target)
                result = observed.answered(await forward(self.pool, path, body, target))
            except BaseException:
                slot.release()
                raise
            if isinstance(result, ProxiedStream):
                result.chunks = _holding(slot, result.chunks)
            else:
                slot.release()
            return result


async def _holding(slot: Slot, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A stream keeps its tenant's in-flight slot until its last byte, or until its client goes away."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        slot.release()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
