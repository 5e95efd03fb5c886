"""Faust workers as child processes, exactly as `fintide worker` runs them, for tests.

`start_worker(settings, agents=[...])` returns once the worker serves its web views and
holds partitions (its consumer-group join has completed); `stop()` sends SIGTERM as an
orchestrator would and fails the test if the worker ignores it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from ops.settings import Settings
from streams.worker import web_url_path

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 40.0
STOP_TIMEOUT_S = 20.0
T = TypeVar("T")


@dataclass
class WorkerProcess:
    settings: Settings
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        """SIGTERM, as an orchestrator would; kill the group only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                raise AssertionError(f"worker ignored SIGTERM for {STOP_TIMEOUT_S} s:\n{self.log_tail()}")
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, with no chance to commit or flush."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINTIDE_")}
    env.update({
        "FINTIDE_ENV": "test", "FINTIDE_LOG_LEVEL": "INFO",
        "FINTIDE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "FINTIDE_DATA_DIR": settings.data_dir,
        "FINTIDE_DATABASE_URL": settings.database_url, "FINTIDE_REDIS_URL": settings.redis_url,
        "FINTIDE_TOPIC_PREFIX": settings.topic_prefix, "FINTIDE_APP_ID": settings.app_id,
        "FINTIDE_WORKER_ID": settings.worker_id, "FINTIDE_WORKER_WEB_PORT": "0",
    })
    return env


async def start_worker(settings: Settings, agents: Sequence[str] = ("agents.ops",),
                       ready: Callable[[WorkerProcess], Awaitable[Any]] | None = None) -> WorkerProcess:
    """Start a worker running `agents`; wait for its web URL and then for `ready` (default:
    it holds partitions of some table or topic)."""
    log_path = Path(settings.data_dir) / f"{settings.worker_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streams.worker", "--agents", ",".join(agents)],
                                cwd=REPO, env=worker_env(settings), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    worker = WorkerProcess(settings, proc, log_path)
    try:
        worker.url = await wait_for(lambda: _read_url(worker), START_TIMEOUT_S, "web.url")
        await wait_for(lambda: (ready or _holds_partitions)(worker), START_TIMEOUT_S, "worker ready")
    except BaseException:
        worker.kill()
        raise
    return worker


async def _read_url(worker: WorkerProcess) -> str | None:
    assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}"
    path = web_url_path(worker.settings)
    return path.read_text().strip() if path.exists() else None


async def _holds_partitions(worker: WorkerProcess) -> bool:
    report = await get_json(worker.url + "/ops/")
    return bool(report and any(t["active_partitions"] for t in report.get("tables", [])))


async def wait_for(probe: Callable[[], Awaitable[T | None]], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.2)


async def get_json(url: str) -> Any:
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            response = await client.get(url)
        except httpx.TransportError:
            return None
    return response.json() if response.status_code == 200 else None
