"""Property-based fuzzing of the identity routes against the generated OpenAPI schema.

Schemathesis generates requests for every identity operation; each response must not be
a 5xx, must use a documented status and content type, and must match its schema. The app
runs on a real uvicorn server with real PostgreSQL and Redis; requests carry an admin's
token so guarded code paths are reached too. Bounded: MAX_EXAMPLES per operation.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import httpx
import hypothesis
import msgspec
import pytest
import schemathesis
import uvicorn
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from api.app import create_app
from ops.settings import Settings
from services.identity import create_admin

MAX_EXAMPLES = 12
IDENTITY_PATHS = r"^/api/v1/(auth|users|admin|identity|dev)/"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def base_url(settings: Settings) -> AsyncIterator[str]:
    # The fuzzer sends hundreds of requests a minute from one IP: lift the route limits
    # (the login throttle still answers 429, a documented response).
    unlimited = msgspec.structs.replace(settings, rate_limit_per_minute=100_000, rate_limit_auth_per_minute=100_000)
    server = uvicorn.Server(uvicorn.Config(create_app(unlimited), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        await task


def fuzz(base_url: str, token: str) -> list[str]:
    """Run every identity operation's strategy; return the failures (empty when clean)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/schema/openapi.json").include(path_regex=IDENTITY_PATHS)
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    for operation in operations:
        if operation.path.endswith("/logout"):
            continue  # it would end the fuzzer's own session; covered by test_identity_tokens

        @hypothesis.settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])
        @hypothesis.given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS,
                                   timeout=15)

        try:
            check()
        except Exception as exc:  # noqa: BLE001 - collect every operation's failure, report together
            failures.append(f"{operation.label}: {exc}"[:1500])
    return failures


async def test_identity_api_conforms_to_its_openapi_schema_under_fuzzing(base_url: str, settings: Settings) -> None:
    await create_admin(settings, "fuzz-admin@fintide.test", "Fuzzing-Passw0rd!")
    async with httpx.AsyncClient(base_url=base_url) as http:
        login = await http.post("/api/v1/auth/login", json={"email": "fuzz-admin@fintide.test",
                                                            "password": "Fuzzing-Passw0rd!"})
        assert login.status_code == 200
    failures = await asyncio.to_thread(fuzz, base_url, login.json()["access_token"])
    assert not failures, "\n\n".join(failures)
