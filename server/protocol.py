"""All wire models of the gateway, and their conversions from the records in adapters/records.py.

Requests forbid unknown fields (a typo like "step" is a 400 naming the field, not silently ignored).
Inference bodies (/v1/completions, /v1/chat/completions) are the exception: the gateway validates only what
it reads (InferenceRouting) and forwards the rest to vLLM untouched, so any OpenAI/vLLM sampling field works.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError, WrapValidator, create_model, field_validator, model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from adapters.adapt_options import FAMILY_OPTIONS, OPTIONS, OptionSpec, check_together
from adapters.chat_template import CHAT_ROLES, InvalidConversation, check_conversation
from adapters.names import NAME_PATTERN, version_label
from adapters.records import Adapter, AdapterVersion, Job, JobEvent
from adapters.store import JobPage


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(min_length=1)
    completion: StrictStr = Field(min_length=1)

    _not_blank = field_validator("prompt", "completion")(_text)

    def text_bytes(self) -> int:
        return len(self.prompt.encode()) + len(self.completion.encode())


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal[CHAT_ROLES]  # type: ignore[valid-type]
    content: StrictStr = Field(min_length=1)

    _not_blank = field_validator("content")(_text)


class ChatExample(BaseModel):
    """OpenAI's chat fine-tuning format; the loss is on the assistant turns (adapters/token_count.py)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage]

    @classmethod
    def validate_example(cls, value: dict) -> "ChatExample":
        """The model, then the conversation rules, an error naming the message (examples.0.messages.2)."""
        example = cls.model_validate(value)
        try:
            check_conversation([m.model_dump() for m in example.messages])
        except InvalidConversation as exc:
            loc = ("messages",) if exc.index is None else ("messages", exc.index)
            raise ValidationError.from_exception_data(cls.__name__, [InitErrorDetails(
                type=PydanticCustomError("invalid_conversation", str(exc)), loc=loc, input=value)]) from None
        return example

    def text_bytes(self) -> int:
        return sum(len(m.content.encode()) for m in self.messages)


def _example_format(value: Any, handler: Any) -> Example | ChatExample:
    # Dispatch on the `messages` key rather than trying both models, so an error names the field as sent
    # (examples.0.completion), not a union member.
    if isinstance(value, dict) and "messages" in value:
        return ChatExample.validate_example(value)
    return Example.model_validate(value)


AnyExample = Annotated[Example | ChatExample, WrapValidator(_example_format)]


class _AdaptRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Validated by adapters.names.validate_name in the service (one rule for the whole system); the pattern
    # here only documents that rule in the OpenAPI schema.
    adapter: StrictStr = Field(max_length=256, json_schema_extra={"pattern": f"^{NAME_PATTERN.pattern}$"})
    examples: list[AnyExample]
    # Unset: the service's default init (Settings.shared_init). Pinned to a version at submit, recorded in the
    # job's options as "name@vN"; the init's procedure (K, learning rate, LoRA shape) becomes the job's defaults.
    init: StrictStr | None = Field(default=None, max_length=256,
                                   description="a tenant init to start from (POST /v1/inits): 'name' or 'name@v2'")

    def options(self) -> dict[str, Any]:
        """The training options the client set; unset ones take the worker's defaults."""
        return {k: getattr(self, k) for k in OPTIONS if getattr(self, k) is not None}

    @model_validator(mode="after")
    def _options_together(self):
        check_together(self.options())  # e.g. steps="auto" needs a held-out slice
        return self


def _option_field(spec: OptionSpec) -> tuple[Any, Any]:
    # No default here: an unset option takes the worker's, which a shipped shared init may set.
    bounds = {"gt" if spec.min_exclusive else "ge": spec.min, "lt" if spec.max_exclusive else "le": spec.max}
    number = Annotated[spec.type, Field(**bounds)]
    kind = number | Literal[spec.words] if spec.words else number  # e.g. steps: 30 or "auto"
    return kind | None, Field(default=None, description=spec.doc)


# One field per training option of adapters/adapt_options.py, bounded as there. The service also bounds `rank`
# by settings.vllm_max_lora_rank and `max_seq_len` by settings.vllm_max_model_len (what vLLM was started with).
AdaptRequest = create_model("AdaptRequest", __base__=_AdaptRequestBase, __module__=__name__,
                            **{name: _option_field(spec) for name, spec in OPTIONS.items()})


class FamilyTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Validated by adapters.names.validate_name in the service: a task adapter is registered under it.
    name: StrictStr = Field(max_length=256, json_schema_extra={"pattern": f"^{NAME_PATTERN.pattern}$"})
    examples: list[AnyExample]  # the limits of one /adapt job's examples, checked by the service


class _InitRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: StrictStr = Field(max_length=256, json_schema_extra={"pattern": f"^{NAME_PATTERN.pattern}$"})
    tasks: list[FamilyTask]
    # Also register each task's adapter (K steps from the final init on its examples) as an adapter version
    # named after the task.
    register_task_adapters: StrictBool = False

    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in FAMILY_OPTIONS if getattr(self, k) is not None}


# POST /v1/inits: one field per option of adapters/adapt_options.py FAMILY_OPTIONS, bounded as there.
InitRequest = create_model("InitRequest", __base__=_InitRequestBase, __module__=__name__,
                           **{name: _option_field(spec) for name, spec in FAMILY_OPTIONS.items()})


class InferenceRouting(BaseModel):
    """What the gateway reads of an OpenAI inference body (/v1/completions, /v1/chat/completions): where it
    goes and whether it streams. Every other field (n, logprobs, stop, seed, response_format, guided decoding,
    ...) is vLLM's to read: the body is forwarded as sent, apart from `model` and `adapter`."""

    model_config = ConfigDict(extra="allow")

    model: StrictStr | None = None  # the base model (or left out), or an adapter: 'name' or 'name@v2'
    adapter: StrictStr | None = None  # an adapter, with `model` the base model, left out, or the same adapter
    stream: StrictBool | None = None


def _inference_openapi(fields: dict[str, Any]) -> dict[str, Any]:
    """Documents (and lets schema-driven tools generate) an inference body without validating it: any other
    OpenAI/vLLM field is allowed too."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object",
        "additionalProperties": True,
        "properties": {
            "model": {"type": "string", "description": "the base model (or leave it out), or an adapter: 'name'"
                                                       " or 'name@v2'"},
            "adapter": {"type": "string", "description": "an adapter, with model the base model, left out, or"
                                                         " the same adapter"},
            **fields,
            "max_tokens": {"type": "integer"},
            "temperature": {"type": "number"},
            "stream": {"type": "boolean"},
        },
    }}}}}


COMPLETION_REQUEST_OPENAPI = _inference_openapi({
    "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
})
CHAT_REQUEST_OPENAPI = _inference_openapi({
    "messages": {"type": "array", "items": {"type": "object", "additionalProperties": True, "properties": {
        "role": {"type": "string"}, "content": {"type": "string"}}}},
})


class JobResponse(BaseModel):
    id: str
    object: Literal["adapt.job"] = "adapt.job"
    kind: str = "adapt"  # adapters.records.JobKind: "init" for POST /v1/inits (adapter, version, model: the init)
    adapter: str
    version: int
    model: str  # what to pass as `model` to /v1/completions once it succeeded: "name@vN"
    status: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    step: int
    total_steps: int
    loss: float | None = None
    error: str | None = None
    error_code: str | None = None  # adapters.records.JobErrorCode: why it failed, or who cancelled it
    estimated_finish: float | None = None  # while running: when the last step should end (unix time)
    num_examples: int
    attempts: int
    options: dict[str, Any]
    metrics: dict[str, Any]

    @classmethod
    def from_job(cls, job: Job, **extra: Any) -> "JobResponse":
        return cls(
            id=job.id, adapter=job.adapter, version=job.version, model=version_label(job.adapter, job.version),
            status=job.status.value, created_at=job.created_at, started_at=job.started_at,
            finished_at=job.finished_at, step=job.step, total_steps=job.total_steps, loss=job.loss,
            error=job.error, error_code=job.error_code, estimated_finish=job.estimated_finish,
            num_examples=job.num_examples, attempts=job.attempts, options=dict(job.options),
            metrics=dict(job.metrics), kind=job.kind.value, **extra,
        )


class SubmittedJobResponse(JobResponse):
    """POST /adapt's answer: `idempotent_replay` when it is the job an earlier identical request (or the same
    Idempotency-Key) created, returned instead of training again."""

    idempotent_replay: bool = False


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobResponse]
    has_more: bool  # older jobs match too: pass the last id as `after`

    @classmethod
    def from_page(cls, page: JobPage) -> "JobList":
        return cls(data=[JobResponse.from_job(j) for j in page.jobs], has_more=page.has_more)


class JobEventResponse(BaseModel):
    id: int  # counts from 1 per job: `after` / Last-Event-ID resume from it
    object: Literal["adapt.job.event"] = "adapt.job.event"
    job_id: str
    created_at: float
    level: str
    type: str  # adapters.records.JobEventType
    message: str
    data: dict[str, Any]

    @classmethod
    def from_event(cls, event: JobEvent) -> "JobEventResponse":
        return cls(id=event.id, job_id=event.job_id, created_at=event.created_at, level=event.level,
                   type=event.type, message=event.message, data=dict(event.data))

    def sse(self) -> str:
        """One Server-Sent Events frame: the id to resume from, the type as the SSE event name, JSON data."""
        return f"id: {self.id}\nevent: {self.type}\ndata: {self.model_dump_json()}\n\n"


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventResponse]  # oldest first
    has_more: bool  # newer events exist: pass the last id as `after`


class VersionResponse(BaseModel):
    version: int
    model: str  # "name@vN"
    status: str
    job_id: str
    num_examples: int
    created_at: float
    ready_at: float | None = None
    error: str | None = None
    metrics: dict[str, Any]

    @classmethod
    def from_version(cls, v: AdapterVersion) -> "VersionResponse":
        return cls(version=v.version, model=version_label(v.adapter, v.version), status=v.status.value,
                   job_id=v.job_id, num_examples=v.num_examples, created_at=v.created_at, ready_at=v.ready_at,
                   error=v.error, metrics=dict(v.metrics))


class AdapterResponse(BaseModel):
    name: str
    object: Literal["adapter"] = "adapter"
    created_at: float
    # Newest ready version ("name" in /v1/completions resolves to it), or None while none is ready.
    ready_version: int | None
    latest_version: int | None
    status: str | None  # status of the latest version
    versions: list[VersionResponse]

    @classmethod
    def from_adapter(cls, adapter: Adapter) -> "AdapterResponse":
        ready = adapter.newest_ready
        latest = adapter.versions[-1] if adapter.versions else None
        return cls(name=adapter.name, created_at=adapter.created_at,
                   ready_version=ready.version if ready else None,
                   latest_version=latest.version if latest else None,
                   status=latest.status.value if latest else None,
                   versions=[VersionResponse.from_version(v) for v in adapter.versions])


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterResponse]


class DeleteAdapterResponse(BaseModel):
    name: str
    object: Literal["adapter.deleted"] = "adapter.deleted"
    deleted: bool = True
    versions: list[int]


class InitResponse(AdapterResponse):
    """An init (POST /v1/inits) and its versions: immutable, versioned like an adapter, never served itself."""

    object: Literal["init"] = "init"  # type: ignore[assignment]

    @classmethod
    def from_init(cls, init: Adapter) -> "InitResponse":
        return cls(**AdapterResponse.from_adapter(init).model_dump(exclude={"object"}))


class InitList(BaseModel):
    object: Literal["list"] = "list"
    data: list[InitResponse]


class DeleteInitResponse(BaseModel):
    name: str
    object: Literal["init.deleted"] = "init.deleted"
    deleted: bool = True
    versions: list[int]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]

    @classmethod
    def from_adapters(cls, base_name: str, adapters: list[Adapter], base_created: int) -> "ModelList":
        cards = [ModelCard(id=base_name, created=base_created, owned_by="metalora", root=base_name)]
        for adapter in adapters:
            ready = [v for v in adapter.versions if v.status.value == "ready"]
            if not ready:
                continue
            newest = ready[-1]
            cards.append(ModelCard(id=adapter.name, created=int(newest.ready_at or newest.created_at),
                                   owned_by=adapter.tenant, root=base_name, parent=base_name))
            for v in ready:
                cards.append(ModelCard(id=version_label(adapter.name, v.version),
                                       created=int(v.ready_at or v.created_at), owned_by=adapter.tenant,
                                       root=base_name, parent=base_name))
        return cls(data=cards)


class UpstreamHealth(BaseModel):
    url: str
    healthy: bool
    last_error: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    store: str
    upstreams: list[UpstreamHealth]
