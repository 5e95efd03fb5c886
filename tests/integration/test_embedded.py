"""The embedded servers on their own: clear errors, restarts that keep PostgreSQL data."""

import asyncio
import socket
import sys
from pathlib import Path

import asyncpg
import pytest

from ops.embedded import EmbeddedServerError, EmbeddedStack, ServerProcess, claim_port


def test_a_taken_port_is_a_clear_error_naming_the_setting():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(EmbeddedServerError, match="FINTIDE_REDIS_PORT"):
            claim_port(port, "Redis", "FINTIDE_REDIS_PORT")


def test_a_missing_binary_is_a_clear_error(tmp_path: Path):
    server = ServerProcess("ghost", [str(tmp_path / "nope")], 1, tmp_path / "ghost.log")
    with pytest.raises(EmbeddedServerError, match="binary not found"):
        server.start()


def test_a_server_that_dies_while_starting_reports_its_log(tmp_path: Path):
    server = ServerProcess("falls-over", ["/bin/sh", "-c", "echo cannot start; exit 3"], 1,
                           tmp_path / "f.log")
    server.start()
    with pytest.raises(EmbeddedServerError, match="cannot start"):
        server.wait_ready(5)


def test_postgres_data_survives_a_stop_and_start(tmp_path: Path):
    async def write(url: str) -> None:
        conn = await asyncpg.connect(url)
        await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        await conn.close()

    async def read(url: str) -> int:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval("SELECT v FROM kept")
        finally:
            await conn.close()

    first = EmbeddedStack(tmp_path).start()
    try:
        asyncio.run(write(first.database_url))
    finally:
        first.stop()
    assert not any(s.alive() for s in first.servers)
    second = EmbeddedStack(tmp_path).start()
    try:
        assert asyncio.run(read(second.database_url)) == 42
    finally:
        second.stop()


def test_a_free_port_lost_to_another_process_is_retried_on_a_new_one(tmp_path: Path):
    from ops.embedded import _ready_or_retry, free_port

    def make(data_dir: Path, port: int) -> ServerProcess:
        port = port or free_port()
        argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
        return ServerProcess("http", argv, port, data_dir / "http.log")

    loser = ServerProcess("http", ["/bin/sh", "-c", "echo 'bind: Address already in use'; exit 1"], 1,
                          tmp_path / "loser.log")
    loser.start()
    winner = _ready_or_retry(loser, make, tmp_path, 0)
    try:
        assert winner is not loser and winner.alive()
    finally:
        winner.stop()


def test_a_fixed_port_that_fails_is_not_retried(tmp_path: Path):
    from ops.embedded import _ready_or_retry

    loser = ServerProcess("http", ["/bin/sh", "-c", "echo 'Address already in use'; exit 1"], 1,
                          tmp_path / "loser.log")
    loser.start()
    with pytest.raises(EmbeddedServerError, match="in use"):
        _ready_or_retry(loser, lambda d, p: loser, tmp_path, 6379)
