"""The contract other services code against: AuthUser, guards, register_and_login, WS auth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.app import create_app
from ops.settings import Settings
from tests.helpers.auth import register_and_login


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield client


async def test_register_and_login_gives_a_working_bearer_header(client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(client)
    response = await client.get("/api/v1/users/me", headers=me.headers)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == str(me.user_id)
    assert response.json()["roles"] == ["user"]


async def test_register_and_login_grants_customer_and_staff_roles(client: AsyncTestClient[Litestar]) -> None:
    trader = await register_and_login(client, roles=("trader",))
    support = await register_and_login(client, roles=("support",))
    trader_me = (await client.get("/api/v1/users/me", headers=trader.headers)).json()
    support_me = (await client.get("/api/v1/users/me", headers=support.headers)).json()
    assert trader_me["roles"] == ["trader", "user"] and trader_me["kind"] == "customer"
    assert support_me["roles"] == ["support", "user"] and support_me["kind"] == "platform"


# --- a probe router, mounted through API_MODULES, exercising the guards and the WS helper ---

from typing import Any  # noqa: E402

from litestar import Request, Router, WebSocket, get, websocket  # noqa: E402
from litestar.exceptions import WebSocketDisconnect  # noqa: E402

import api.app  # noqa: E402
from api.auth import AuthUser, requires_roles  # noqa: E402
from api.ws_auth import authenticate_websocket  # noqa: E402


@get("/probe/trader", guards=[requires_roles("trader")], sync_to_thread=False)
def trader_only(request: Request[AuthUser, Any, Any]) -> dict[str, Any]:
    return {"id": str(request.user.id), "roles": sorted(request.user.roles)}


@websocket("/probe/ws")
async def ws_probe(socket: WebSocket[Any, Any, Any]) -> None:
    user = await authenticate_websocket(socket)
    await socket.accept()
    await socket.send_json({"id": str(user.id), "same_as_scope": socket.user == user})
    await socket.close()


@websocket("/probe/ws/hold")
async def ws_hold(socket: WebSocket[Any, Any, Any]) -> None:
    await socket.accept()
    await socket.send_text("open")
    await socket.receive_text()  # held open until the client says so
    await socket.close()


router = Router(path="/", route_handlers=[trader_only, ws_probe, ws_hold])


@pytest.fixture
async def probe_client(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AsyncTestClient[Litestar]]:
    monkeypatch.setattr(api.app, "API_MODULES", [*api.app.API_MODULES, __name__])
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield client


async def test_requires_roles_lets_the_role_and_admin_through_and_refuses_others(
        probe_client: AsyncTestClient[Litestar]) -> None:
    plain = await register_and_login(probe_client)
    trader = await register_and_login(probe_client, roles=("trader",))
    admin = await register_and_login(probe_client, roles=("admin",))
    assert (await probe_client.get("/probe/trader", headers=plain.headers)).status_code == 403
    assert (await probe_client.get("/probe/trader", headers=trader.headers)).json()["id"] == str(trader.user_id)
    assert (await probe_client.get("/probe/trader", headers=admin.headers)).status_code == 200
    assert (await probe_client.get("/probe/trader")).status_code == 401


async def test_websocket_accepts_a_query_or_cookie_token(probe_client: AsyncTestClient[Litestar]) -> None:
    me = await register_and_login(probe_client)
    with await probe_client.websocket_connect(f"/probe/ws?token={me.access_token}") as ws:
        assert ws.receive_json() == {"id": str(me.user_id), "same_as_scope": True}
    with await probe_client.websocket_connect("/probe/ws", cookies={"access_token": me.access_token}) as ws:
        assert ws.receive_json()["id"] == str(me.user_id)


async def test_open_websocket_connections_are_a_metric_per_route(probe_client: AsyncTestClient[Litestar]) -> None:
    async def open_now() -> float:
        text = (await probe_client.get("/metrics")).text
        line = next((x for x in text.splitlines() if x.startswith('fintide_ws_clients{path="/probe/ws/hold"}')), "")
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    with await probe_client.websocket_connect("/probe/ws/hold") as ws:
        assert ws.receive_text() == "open"
        assert await open_now() == 1.0
        ws.send_text("bye")
    for _ in range(50):  # the handler's end runs on the app's side of the test transport
        if await open_now() == 0.0:
            break
        await asyncio.sleep(0.05)
    assert await open_now() == 0.0


async def test_websocket_without_a_valid_token_closes_with_4401(probe_client: AsyncTestClient[Litestar]) -> None:
    for url in ("/probe/ws", "/probe/ws?token=not-a-jwt"):
        with pytest.raises(WebSocketDisconnect) as closed:
            with await probe_client.websocket_connect(url) as ws:
                ws.receive_json()
        assert closed.value.code == 4401
        assert "unauthorized" in closed.value.detail


async def test_websocket_handshakes_are_rate_limited_per_user_with_4429(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = msgspec.structs.replace(settings, rate_limit_ws_per_minute=3)
    monkeypatch.setattr(api.app, "API_MODULES", [*api.app.API_MODULES, __name__])
    async with AsyncTestClient(app=create_app(settings)) as client:
        alice, bob = await register_and_login(client), await register_and_login(client)
        for _ in range(3):
            with await client.websocket_connect(f"/probe/ws?token={alice.access_token}") as ws:
                assert ws.receive_json()["id"] == str(alice.user_id)
        with pytest.raises(WebSocketDisconnect) as closed:
            with await client.websocket_connect(f"/probe/ws?token={alice.access_token}") as ws:
                ws.receive_json()
        assert closed.value.code == 4429
        assert 1 <= int(closed.value.detail.removeprefix("rate-limited: retry after ").removesuffix(" s")) <= 60
        with await client.websocket_connect(f"/probe/ws?token={bob.access_token}") as ws:  # not shared
            assert ws.receive_json()["id"] == str(bob.user_id)


async def test_failed_websocket_authentications_are_limited_per_ip_at_the_auth_rate(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = msgspec.structs.replace(settings, rate_limit_auth_per_minute=2)
    monkeypatch.setattr(api.app, "API_MODULES", [*api.app.API_MODULES, __name__])
    async with AsyncTestClient(app=create_app(settings)) as client:
        codes = []
        for _ in range(3):
            with pytest.raises(WebSocketDisconnect) as closed:
                with await client.websocket_connect("/probe/ws?token=guess") as ws:
                    ws.receive_json()
            codes.append(closed.value.code)
        assert codes == [4401, 4401, 4429]
