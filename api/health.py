"""Liveness and readiness: /health says the process runs, /ready that it can serve."""

from __future__ import annotations

import msgspec
from litestar import Response, get

from api.resources import DependencyStatus, Resources


class Health(msgspec.Struct, frozen=True):
    status: str


class Readiness(msgspec.Struct, frozen=True):
    status: str
    dependencies: list[DependencyStatus]


@get("/health", tags=["ops"], summary="Liveness", exclude_from_auth=True, sync_to_thread=False)
def health() -> Health:
    return Health(status="ok")


@get("/ready", tags=["ops"], summary="Readiness: Kafka, PostgreSQL and Redis reachable",
     exclude_from_auth=True)
async def ready(resources: Resources) -> Response[Readiness]:
    statuses = await resources.check()
    ok = all(s.ok for s in statuses)
    return Response(Readiness("ready" if ok else "unavailable", statuses), status_code=200 if ok else 503)
