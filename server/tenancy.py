"""Who is calling: the ONE place a request gets its tenant.

Today every request belongs to `DEFAULT_TENANT`. Per-tenant API keys plug in here and nowhere else:
read `Authorization: Bearer <key>`, look the key up (through app.state, e.g. a key store on the backend),
return its tenant or raise an authentication error. Every store call already takes the tenant, and stores
answer "not found" for another tenant's adapters and jobs, so other tenants' adapters are 404, never 403.
"""
from __future__ import annotations

from fastapi import Request

from adapters.names import DEFAULT_TENANT


async def current_tenant(request: Request) -> str:
    return DEFAULT_TENANT
