"""HTTP routes. Each parses its input, calls ONE Gateway method and maps the result to a wire model.

Errors are raised as typed exceptions and turned into responses by the handlers in server/errors.py.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from adapters.records import Job, JobStatus
from server.deps import GatewayDep, TenantDep
from server.job_stream import sse_frames
from server.protocol import (
    CHAT_REQUEST_OPENAPI, COMPLETION_REQUEST_OPENAPI, AdapterList, AdapterResponse, AdaptRequest,
    DeleteAdapterResponse, HealthResponse,
    JobEventList, JobEventResponse, JobList, JobResponse, ModelList, SubmittedJobResponse,
)
from server.proxy import CHAT_COMPLETIONS, COMPLETIONS, ProxiedStream
from server.adapter_io import UPLOAD_REQUEST_OPENAPI, read_upload
from server.metrics import CONTENT_TYPE
from server.protocol import VersionResponse
from server.protocol import DeleteInitResponse, InitList, InitRequest, InitResponse

router = APIRouter()

MAX_WAIT_S = 3600.0

IdempotencyKey = Annotated[str | None, Header(
    description="the same key again (within METALORA_IDEMPOTENCY_WINDOW_S) returns the job it created")]


@router.post("/adapt", status_code=202, response_model=SubmittedJobResponse)
async def create_adapt_job(
    body: AdaptRequest,
    request: Request,
    response: Response,
    tenant: TenantDep,
    gw: GatewayDep,
    wait: bool = False,
    timeout: float = Query(default=300.0, ge=0.0, le=MAX_WAIT_S),
    idempotency_key: IdempotencyKey = None,
):
    job, replayed = await gw.submit_adapt(tenant, body, idempotency_key)
    if wait:
        job = await gw.wait_job(tenant, job.id, timeout, request.is_disconnected)
    return _submitted(response, job, replayed)


def _submitted(response: Response, job: Job, replayed: bool) -> SubmittedJobResponse:
    """The answer to a submitted job, adapt or init: where to follow it, and whether it is the job an earlier
    identical request (or the same Idempotency-Key) created; 200 once it has finished, else 202."""
    response.headers["Location"] = f"/adapt/{job.id}"
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if job.status.finished:
        response.status_code = 200
    return SubmittedJobResponse.from_job(job, idempotent_replay=replayed)


@router.get("/adapt", response_model=JobList)
async def list_adapt_jobs(
    tenant: TenantDep,
    gw: GatewayDep,
    limit: int = Query(default=20, ge=1, le=100),
    after: str | None = Query(default=None, description="a job id: list the jobs older than it"),
    adapter: str | None = None,
    status: JobStatus | None = None,
):
    return JobList.from_page(await gw.list_jobs(tenant, limit, after, adapter, status))


@router.post("/adapt/{job_id}/cancel", response_model=JobResponse)
async def cancel_adapt_job(job_id: str, tenant: TenantDep, gw: GatewayDep):
    return JobResponse.from_job(await gw.cancel_job(tenant, job_id))


@router.get("/adapt/{job_id}/events", response_model=JobEventList)
async def adapt_job_events(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    gw: GatewayDep,
    after: int = Query(default=0, ge=0, description="an event id: list the events after it"),
    limit: int = Query(default=100, ge=1, le=1000),
    stream: bool = Query(default=False, description="Server-Sent Events until the job ends"),
    last_event_id: Annotated[int | None, Header(ge=0)] = None,
):
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        # An EventSource reconnecting sends the last id it saw.
        batches = await gw.follow_job_events(tenant, job_id, max(after, last_event_id or 0))
        return StreamingResponse(sse_frames(batches), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    events, has_more = await gw.job_events(tenant, job_id, after, limit)
    return JobEventList(data=[JobEventResponse.from_event(e) for e in events], has_more=has_more)


@router.get("/adapt/{job_id}", response_model=JobResponse)
async def get_adapt_job(
    job_id: str,
    request: Request,
    tenant: TenantDep,
    gw: GatewayDep,
    wait: bool = False,
    timeout: float = Query(default=300.0, ge=0.0, le=MAX_WAIT_S),
):
    job = await (gw.wait_job(tenant, job_id, timeout, request.is_disconnected) if wait
                 else gw.get_job(tenant, job_id))
    return JobResponse.from_job(job)


@router.post("/v1/inits", status_code=202, response_model=SubmittedJobResponse)
async def create_init(body: InitRequest, response: Response, tenant: TenantDep, gw: GatewayDep,
                      idempotency_key: IdempotencyKey = None):
    """Queue the meta-training of an init family; follow it at /adapt/{job_id} like any job."""
    return _submitted(response, *await gw.submit_init(tenant, body, idempotency_key))


@router.get("/v1/inits", response_model=InitList)
async def list_inits(tenant: TenantDep, gw: GatewayDep):
    return InitList(data=[InitResponse.from_init(i) for i in await gw.list_inits(tenant)])


@router.get("/v1/inits/{name}", response_model=InitResponse)
async def get_init(name: str, tenant: TenantDep, gw: GatewayDep):
    return InitResponse.from_init(await gw.get_init(tenant, name))


@router.delete("/v1/inits/{name}", response_model=DeleteInitResponse)
async def delete_init(name: str, tenant: TenantDep, gw: GatewayDep):
    removed = await gw.delete_init(tenant, name)
    return DeleteInitResponse(name=name, versions=[v.version for v in removed])


@router.post(COMPLETIONS, openapi_extra=COMPLETION_REQUEST_OPENAPI)
async def completions(request: Request, tenant: TenantDep, gw: GatewayDep):
    return await _inference(request, tenant, gw, COMPLETIONS)


@router.post(CHAT_COMPLETIONS, openapi_extra=CHAT_REQUEST_OPENAPI)
async def chat_completions(request: Request, tenant: TenantDep, gw: GatewayDep):
    return await _inference(request, tenant, gw, CHAT_COMPLETIONS)


async def _inference(request: Request, tenant: str, gw, path: str) -> Response:
    # The body is forwarded, not modelled: every OpenAI/vLLM field reaches vLLM untouched.
    result = await gw.proxy(tenant, await request.body(), path)
    if isinstance(result, ProxiedStream):
        return StreamingResponse(result.chunks, media_type=result.media_type,
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return Response(result.body, status_code=result.status, media_type=result.media_type)


@router.get("/v1/models", response_model=ModelList)
async def list_models(tenant: TenantDep, gw: GatewayDep):
    return await gw.list_models(tenant)


@router.get("/v1/adapters", response_model=AdapterList)
async def list_adapters(tenant: TenantDep, gw: GatewayDep):
    return AdapterList(data=[AdapterResponse.from_adapter(a) for a in await gw.list_adapters(tenant)])


@router.get("/v1/adapters/{name}", response_model=AdapterResponse)
async def get_adapter(name: str, tenant: TenantDep, gw: GatewayDep):
    return AdapterResponse.from_adapter(await gw.get_adapter(tenant, name))


@router.delete("/v1/adapters/{name}", response_model=DeleteAdapterResponse)
async def delete_adapter(name: str, tenant: TenantDep, gw: GatewayDep):
    removed = await gw.delete_adapter(tenant, name)
    return DeleteAdapterResponse(name=name, versions=[v.version for v in removed])


@router.get("/v1/adapters/{name}/download", response_class=Response,
            responses={200: {"content": {"application/zip": {}}, "description": "the version's PEFT files, zipped"}})
async def download_adapter(name: str, tenant: TenantDep, gw: GatewayDep,
                           version: int | None = Query(default=None, ge=1)):
    """`name` (newest ready version), `name@v2`, or `name` with `?version=2`."""
    download = await gw.download_adapter(tenant, name, version)
    return Response(download.content, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{download.filename}"'})


@router.post("/v1/adapters/{name}/versions", status_code=201, response_model=VersionResponse,
             openapi_extra=UPLOAD_REQUEST_OPENAPI)
async def upload_adapter_version(name: str, request: Request, tenant: TenantDep, gw: GatewayDep):
    return VersionResponse.from_version(await gw.upload_version(tenant, name, await read_upload(request)))


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, gw: GatewayDep):
    return Response(await gw.metrics_page(request.headers.get("authorization")), media_type=CONTENT_TYPE)


@router.get("/health", response_model=HealthResponse)
async def health(gw: GatewayDep):
    result = await gw.health()
    body = HealthResponse(status="ok" if result.ok else "degraded", store=result.store, upstreams=result.upstreams)
    return JSONResponse(body.model_dump(), status_code=200 if result.ok else 503)
