"""The API's shared behaviour: health, readiness, metrics, problem+json, request ids."""

import gzip

import msgspec
import pytest
from litestar import post
from litestar.testing import AsyncTestClient

from api.app import create_app
from ops.embedded import free_port


@pytest.fixture
async def client(settings):
    async with AsyncTestClient(create_app(settings)) as c:
        yield c


async def test_health_is_ok_without_dependencies(client):
    r = await client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_ready_reports_each_dependency_with_latency(client):
    r = await client.get("/ready")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "ready"
    assert {d["name"] for d in body["dependencies"]} == {"kafka", "postgres", "redis"}
    assert all(d["ok"] and d["latency_ms"] >= 0 for d in body["dependencies"])


async def test_ready_is_503_and_names_the_dependency_that_is_down(settings):
    dead = msgspec.structs.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with AsyncTestClient(create_app(dead)) as c:
        r = await c.get("/ready")
    deps = {d["name"]: d for d in r.json()["dependencies"]}
    assert r.status_code == 503 and r.json()["status"] == "unavailable"
    assert not deps["redis"]["ok"] and deps["redis"]["error"]
    assert deps["postgres"]["ok"] and deps["kafka"]["ok"]


async def test_unknown_routes_are_problem_json_404(client):
    r = await client.get("/api/v1/nothing-here")
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"].endswith("/not-found") and body["status"] == 404 and body["instance"]


async def test_wrong_method_is_problem_json_405(client):
    r = await client.post("/health")
    assert r.status_code == 405 and r.json()["type"].endswith("/method-not-allowed")


async def test_a_request_id_is_echoed_or_generated(client):
    r = await client.get("/health", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await client.get("/health", headers={"x-request-id": "bad id\nwith newline"})
    assert r.headers["x-request-id"] != "bad id\nwith newline" and len(r.headers["x-request-id"]) == 32


async def test_metrics_are_prometheus_text_with_request_counts(client):
    await client.get("/health")
    r = await client.get("/metrics")
    assert r.status_code == 200 and "litestar_requests_total" in r.text


async def test_openapi_and_swagger_are_served(client):
    spec = (await client.get("/schema/openapi.json")).json()
    assert "/health" in spec["paths"] and "/ready" in spec["paths"]
    r = await client.get("/schema/swagger")
    assert r.status_code == 200 and "swagger" in r.text.lower()


class _Echo(msgspec.Struct):
    name: str
    count: int


@post("/echo", sync_to_thread=False, exclude_from_auth=True)
def _echo(data: _Echo) -> _Echo:
    return data


@post("/boom", sync_to_thread=False, exclude_from_auth=True)
def _boom() -> None:
    raise RuntimeError("secret internal detail")


@pytest.fixture
async def probe_client(settings):
    app = create_app(settings)
    app.register(_echo)
    app.register(_boom)
    async with AsyncTestClient(app) as c:
        yield c


async def test_invalid_body_is_422_with_field_errors(probe_client):
    r = await probe_client.post("/echo", json={"name": "x", "count": "many"})
    body = r.json()
    assert r.status_code == 422 and body["type"].endswith("/validation-error")
    assert any("count" in (e["field"] or "") or "count" in e["message"] for e in body["errors"])


async def test_malformed_json_is_a_client_error_not_500(probe_client):
    r = await probe_client.post("/echo", content=b"{not json", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_oversized_bodies_are_413(probe_client):
    r = await probe_client.post("/echo", content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                                headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["type"].endswith("/payload-too-large")


async def test_unexpected_errors_are_500_problems_that_leak_nothing(probe_client):
    r = await probe_client.post("/boom")
    assert r.status_code == 500 and "secret internal detail" not in r.text
    assert r.json()["type"].endswith("/internal-error") and r.json()["request_id"]


async def test_large_responses_are_gzipped(client):
    r = await client.get("/schema/openapi.json", headers={"accept-encoding": "gzip"})
    assert r.headers.get("content-encoding") == "gzip" or len(r.content) < 1024


async def test_cors_preflight_is_answered(client):
    r = await client.options("/health", headers={"origin": "https://app.example",
                                                 "access-control-request-method": "GET"})
    assert r.status_code in (200, 204) and r.headers.get("access-control-allow-origin")
