"""All wire models of the gateway, and their conversions from the records in adapters/records.py.

Requests forbid unknown fields (a typo like "step" is a 400 naming the field, not silently ignored).
/v1/completions bodies are NOT modelled here: they are forwarded to vLLM untouched except for
`model`/`adapter`, so any OpenAI/vLLM sampling field keeps working.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, create_model, field_validator

from adapters.adapt_options import OPTIONS, OptionSpec
from adapters.names import NAME_PATTERN, version_label
from adapters.records import Adapter, AdapterVersion, Job


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(min_length=1)
    completion: StrictStr = Field(min_length=1)

    @field_validator("prompt", "completion")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        if "\x00" in value:
            raise ValueError("must not contain NUL characters")
        return value


class _AdaptRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Validated by adapters.names.validate_name in the service (one rule for the whole system); the pattern
    # here only documents that rule in the OpenAPI schema.
    adapter: StrictStr = Field(max_length=256, json_schema_extra={"pattern": f"^{NAME_PATTERN.pattern}$"})
    examples: list[Example]

    def options(self) -> dict[str, Any]:
        """The training options the client set; unset ones take the worker's defaults."""
        return {k: getattr(self, k) for k in OPTIONS if getattr(self, k) is not None}


def _option_field(spec: OptionSpec) -> tuple[Any, Any]:
    # No default here: an unset option takes the worker's, which a shipped shared init may set.
    bounds = {"gt" if spec.min_exclusive else "ge": spec.min, "lt" if spec.max_exclusive else "le": spec.max}
    return spec.type | None, Field(default=None, description=spec.doc, **bounds)


# One field per training option of adapters/adapt_options.py, bounded as there. The service also bounds `rank`
# by settings.vllm_max_lora_rank and `max_seq_len` by settings.vllm_max_model_len (what vLLM was started with).
AdaptRequest = create_model("AdaptRequest", __base__=_AdaptRequestBase, __module__=__name__,
                            **{name: _option_field(spec) for name, spec in OPTIONS.items()})


# Documents (and lets schema-driven tools generate) /v1/completions bodies without validating them: the route
# forwards the body untouched, so any other OpenAI/vLLM field is allowed too.
COMPLETION_REQUEST_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {
            "type": "object",
            "additionalProperties": True,
            "properties": {
                "model": {"type": "string", "description": "the base model, or an adapter: 'name' or 'name@v2'"},
                "adapter": {"type": "string", "description": "an adapter, with model = the base model"},
                "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                "max_tokens": {"type": "integer"},
                "temperature": {"type": "number"},
                "stream": {"type": "boolean"},
            },
        }}},
    },
}


class JobResponse(BaseModel):
    id: str
    object: Literal["adapt.job"] = "adapt.job"
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
    num_examples: int
    attempts: int
    options: dict[str, Any]
    metrics: dict[str, Any]

    @classmethod
    def from_job(cls, job: Job) -> "JobResponse":
        return cls(
            id=job.id, adapter=job.adapter, version=job.version, model=version_label(job.adapter, job.version),
            status=job.status.value, created_at=job.created_at, started_at=job.started_at,
            finished_at=job.finished_at, step=job.step, total_steps=job.total_steps, loss=job.loss,
            error=job.error, num_examples=job.num_examples, attempts=job.attempts, options=dict(job.options),
            metrics=dict(job.metrics),
        )


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
