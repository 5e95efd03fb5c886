"""The API on a real uvicorn server inside the test's event loop, so a test reaches it over
real HTTP and WebSocket connections and can still look at the app's resources."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn

from api.app import create_app
from ops.settings import Settings


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the served app; `client.app` is the app, `client.ws_url` its WebSocket base."""
    app = create_app(settings)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the API did not start"
        await asyncio.sleep(0.02)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, limits=limits) as client:
            client.app = app  # type: ignore[attr-defined]  # tests.helpers.auth reads app.state.settings
            client.ws_url = f"ws://127.0.0.1:{port}"  # type: ignore[attr-defined]
            yield client
    finally:
        server.should_exit = True
        await task
