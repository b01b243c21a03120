"""API-key authentication: `Authorization: Bearer <key>` -> the caller's tenant.

Used only by `server/tenancy.py: current_tenant`, the one dependency every tenant-scoped route takes. Keys
are looked up by their sha256 in the metadata store (adapters/api_keys.py); the plaintext is never stored
or logged. Failures are one typed error (401 + `WWW-Authenticate: Bearer`), whatever the reason, so a
caller cannot probe which keys exist.
"""
from __future__ import annotations

import logging

from adapters.api_keys import MAX_KEY_LENGTH, hash_key
from adapters.errors import AuthenticationFailed
from adapters.names import DEFAULT_TENANT
from adapters.store import MetadataStore

log = logging.getLogger("metalora.auth")


class Authenticator:
    def __init__(self, store: MetadataStore, required: bool):
        self.store = store
        self.required = required

    async def tenant_for(self, authorization: str | None) -> str:
        if not self.required:
            # Ignored rather than checked: OpenAI clients always send some key ("unused", "sk-..."), and an
            # open server must keep accepting them.
            return DEFAULT_TENANT
        if not authorization:
            raise AuthenticationFailed(
                "missing API key: send `Authorization: Bearer <key>` (create one with `metalora keys create`)",
                code="missing_api_key")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationFailed("the Authorization header must be `Bearer <key>`", code="invalid_api_key")
        if len(key) > MAX_KEY_LENGTH or not key.isascii():
            raise AuthenticationFailed("invalid or revoked API key", code="invalid_api_key")
        record = await self.store.api_key_by_hash(hash_key(key))
        if record is None:
            raise AuthenticationFailed("invalid or revoked API key", code="invalid_api_key")
        if not record.active:
            # The key id is safe to log and lets an operator find who still uses a revoked key.
            log.info("request with revoked API key %s (tenant %s)", record.id, record.tenant)
            raise AuthenticationFailed("invalid or revoked API key", code="invalid_api_key")
        return record.tenant
