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
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
T = TypeVar("T")


@dataclass
class WorkerProcess:
    settings: Settings
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def assert_alive(self) -> None:
        assert self.alive(), f"worker exited with {self.proc.returncode}:\n{self.log_tail()}"

    def stop(self) -> int:
        """SIGTERM, as an orchestrator would; kill the group only if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
                raise AssertionError(f"worker ignored SIGTERM for {STOP_TIMEOUT_S} s:\n{self.log_tail()}") from None
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, with no chance to commit or flush."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


# Settings every worker needs to join the test's servers, topics and consumer group.
BASE_ENV_FIELDS = ("env", "kafka_bootstrap", "database_url", "redis_url", "data_dir", "topic_prefix", "app_id",
                   "worker_id")


def worker_env(settings: Settings, fields: Sequence[str] = ()) -> dict[str, str]:
    """The environment `fintide worker` reads: the test's settings named by BASE_ENV_FIELDS
    and `fields`, nothing inherited from the caller's FINTIDE_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINTIDE_")}
    for name in (*BASE_ENV_FIELDS, *fields):
        env[f"FINTIDE_{name.upper()}"] = str(getattr(settings, name))
    env.update({"FINTIDE_WORKER_WEB_PORT": "0", "FINTIDE_LOG_LEVEL": "INFO"})
    return env


def spawn_worker(settings: Settings, agents: Sequence[str], env_fields: Sequence[str] = ()) -> WorkerProcess:
    """The worker child process, started in its own session (so a kill takes its children)."""
    log_path = Path(settings.data_dir) / f"{settings.worker_id}-{time.monotonic_ns()}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    web_url_path(settings).unlink(missing_ok=True)  # a stopped worker's URL is not this one's
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streams.worker", "--agents", ",".join(agents)],
                                cwd=REPO, env=worker_env(settings, env_fields), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return WorkerProcess(settings, proc, log_path)


async def start_worker(settings: Settings, agents: Sequence[str] = ("agents.ops",),
                       ready: Callable[[WorkerProcess], Awaitable[Any]] | None = None, *,
                       env_fields: Sequence[str] = (), timeout_s: float = START_TIMEOUT_S) -> WorkerProcess:
    """Start a worker running `agents`; wait for its web URL and then for `ready` (default:
    it holds partitions of some table or topic)."""
    worker = spawn_worker(settings, agents, env_fields)
    try:
        worker.url = await wait_for(lambda: _read_url(worker), timeout_s, "the worker's web.url")
        await wait_for(lambda: (ready or _holds_partitions)(worker), timeout_s, "worker ready")
    except BaseException:
        worker.kill()
        raise
    return worker


async def _read_url(worker: WorkerProcess) -> str | None:
    worker.assert_alive()
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
        await asyncio.sleep(0.1)


async def get_json(url: str) -> Any:
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            response = await client.get(url)
        except httpx.TransportError:
            return None
    return response.json() if response.status_code == 200 else None


async def metric(worker: WorkerProcess, name: str, labels: dict[str, str]) -> float:
    """One sample of the worker's /metrics (0.0 when the series does not exist yet)."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(worker.url + "/metrics")).text
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        if not labels and line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            if set(series[len(name):].strip("{}").split(",")) == wanted:
                return float(value)
    return 0.0
