"""Adapters in and out: a version's PEFT files as one zip, and an uploaded PEFT LoRA registered as a new version.

An upload is checked in memory first (adapters/upload_check.py); only an accepted one is written, and in this
order, so a failure at any step leaves no version behind and nothing a client could resolve half-made:
1. allocate the version number (no record yet: the name still resolves to what it did before);
2. write the files under their final name through the artifact store's staging (atomic rename);
3. load them into every healthy vLLM replica (adapters/warmup.py): the first request is warm, and a replica
   that cannot load them rejects the upload before anyone could ask for it;
4. record the version, ready, with the tenant's adapter quota checked in the same transaction.
Steps 3 and 4 undo 2 (and 3) when they fail. The number from step 1 stays used: numbers are never reused.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import re
import uuid
from dataclasses import dataclass
from functools import cached_property

from fastapi import Request

from adapters.artifacts import ArtifactStore, open_artifacts, pack_peft
from adapters.base_model import base_model_path
from adapters.model_shapes import BaseModelShapes, UnsupportedBaseModel
from adapters.names import parse_ref, validate_name, version_label, vllm_name
from adapters.records import AdapterVersion, VersionStatus, now
from adapters.settings import Settings
from adapters.retention import prune
from adapters.store import MetadataStore, TenantQuota, check_bytes
from adapters.upload_check import UploadRejected, check_upload, unpack
from adapters.warmup import load_everywhere, unload_everywhere
from server.errors import InvalidRequest
from server.upstream import UpstreamPool

log = logging.getLogger("metalora.gateway")


UPLOAD_PATH = re.compile(r"/v1/adapters/[^/]+/versions/?")
# Multipart framing around the files: boundaries and part headers.
MULTIPART_SLACK_BYTES = 64 * 1024
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


# The body is parsed by read_upload, not modelled: document both shapes it takes.
UPLOAD_REQUEST_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "description": "adapter_config.json and adapter_model.safetensors as files (any"
                " field names), or one zip/tar archive of them",
                "additionalProperties": {"type": "string", "format": "binary"}}},
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
            "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


def body_limit(settings: Settings):
    """BodyLimitMiddleware's limit per request: uploads may be larger than any other body."""
    upload = settings.max_upload_bytes + MULTIPART_SLACK_BYTES

    def limit(scope) -> int:
        return upload if UPLOAD_PATH.fullmatch(scope.get("path", "")) else settings.max_body_bytes

    return limit


async def read_upload(request: Request) -> dict[str, bytes] | bytes:
    """The files of a multipart form (by file name; one archive file is returned as bytes), or the raw body
    (a zip or tar archive)."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=16, max_fields=16)
        files = {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):  # an UploadFile; plain fields are ignored
                files[value.filename or key] = await value.read()
        if len(files) == 1 and next(iter(files)).lower().endswith(ARCHIVE_SUFFIXES):
            return next(iter(files.values()))
        return files
    return await request.body()


@dataclass(frozen=True)
class Download:
    filename: str
    content: bytes


class AdapterFiles:
    def __init__(self, settings: Settings, store: MetadataStore, pool: UpstreamPool, base_model_name: str):
        self.settings = settings
        self.store = store
        self.pool = pool
        self.base_model_name = base_model_name
        self.quota = TenantQuota(max_adapters=settings.quota_max_adapters, max_bytes=settings.quota_max_stored_bytes)

    @cached_property
    def artifacts(self) -> ArtifactStore:
        return open_artifacts(self.settings)

    @cached_property
    def shapes(self) -> BaseModelShapes:
        return BaseModelShapes.from_model_dir(base_model_path(self.settings))

    async def download(self, tenant: str, name: str, version: int | None) -> Download:
        """`name` may pin a version (`name@v2`), as may `version`; both must agree. Default: newest ready."""
        ref = parse_ref(name)
        if ref.version is not None and version is not None and ref.version != version:
            raise InvalidRequest(f"{name!r} and version={version} name different versions", param="version",
                                 code="version_mismatch")
        found = await self.store.resolve(tenant, ref.name, ref.version or version)
        label = version_label(found.adapter, found.version)
        content = await asyncio.to_thread(pack_peft, self.artifacts, vllm_name(tenant, found.adapter, found.version),
                                          label, self.base_model_name)
        return Download(f"{label}.zip", content)

    async def upload(self, tenant: str, name: str, files: dict[str, bytes] | bytes) -> AdapterVersion:
        """`files`: the uploaded files by name, or one archive of them."""
        name = validate_name(name)
        try:
            shapes = self.shapes
        except UnsupportedBaseModel as exc:
            raise UploadRejected(f"uploads are not supported for this base model: {exc}",
                                 code="base_model_unsupported") from None
        limit = self.settings.max_upload_bytes
        checked = await asyncio.to_thread(self._check, files, shapes, limit)
        size = sum(len(content) for content in checked.files.values())
        # Before anything is written; add_version checks again in its transaction.
        check_bytes(self.quota, tenant, await self.store.tenant_usage(tenant), size)
        version = await self.store.allocate_version(tenant, name)
        served = vllm_name(tenant, name, version)
        await asyncio.to_thread(self._write, served, checked.files)
        try:
            healthy = [u.url for u in self.pool.healthy()]
            warm = await load_everywhere(self.pool.client, healthy, served, self.artifacts.serving_path(served))
            verdict = warm.rejected_by_engine()
            if verdict is not None:
                raise UploadRejected(f"the serving engine cannot load this adapter: {verdict}",
                                     code="adapter_not_loadable")
            record = AdapterVersion(tenant=tenant, adapter=name, version=version, num_examples=0,
                                    job_id=f"upload-{uuid.uuid4().hex[:20]}", status=VersionStatus.READY, ready_at=now(),
                                    metrics={**checked.summary, "warm": warm.to_dict()}, size_bytes=size)
            await self.store.add_version(record, self.quota)
        except BaseException:
            await self._undo(served)
            raise
        log.info("uploaded %s (%d bytes of weights; warm on %d/%d replicas)", served, checked.summary["weights_bytes"],
                 len(warm.loaded), warm.replicas)
        await prune(self.store, self.artifacts, tenant, name, self.settings.retain_versions,
                    functools.partial(unload_everywhere, self.pool.client, [u.url for u in self.pool.upstreams]))
        return record

    def _check(self, files: dict[str, bytes] | bytes, shapes: BaseModelShapes, limit: int):
        if isinstance(files, bytes):
            files = unpack(files, limit)
        return check_upload(files, shapes, self.settings, str(base_model_path(self.settings)))

    def _write(self, served: str, files: dict[str, bytes]) -> None:
        with self.artifacts.staging(served) as tmp:
            for filename, content in files.items():
                (tmp / filename).write_bytes(content)

    async def _undo(self, served: str) -> None:
        await unload_everywhere(self.pool.client, [u.url for u in self.pool.upstreams], served)
        await asyncio.to_thread(self.artifacts.delete, served)
