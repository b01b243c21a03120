"""Who is calling: the ONE place a request gets its tenant.

With authentication required (METALORA_AUTH), the tenant is the one the caller's API key is bound to
(server/auth.py); with it off, every caller is `DEFAULT_TENANT` (when auto mode turns it on, or refuses a
caller, is in server/auth.py). Every store call takes the tenant, and stores answer "not found" for another
tenant's adapters and jobs, so other tenants' adapters are 404, never 403. The vLLM-side adapter name is derived
from this tenant only (adapters.names.vllm_name), never from anything in the request body.
"""
from __future__ import annotations

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# Declares the scheme in the OpenAPI schema (clients and the fuzzer see it); parsing and checking happen in
# Authenticator so every failure gets the one error shape, not FastAPI's default 403.
_bearer = HTTPBearer(auto_error=False, description="an API key from `metalora keys create`")


async def current_tenant(
    request: Request, _credentials: HTTPAuthorizationCredentials | None = Security(_bearer),
) -> str:
    return await request.app.state.auth.tenant_for(request.headers.get("authorization"), request.headers)
