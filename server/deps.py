"""The dependencies routes take, as `Annotated` aliases: a route names what it needs by type
(`tenant: TenantDep, gw: GatewayDep`) and FastAPI resolves it here."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.services import Gateway
from server.tenancy import current_tenant


async def get_gateway(request: Request) -> Gateway:
    # async, so that FastAPI calls it on the event loop: a plain `def` dependency costs every request a hop
    # through the thread pool, on the proxy's hot path.
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
# The caller's tenant (server/tenancy.py): every tenant-scoped route takes it.
TenantDep = Annotated[str, Depends(current_tenant)]
