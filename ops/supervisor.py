"""`fintide up`: the whole platform on one machine, supervised.

Starts the embedded servers (unless external ones are configured), migrates, then runs the
Faust worker, the API and the feed as child processes. A child that dies is restarted with
backoff and the event is logged; one that keeps dying stops the platform. SIGINT/SIGTERM
stop the children first, then the servers, leaving no process behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ops.embedded import EmbeddedStack, claim_port, die_with_parent, free_port
from ops.settings import Settings

log = logging.getLogger("fintide.up")

READY_TIMEOUT_S = 120.0
CHILD_STOP_TIMEOUT_S = 15.0
# A child restarted this many times within the window means something is broken for good.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
MAX_BACKOFF_S = 10.0
RUN_FILE = "run.json"


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: list[float] = field(default_factory=list)
    next_start_at: float = 0.0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=die_with_parent(signal.SIGTERM))
        log.info("started %s", self.name, extra={"pid": self.proc.pid, "child": self.name})

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(CHILD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("%s ignored SIGTERM; killing it", self.name)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stack: EmbeddedStack | None = None
        self.children: list[Child] = []
        self.stopping = threading.Event()

    # -- start ---------------------------------------------------------------------------
    def start(self) -> dict[str, str]:
        env = self._server_env()
        self._migrate_and_bootstrap(env)
        api_port = claim_port(self.settings.api_port, "The API", "FINTIDE_API_PORT")
        web_port = claim_port(self.settings.worker_web_port, "The worker web server",
                              "FINTIDE_WORKER_WEB_PORT")
        env |= {"FINTIDE_API_PORT": str(api_port), "FINTIDE_WORKER_WEB_PORT": str(web_port),
                "FINTIDE_DATA_DIR": str(self.settings.data_path)}
        self.children = [self._child(name, env) for name in self._child_names()]
        for child in self.children:
            child.start()
        urls = self._urls(api_port, web_port)
        self._wait_ready(urls)
        self._write_run_file(urls)
        return urls

    def _server_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()}
        s = self.settings
        if s.kafka_bootstrap and s.database_url and s.redis_url:
            log.info("using external servers")
            return env | {"FINTIDE_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
                          "FINTIDE_DATABASE_URL": s.database_url, "FINTIDE_REDIS_URL": s.redis_url}
        self.stack = EmbeddedStack(s.data_path, s.kafka_port, s.postgres_port, s.redis_port).start()
        return env | self.stack.env()

    def _migrate_and_bootstrap(self, env: dict[str, str]) -> None:
        from db.migrate import migrate_all

        applied = asyncio.run(migrate_all(env["FINTIDE_DATABASE_URL"], env))
        log.info("migrations applied", extra={"applied": applied})
        _ensure_topics(self.settings, env)
        _bootstrap_admin(self.settings, env)

    def _child_names(self) -> list[str]:
        names = ["worker", "api"]
        if self.settings.feed_enabled and _feed_available():
            names.append("feed")
        return names

    def _child(self, name: str, env: dict[str, str]) -> Child:
        argv = [sys.executable, "-m", "ops.cli", name]
        return Child(name, argv, env, self.settings.data_path / "logs" / f"{name}.log")

    def _urls(self, api_port: int, web_port: int) -> dict[str, str]:
        host = self.settings.api_host
        return {"api": f"http://{host}:{api_port}/api/v1", "docs": f"http://{host}:{api_port}/schema/swagger",
                "ready": f"http://{host}:{api_port}/ready", "metrics": f"http://{host}:{api_port}/metrics",
                "ops": f"http://127.0.0.1:{web_port}/ops/"}

    def _wait_ready(self, urls: dict[str, str]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = {"ready": urls["ready"], "ops": urls["ops"]}
        while pending and time.monotonic() < deadline and not self.stopping.is_set():
            for child in self.children:
                if child.exited() is not None:
                    raise RuntimeError(f"{child.name} exited with code {child.exited()} during start; "
                                       f"see {child.log_path}")
            pending = {k: u for k, u in pending.items() if not _http_ok(u)}
            time.sleep(0.25)
        if pending:
            raise RuntimeError(f"not ready after {READY_TIMEOUT_S:.0f} s: {', '.join(pending.values())}")

    def _write_run_file(self, urls: dict[str, str]) -> None:
        state = {"pid": os.getpid(), "urls": urls,
                 "servers": self.stack.ports if self.stack else {},
                 "children": {c.name: c.proc.pid for c in self.children if c.proc}}
        (self.settings.data_path / RUN_FILE).write_text(json.dumps(state, indent=2))

    # -- supervise -----------------------------------------------------------------------
    def supervise(self) -> None:
        """Restart children that die, until asked to stop."""
        while not self.stopping.wait(0.5):
            for child in self.children:
                self._check_child(child)

    def _check_child(self, child: Child) -> None:
        code = child.exited()
        if code is None:
            return
        now = time.monotonic()
        if child.next_start_at == 0.0:
            child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW_S] + [now]
            if len(child.restarts) > MAX_RESTARTS:
                log.error("%s keeps crashing; stopping the platform", child.name, extra={"exit_code": code})
                self.stopping.set()
                return
            backoff = min(MAX_BACKOFF_S, 0.5 * 2 ** (len(child.restarts) - 1))
            child.next_start_at = now + backoff
            log.error("%s exited with code %s; restarting in %.1f s", child.name, code, backoff,
                      extra={"child": child.name, "exit_code": code})
        if now >= child.next_start_at:
            child.next_start_at = 0.0
            child.start()
            log.warning("restarted %s", child.name, extra={"child": child.name})
            self._write_run_file(json.loads((self.settings.data_path / RUN_FILE).read_text())["urls"])

    # -- stop ----------------------------------------------------------------------------
    def stop(self) -> None:
        # The API and feed go first so nothing new arrives while the worker commits.
        for child in sorted(self.children, key=lambda c: c.name == "worker"):
            child.stop()
        if self.stack is not None:
            self.stack.stop()
        (self.settings.data_path / RUN_FILE).unlink(missing_ok=True)
        log.info("stopped")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def _feed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ops.feed") is not None


def _ensure_topics(settings: Settings, env: dict[str, str]) -> None:
    try:
        from streams.topics import ensure_topics
    except ImportError:
        return
    import msgspec

    asyncio.run(ensure_topics(msgspec.structs.replace(settings, kafka_bootstrap=env["FINTIDE_KAFKA_BOOTSTRAP"])))


def _bootstrap_admin(settings: Settings, env: dict[str, str]) -> None:
    if not (settings.admin_email and settings.admin_password):
        return
    import msgspec

    from services.identity import create_admin

    target = msgspec.structs.replace(settings, database_url=env["FINTIDE_DATABASE_URL"],
                                     redis_url=env["FINTIDE_REDIS_URL"])
    asyncio.run(create_admin(target, settings.admin_email, settings.admin_password))
    log.info("platform admin ensured", extra={"email": settings.admin_email})


def run_up(settings: Settings) -> int:
    supervisor = Supervisor(settings)

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; stopping", signal.Signals(signum).name)
        supervisor.stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        urls = supervisor.start()
        if supervisor.stopping.is_set():
            return 0
        print(_banner(urls), flush=True)
        supervisor.supervise()
    except Exception as exc:
        log.error("fintide up failed: %s", exc)
        print(f"fintide up failed: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        supervisor.stop()
    return 0


def _banner(urls: dict[str, str]) -> str:
    return ("\nFintide is up.\n"
            f"  API      {urls['api']}\n"
            f"  Docs     {urls['docs']}\n"
            f"  Ready    {urls['ready']}\n"
            f"  Metrics  {urls['metrics']}\n"
            f"  Ops      {urls['ops']}\n"
            "Press Ctrl-C to stop.\n")


__all__ = ["Supervisor", "run_up", "free_port"]
