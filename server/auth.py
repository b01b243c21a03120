"""API-key authentication: `Authorization: Bearer <key>` -> the caller's tenant.

Used only by `server/tenancy.py: current_tenant`, the one dependency every tenant-scoped route takes. Keys
are looked up by their sha256 in the metadata store (adapters/api_keys.py); the plaintext is never stored
or logged. Failures are one typed error (401 + `WWW-Authenticate: Bearer`), whatever the reason, so a
caller cannot probe which keys exist.

METALORA_AUTH=auto on loopback runs open (every caller is the default tenant) only while that is safe: a
request relayed by a reverse proxy or tunnel on the same host (it carries Forwarded / X-Forwarded-For) comes
from anywhere, so it is refused; and from the moment any API key exists (created by `metalora keys create`
from another process, too) keys are required, for good: keys are revoked, never deleted, so a revoked one
still says auth was set up.
"""
from __future__ import annotations

import logging
from typing import Mapping

from adapters.api_keys import MAX_KEY_LENGTH, hash_key
from adapters.errors import AuthenticationFailed
from adapters.names import DEFAULT_TENANT
from adapters.store import MetadataStore

log = logging.getLogger("metalora.auth")

# Set by reverse proxies (RFC 7239, and the de facto one); a direct loopback caller does not send them.
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for")


class Authenticator:
    def __init__(self, store: MetadataStore, required: bool, open_until_keys: bool = False):
        """`open_until_keys`: METALORA_AUTH=auto where the settings alone leave it open (see the module doc);
        METALORA_AUTH=disabled is the operator's explicit choice and stays open whatever comes."""
        self.store = store
        self.required = required
        self.open_until_keys = open_until_keys and not required

    async def _required_now(self) -> bool:
        # One small query per request, only while open: a key created a moment ago must close the gateway.
        if not self.required and self.open_until_keys and await self.store.list_api_keys():
            self.required = True
            log.warning("an API key exists: authentication is required from now on (METALORA_AUTH=auto)")
        return self.required

    async def tenant_for(self, authorization: str | None, headers: Mapping[str, str] | None = None) -> str:
        """`headers`: the request's (case-insensitive), to tell a proxied request in auto mode."""
        if not await self._required_now():
            if self.open_until_keys and headers is not None and any(h in headers for h in FORWARDING_HEADERS):
                raise AuthenticationFailed(
                    "this gateway runs without authentication for local callers only (METALORA_AUTH=auto on"
                    " loopback) and refuses requests relayed by a proxy (Forwarded / X-Forwarded-For): set"
                    " METALORA_AUTH=required and create a key with `metalora keys create`",
                    code="proxied_request_refused")
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
