"""The gateway's one service object: every route calls exactly one method here and maps the result.

Nothing in here knows about HTTP status codes: failures are the typed errors of adapters/errors.py and
server/errors.py, mapped to statuses in one table (server/errors.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import httpx

from adapters.errors import StoreUnavailable
from adapters.names import parse_ref, validate_name, version_label, vllm_name
from adapters.records import Adapter, AdapterVersion, Job
from adapters.settings import Settings
from adapters.errors import QuotaExceeded
from adapters.store import MetadataStore, TenantQuota
from server.errors import InvalidRequest, ModelNotFound, UpstreamError, error_body
from server.protocol import DEFAULT_MAX_SEQ_LEN, AdaptRequest, ModelList
from server.upstream import UpstreamPool

log = logging.getLogger("metalora.gateway")

SSE_DATA = b"data:"
SSE_DONE = b"[DONE]"


# ---------------------------------------------------------------- example-length validation
class ExampleTokenCounter:
    """Counts tokens exactly as the trainer does (trainer/data.py): the prompt encoded on its own with
    special tokens, then the completion without them, then one EOS. Uses only the `tokenizers` library."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "ExampleTokenCounter":
        from tokenizers import Tokenizer

        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise RuntimeError(
                f"{path} not found: the gateway needs the base model's tokenizer.json to validate example"
                " lengths (run `metalora prepare-model`, or set METALORA_BASE_MODEL to a model folder)")
        return cls(Tokenizer.from_file(str(path)))

    def lengths(self, examples: list[tuple[str, str]]) -> list[int]:
        prompts = self.tokenizer.encode_batch([p for p, _ in examples], add_special_tokens=True)
        completions = self.tokenizer.encode_batch([c for _, c in examples], add_special_tokens=False)
        return [len(p.ids) + len(c.ids) + 1 for p, c in zip(prompts, completions)]


# ---------------------------------------------------------------- proxy results
@dataclass
class ProxiedResponse:
    status: int
    body: bytes
    media_type: str = "application/json"


@dataclass
class ProxiedStream:
    chunks: AsyncIterator[bytes]
    media_type: str = "text/event-stream"


@dataclass(frozen=True)
class Target:
    """Where a completion goes: the name vLLM serves, the name the client sees, the routing key."""

    upstream_model: str
    visible_model: str
    affinity_key: str | None

    def rewriter(self):
        if self.upstream_model == self.visible_model:
            return lambda payload: payload
        # vLLM serialises compactly, so a chunk names the model exactly as `"model":"<name>"`. That
        # byte sequence cannot occur inside a JSON string value (its quotes would be escaped), so replacing
        # it touches only the `model` field. Anything else falls back to parsing the JSON.
        old = b'"model":' + json.dumps(self.upstream_model).encode()
        new = b'"model":' + json.dumps(self.visible_model).encode()
        upstream, visible = self.upstream_model, self.visible_model

        def rewrite(payload: bytes) -> bytes:
            if old in payload:
                return payload.replace(old, new, 1)
            try:
                data = json.loads(payload)
            except ValueError:
                return payload
            if isinstance(data, dict) and data.get("model") == upstream:
                data["model"] = visible
                return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
            return payload

        return rewrite


class Gateway:
    def __init__(self, settings: Settings, store: MetadataStore, pool: UpstreamPool,
                 counter: ExampleTokenCounter, base_model_name: str):
        self.settings = settings
        self.store = store
        self.pool = pool
        self.counter = counter
        self.base_model_name = base_model_name
        self.started_at = int(time.time())
        self.quota = TenantQuota(max_active_jobs=settings.quota_max_active_jobs,
                                 max_adapters=settings.quota_max_adapters)

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
        if "rank" in options and options["rank"] > s.vllm_max_lora_rank:
            raise InvalidRequest(
                f"rank: {options['rank']} exceeds the serving engine's max LoRA rank {s.vllm_max_lora_rank}",
                param="rank")
        max_seq_len = options.setdefault("max_seq_len", min(DEFAULT_MAX_SEQ_LEN, s.vllm_max_model_len))
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
            from adapters.artifacts import open_artifacts

            artifacts = open_artifacts(self.settings)
            for n in names:
                await asyncio.to_thread(artifacts.delete, n)
        except Exception:
            log.exception("could not delete the artifacts of %s", names)

    # ------------------------------------------------------------ health
    async def health(self) -> tuple[bool, str, list[dict]]:
        try:
            await asyncio.wait_for(self.store.ping(), timeout=2.0)
            store = "ok"
        except StoreUnavailable as exc:
            store = f"unavailable: {exc}"
        except Exception as exc:
            store = f"error: {type(exc).__name__}: {exc}"
        upstreams = self.pool.snapshot()
        ok = store == "ok" and any(u["healthy"] for u in upstreams)
        return ok, store, upstreams

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
        try:
            body = json.loads(raw_body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"malformed JSON body: {exc}", code="invalid_json") from None
        except RecursionError:  # e.g. 100k nested lists: json's C parser gives up on the Python stack
            raise InvalidRequest("malformed JSON body: nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        target = await self.resolve_target(tenant, body)
        body["model"] = target.upstream_model
        content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        stream = body.get("stream") is True
        response = await self.pool.post(path, content, target.affinity_key, stream=stream)
        rewrite = target.rewriter()
        if response.status_code >= 400:
            if stream:
                try:
                    await response.aread()
                finally:
                    await response.aclose()
            raise _upstream_error(response, target)
        if not stream:
            return ProxiedResponse(response.status_code, rewrite(response.content),
                                   response.headers.get("content-type", "application/json"))
        return ProxiedStream(_relay_sse(response, rewrite))


async def _relay_sse(response: httpx.Response, rewrite) -> AsyncIterator[bytes]:
    """Relay vLLM's SSE stream event by event, rewriting only the `model` of each `data:` JSON chunk."""
    buffer = b""
    try:
        async for chunk in response.aiter_bytes():
            buffer += chunk
            if b"\n" not in chunk:
                continue
            *lines, buffer = buffer.split(b"\n")
            yield b"\n".join(_rewrite_line(line, rewrite) for line in lines) + b"\n"
        if buffer:
            yield _rewrite_line(buffer, rewrite)
    except httpx.HTTPError as exc:
        # Bytes already went to the client: no failover possible. End the stream with an error event,
        # as vLLM itself does for errors mid-stream.
        log.warning("upstream stream broke: %s", exc)
        error = error_body(f"the inference replica failed mid-stream ({type(exc).__name__})",
                           "service_unavailable_error", "upstream_unavailable")
        yield b"data: " + json.dumps(error).encode() + b"\n\n"
    finally:
        await response.aclose()


def _rewrite_line(line: bytes, rewrite) -> bytes:
    if not line.startswith(SSE_DATA):
        return line
    payload = line[len(SSE_DATA):].strip()
    if not payload or payload == SSE_DONE:
        return line
    return b"data: " + rewrite(payload)


def _upstream_error(response: httpx.Response, target: Target) -> UpstreamError:
    """vLLM's error answer in our shape, with its status; its internal model name replaced."""
    message, err_type, code = None, None, None
    try:
        data = response.json()
        info = data.get("error") if isinstance(data, dict) else None
        if isinstance(info, dict):  # {"error": {"message", "type", "code", ...}}
            message, err_type, code = info.get("message"), info.get("type"), info.get("code")
        elif isinstance(data, dict):  # older vLLM: {"object": "error", "message", "type", "code"}
            message, err_type, code = data.get("message"), data.get("type"), data.get("code")
            if message is None and isinstance(data.get("detail"), str):
                message = data["detail"]
    except ValueError:
        pass
    if not isinstance(message, str):
        message = response.text[:1000] or f"inference replica answered {response.status_code}"
    if target.upstream_model != target.visible_model:
        message = message.replace(target.upstream_model, target.visible_model)
    status = response.status_code
    if not isinstance(err_type, str) or not err_type:
        err_type = "invalid_request_error" if status < 500 else "server_error"
    if not isinstance(code, str) or not code:
        code = "upstream_error"
    return UpstreamError(status, message, err_type, code)
