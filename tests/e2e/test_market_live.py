"""`fintide up` with its default feed, as a new user sees it: the real pipeline (simulator
feed -> Kafka -> market worker -> Redis -> API WebSocket) delivers bars and, within a
minute, signals to a client that just registered."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from ops.embedded import free_port
from ops.settings import Settings

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 150.0
# The brief's bound: a new user sees a bar and a signal within a minute of subscribing.
LIVE_TIMEOUT_S = 60.0
DEFAULT_SYMBOLS = Settings().feed_symbols.split(",")


class Up:
    """`fintide up` in a child process, with the defaults a user gets (feed included)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.api_port = free_port()
        self.output_path = data_dir.parent / f"up-{self.api_port}.out"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FINTIDE_")}
        env |= {"FINTIDE_WORKER_WEB_PORT": "0"}
        with open(self.output_path, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "--data-dir", str(self.data_dir), "up",
                                          "--api-port", str(self.api_port)],
                                         env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "Fintide is up." not in self.output():
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, f"not up after {READY_TIMEOUT_S} s:\n{self.output()}"
            time.sleep(0.5)

    def output(self) -> str:
        return self.output_path.read_text() if self.output_path.exists() else ""

    def logs(self, name: str) -> str:
        path = self.data_dir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-30:]) if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    platform = Up(tmp_path / "data")
    platform.start()
    try:
        yield platform
    finally:
        platform.stop()


async def _new_user(api: str) -> str:
    email = f"trader-{uuid.uuid4().hex[:10]}@example.com"
    async with httpx.AsyncClient(base_url=api, timeout=20) as client:
        created = await client.post("/api/v1/auth/register", json={"email": email, "password": "Correct-Horse-42"})
        assert created.status_code == 201, created.text
        login = await client.post("/api/v1/auth/login", json={"email": email, "password": "Correct-Horse-42"})
        assert login.status_code == 200, login.text
        return str(login.json()["access_token"])


async def _subscribe_when_known(ws: ClientConnection, symbols: list[str], deadline: float) -> set[str]:
    """The first ticks take a moment to reach the worker: until then symbols are unknown.
    Returns the symbols whose snapshot arrived meanwhile."""
    snapshots: set[str] = set()
    while True:
        await ws.send(json.dumps({"op": "subscribe", "symbols": symbols}))
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
            if message["type"] == "snapshot":
                snapshots.add(message["symbol"])
            if message["type"] in ("ack", "error"):
                break
        if message["type"] == "ack" and sorted(message["subscriptions"]) == sorted(symbols):
            return snapshots
        assert time.monotonic() < deadline, f"symbols never became known: {message}"
        await asyncio.sleep(1.0)


async def _watch(api_port: int, token: str) -> dict[str, Any]:
    deadline = time.monotonic() + LIVE_TIMEOUT_S + 30  # + the time the first ticks take to arrive
    async with connect(f"ws://127.0.0.1:{api_port}/ws/signals/stream?token={token}", open_timeout=20) as ws:
        snapshots = await _subscribe_when_known(ws, DEFAULT_SYMBOLS, deadline)
        subscribed_at = time.monotonic()
        seen: dict[str, Any] = {"snapshots": snapshots, "bars": [], "signal": None, "heartbeat": None}
        while (seen["signal"] is None or not seen["bars"] or seen["heartbeat"] is None
               or len(snapshots) < len(DEFAULT_SYMBOLS)):
            remaining = subscribed_at + LIVE_TIMEOUT_S - time.monotonic()
            assert remaining > 0, f"within {LIVE_TIMEOUT_S} s: {len(seen['bars'])} bar updates, signal {seen['signal']}"
            message = json.loads(await asyncio.wait_for(ws.recv(), remaining))
            if message["type"] == "bars":
                seen["bars"].append(message)
            elif message["type"] == "signal":
                seen["signal"] = message
            elif message["type"] == "snapshot":
                snapshots.add(message["symbol"])
            elif message["type"] == "heartbeat":
                seen["heartbeat"] = message
        return seen


def test_a_new_user_sees_bars_and_a_signal_over_the_websocket_within_a_minute(up: Up) -> None:
    api = f"http://127.0.0.1:{up.api_port}"
    token = asyncio.run(_new_user(api))
    try:
        seen = asyncio.run(_watch(up.api_port, token))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nworker:\n{up.logs('worker')}\nfeed:\n{up.logs('feed')}") from exc
    assert seen["snapshots"] == set(DEFAULT_SYMBOLS)
    bar = seen["bars"][0]
    assert bar["symbol"] in DEFAULT_SYMBOLS and bar["bars"] and bar["seq"] > 0
    signal_update = seen["signal"]["signal"]
    assert signal_update["action"] in ("buy", "sell") and 0.0 <= signal_update["confidence"] <= 1.0
    assert set(seen["heartbeat"]["seq"]) == set(DEFAULT_SYMBOLS)
    # The REST view of the same signal: live from the cache, then in history once persisted.
    symbol = signal_update["symbol"]
    with httpx.Client(base_url=api, timeout=20, headers={"Authorization": f"Bearer {token}"}) as client:
        live = client.get("/api/v1/signals/live", params={"symbols": symbol}).json()
        assert live["signals"][0]["signal"]["signal_ts_ms"] >= signal_update["signal_ts_ms"]
        deadline = time.monotonic() + 30
        while signal_update["signal_id"] not in {s["signal_id"] for s in client.get(
                "/api/v1/signals/history", params={"symbol": symbol, "limit": 500}).json()["signals"]}:
            assert time.monotonic() < deadline, "the signal never reached PostgreSQL"
            time.sleep(0.5)
