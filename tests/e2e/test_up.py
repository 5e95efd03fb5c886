"""`fintide up` as a user runs it: a subprocess that becomes ready, survives a crashed child,
keeps PostgreSQL data across restarts, and leaves no process behind when stopped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from ops.embedded import free_port

pytestmark = pytest.mark.slow
READY_TIMEOUT_S = 150.0


class Platform:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.api_port = free_port()
        self.proc: subprocess.Popen[str] | None = None
        self.output_path = data_dir.parent / f"up-{self.api_port}.out"

    def start(self) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FINTIDE_")}
        env |= {"FINTIDE_WORKER_WEB_PORT": "0", "FINTIDE_FEED_TICKS_PER_S": "50",
                "FINTIDE_ADMIN_EMAIL": "root@fintide.test", "FINTIDE_ADMIN_PASSWORD": "Adm1n-Passw0rd!x"}
        out = open(self.output_path, "w")  # noqa: SIM115 - the subprocess writes it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "--data-dir", str(self.data_dir), "up",
             "--api-port", str(self.api_port)], env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        return self.wait_ready()

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.output()
            if "Fintide is up." in self.output():
                return json.loads((self.data_dir / "run.json").read_text())
            time.sleep(0.5)
        raise AssertionError(f"not up after {READY_TIMEOUT_S} s:\n{self.output()}")

    def output(self) -> str:
        return self.output_path.read_text() if self.output_path.exists() else ""

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}{path}", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")
        except OSError:
            return 0, {}

    def descendants(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    p = Platform(tmp_path / "data")
    yield p
    if p.proc and p.proc.poll() is None:
        p.proc.kill()


def _wait_gone(processes: list[psutil.Process], timeout_s: float = 20.0) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return alive


def test_up_becomes_ready_prints_urls_and_stops_cleanly_on_sigterm(platform: Platform):
    state = platform.start()
    status, ready = platform.get("/ready")
    assert status == 200 and ready["status"] == "ready"
    assert {d["name"] for d in ready["dependencies"] if d["ok"]} == {"kafka", "postgres", "redis"}
    out = platform.output()
    for label in ("API", "Docs", "Ops", "Metrics"):
        assert f"  {label}" in out
    with urllib.request.urlopen(state["urls"]["ops"], timeout=5) as r:
        assert r.status == 200
    children = platform.descendants()
    assert len(children) >= 5  # postgres (+ its workers), redis, tansu, worker, api
    assert platform.stop() == 0
    assert _wait_gone(children) == []
    assert not (platform.data_dir / "run.json").exists()


def test_up_restarts_a_crashed_api_and_logs_it(platform: Platform):
    state = platform.start()
    api_pid = state["children"]["api"]
    os.kill(api_pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status, _ = platform.get("/health")
        new_state = json.loads((platform.data_dir / "run.json").read_text())
        if status == 200 and new_state["children"]["api"] != api_pid:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the API was not restarted")
    out = platform.output()
    assert "api exited with code -9" in out and "restarted api" in out
    assert platform.stop() == 0


def test_a_second_up_keeps_postgres_data_and_status_reports_ready(platform: Platform):
    state = platform.start()
    asyncio.run(_sql(state, "CREATE TABLE public.kept AS SELECT 7 AS v"))
    assert platform.stop() == 0
    second = Platform(platform.data_dir)
    try:
        state = second.start()
        assert asyncio.run(_sql(state, "SELECT v FROM public.kept")) == 7
        out = subprocess.run([sys.executable, "-m", "ops.cli", "--data-dir", str(platform.data_dir),
                              "status"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "postgres" in out.stdout and "DOWN" not in out.stdout
    finally:
        assert second.stop() == 0
    out = subprocess.run([sys.executable, "-m", "ops.cli", "--data-dir", str(platform.data_dir), "status"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "not running" in out.stdout


async def _sql(state: dict, sql: str) -> object:
    import asyncpg

    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{state['servers']['postgres']}/fintide")
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()

