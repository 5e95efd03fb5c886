"""Static checks of the deployment files: docker-compose.yml, Dockerfile, .dockerignore,
Prometheus and Grafana provisioning, docs/DEPLOY.md.

Docker cannot run where Fintide is developed, so these files must be right by
construction. Each check is a function that returns a list of problems; the tests assert
the real files have none, and that a broken copy (a service without a healthcheck, a panel
without a query, ...) is caught, so a check cannot silently pass everything.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS = ROOT / "ops/prometheus/prometheus.yml"
GRAFANA_DATASOURCES = ROOT / "ops/grafana/provisioning/datasources/prometheus.yml"
GRAFANA_PROVIDERS = ROOT / "ops/grafana/provisioning/dashboards/fintide.yml"
DASHBOARD = ROOT / "ops/grafana/dashboards/fintide.json"
DEPLOY_DOC = ROOT / "docs/DEPLOY.md"

APP_IMAGE = "fintide"
APP_ROLES = {"api": "api", "worker": "worker", "feed": "feed", "migrate": "migrate"}
# What every Fintide process needs to find its servers and run safely in production.
REQUIRED_APP_ENV = {
    "FINTIDE_ENV",
    "FINTIDE_DATA_DIR",
    "FINTIDE_KAFKA_BOOTSTRAP",
    "FINTIDE_DATABASE_URL",
    "FINTIDE_REDIS_URL",
    "FINTIDE_JWT_SECRET",
    "FINTIDE_API_HOST",
    "FINTIDE_API_PORT",
    "FINTIDE_WORKER_WEB_PORT",
    "FINTIDE_FEED_ENABLED",
}
API_PORT = 8000
WORKER_WEB_PORT = 6066
# Metric names the workers and api export; the dashboard must chart each of them.
FINTIDE_METRICS = [
    "fintide_events_processed_total",
    "fintide_events_dlq_total",
    "fintide_consumer_lag",
    "fintide_market_ticks_total",
    "fintide_market_signals_total",
    "fintide_payments_saga_steps_total",
    "fintide_payment_latency_seconds",
    "fintide_fraud_decisions_total",
    "fintide_ws_clients",
]
# Values for the variables compose requires (${VAR:?...}) when resolving the file here.
TEST_SECRETS = {
    "FINTIDE_JWT_SECRET": "test-jwt-secret-0123456789abcdef0123456789",
    "FINTIDE_PII_KEY": "test-pii-key-0123456789abcdef0123456789ab",
    "FINTIDE_GATEWAY_WEBHOOK_SECRET": "test-webhook-secret-0123456789",
    "GRAFANA_ADMIN_PASSWORD": "test-grafana-password",
}
DURATION = re.compile(r"^(\d+(ms|s|m|h))+$")


# --- helpers -------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys: PyYAML keeps the last one, compose refuses."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        # Checked before merging: a key set next to `<<: *anchor` may override the anchor's.
        keys = [k.value for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"]
        dupes = {k for k in keys if keys.count(k) > 1}
        if dupes:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate keys {dupes}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_StrictLoader)


def load_compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


# Compose interpolation: `$$` is a literal `$`; `${VAR}`, `${VAR:-d}`, `${VAR-d}`,
# `${VAR:?err}`, `${VAR?err}`, `${VAR:+alt}`, `${VAR+alt}` and `$VAR` read the environment.
_TOKEN = re.compile(r"\$\$|\$\{([^}]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_BRACED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?$", re.S)


class InterpolationError(ValueError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group(2) is not None:
            return env.get(m.group(2), "")
        parsed = _BRACED.match(m.group(1))
        if not parsed:
            raise InterpolationError(f"bad interpolation {m.group(0)!r}")
        name, op, arg = parsed.groups()
        value = env.get(name)
        empty = value is None or (op is not None and op.startswith(":") and value == "")
        if op is None:
            return value or ""
        if op.endswith("-"):
            return arg if empty else value  # type: ignore[return-value]
        if op.endswith("?"):
            if empty:
                raise InterpolationError(f"{name}: {arg}")
            return value  # type: ignore[return-value]
        return "" if empty else arg  # "+"

    return _TOKEN.sub(sub, text)


def resolve(node: Any, env: dict[str, str]) -> Any:
    """The parsed compose file as compose sees it after interpolation."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [resolve(x, env) for x in node]
    if isinstance(node, dict):
        return {k: resolve(v, env) for k, v in node.items()}
    return node


def variables(node: Any) -> dict[str, str | None]:
    """Every variable compose interpolates in a parsed file (values only, as compose does),
    with its operator (None if bare)."""
    found: dict[str, str | None] = {}
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            for name, op in variables(item).items():
                if found.get(name) is None:
                    found[name] = op
    elif isinstance(node, str):
        for m in _TOKEN.finditer(node):
            if m.group(2):
                found.setdefault(m.group(2), None)
            elif m.group(1) is not None:
                parsed = _BRACED.match(m.group(1))
                if parsed and found.get(parsed.group(1)) is None:
                    found[parsed.group(1)] = parsed.group(2)
    return found


def env_dict(env: Any) -> dict[str, str]:
    """A service's environment, whether written as a mapping or as KEY=VALUE items."""
    if env is None:
        return {}
    if isinstance(env, dict):
        return {str(k): "" if v is None else str(v) for k, v in env.items()}
    out = {}
    for item in env:
        key, _, value = str(item).partition("=")
        out[key] = value
    return out


def is_app(service: dict[str, Any]) -> bool:
    return str(service.get("image", "")).split(":")[0] == APP_IMAGE or "build" in service


def command_words(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    if isinstance(cmd, str):
        return cmd.split()
    return [str(w) for w in cmd or []]


def host_port(mapping: Any) -> str | None:
    """The host side of a `ports` entry, or None when only a container port is given."""
    if isinstance(mapping, dict):
        return str(mapping["published"]) if mapping.get("published") else None
    parts = str(mapping).split(":")
    return parts[-2] if len(parts) >= 2 else None


def url_host_port(url: str) -> tuple[str, int | None]:
    rest = url.split("://", 1)[1]
    hostport = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = hostport.partition(":")
    return host, int(port) if port else None


# --- docker-compose.yml --------------------------------------------------------------------


def compose_problems(doc: dict[str, Any]) -> list[str]:
    """Problems in a compose file, parsed and interpolated."""
    problems: list[str] = []
    services: dict[str, Any] = doc.get("services") or {}
    if not services:
        return ["no services"]
    shared_env = env_dict(doc.get("x-fintide-env"))
    if not shared_env:
        problems.append("no x-fintide-env extension field for the app services")
    named_volumes = set(doc.get("volumes") or {})

    for name, svc in services.items():
        where = f"service {name}"
        if not command_words(svc):
            problems.append(f"{where}: no command")
        hc = svc.get("healthcheck") or {}
        test = hc.get("test")
        if not test or hc.get("disable") or test in (["NONE"], "NONE"):
            problems.append(f"{where}: no healthcheck test")
        elif isinstance(test, list) and (test[0] not in ("CMD", "CMD-SHELL") or len(test) < 2):
            problems.append(f"{where}: healthcheck test must be [CMD, ...] or [CMD-SHELL, ...]")
        for key in ("interval", "timeout", "start_period"):
            if key in hc and not DURATION.match(str(hc[key])):
                problems.append(f"{where}: healthcheck {key} {hc[key]!r} is not a duration")
        if not env_dict(svc.get("environment")):
            problems.append(f"{where}: no environment")

        for dep, spec in _depends_on(svc).items():
            if dep not in services:
                problems.append(f"{where}: depends_on unknown service {dep}")
                continue
            cond = spec.get("condition", "service_started")
            if cond not in ("service_started", "service_healthy", "service_completed_successfully"):
                problems.append(f"{where}: depends_on {dep} has unknown condition {cond}")
            dep_svc = services[dep]
            if cond == "service_healthy" and not (dep_svc.get("healthcheck") or {}).get("test"):
                problems.append(f"{where}: waits for {dep} to be healthy but it has no healthcheck")
            if cond == "service_completed_successfully" and dep_svc.get("restart", "no") != "no":
                problems.append(f"{where}: waits for {dep} to complete but {dep} restarts")

        replicas = (svc.get("deploy") or {}).get("replicas", 1)
        for mapping in svc.get("ports") or []:
            published = host_port(mapping)
            if replicas > 1 and published and "-" not in published:
                problems.append(f"{where}: {replicas} replicas cannot share host port {published}")

        for vol in svc.get("volumes") or []:
            source, target = _volume(vol)
            if source.startswith((".", "/")):
                if source.startswith("./ops") and not (ROOT / source).exists():
                    problems.append(f"{where}: mounted path {source} does not exist")
            elif source and source not in named_volumes:
                problems.append(f"{where}: volume {source} is not declared")
            if name == "worker" and target == "/data" and source:
                problems.append(f"{where}: /data must be per-container, not the volume {source}")

        if is_app(svc):
            problems += _app_problems(name, svc, services, shared_env)

    for required in APP_ROLES:
        if required not in services:
            problems.append(f"no {required} service")
    return problems


def _depends_on(svc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: {} for d in deps}
    return {d: spec or {} for d, spec in deps.items()}


def _volume(vol: Any) -> tuple[str, str]:
    if isinstance(vol, dict):
        return str(vol.get("source", "")), str(vol.get("target", ""))
    parts = str(vol).split(":")
    return (parts[0], parts[1]) if len(parts) >= 2 else ("", parts[0])


def _app_problems(
    name: str, svc: dict[str, Any], services: dict[str, Any], shared_env: dict[str, str]
) -> list[str]:
    where = f"service {name}"
    problems = []
    env = env_dict(svc.get("environment"))
    missing = sorted(REQUIRED_APP_ENV - set(env))
    if missing:
        problems.append(f"{where}: missing {', '.join(missing)}")
    not_shared = sorted(k for k in shared_env if k not in env)
    if not_shared:
        problems.append(f"{where}: does not use x-fintide-env ({', '.join(not_shared)} missing)")
    if env.get("FINTIDE_ENV") not in (None, "prod"):
        problems.append(f"{where}: FINTIDE_ENV must be prod")
    if env.get("FINTIDE_DATA_DIR") not in (None, "/data"):
        problems.append(f"{where}: FINTIDE_DATA_DIR must be /data, the image's volume")
    for key, scheme, server in (
        ("FINTIDE_DATABASE_URL", "postgresql://", "postgres"),
        ("FINTIDE_REDIS_URL", "redis://", "redis"),
    ):
        url = env.get(key, "")
        if url and (not url.startswith(scheme) or url_host_port(url)[0] != server):
            problems.append(f"{where}: {key} must be a {scheme} URL to the {server} service")
    for part in filter(None, env.get("FINTIDE_KAFKA_BOOTSTRAP", "").split(",")):
        if part.split(":")[0] not in services:
            problems.append(f"{where}: FINTIDE_KAFKA_BOOTSTRAP names unknown host {part}")
    role = APP_ROLES.get(name)
    words = command_words(svc)
    if role and f"fintide {role}" not in " ".join(words):
        problems.append(f"{where}: command must run `fintide {role}`")
    return problems


def test_yaml_loader_rejects_duplicate_keys() -> None:
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.load("a: 1\na: 2\n", Loader=_StrictLoader)


def test_compose_is_valid() -> None:
    assert compose_problems(resolve(load_compose(), TEST_SECRETS)) == []


def test_compose_env_is_real_settings() -> None:
    """Every FINTIDE_* variable names a field of ops/settings.py, and the resolved
    environment of each app service loads as prod settings (types, secret length)."""
    from ops.settings import ENV_PREFIX, Settings, load_settings
    import msgspec

    fields = {ENV_PREFIX + f.name.upper() for f in msgspec.structs.fields(Settings)}
    doc = resolve(load_compose(), TEST_SECRETS)
    for name, svc in doc["services"].items():
        if not is_app(svc):
            continue
        env = env_dict(svc["environment"])
        unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in fields)
        assert unknown == [], f"{name}: not settings: {unknown}"
        settings = load_settings(env)
        assert settings.env == "prod"
        assert settings.api_port == API_PORT and settings.worker_web_port == WORKER_WEB_PORT
        assert settings.feed_enabled is (name == "feed"), f"{name}: only the feed runs a feed"


def test_compose_refuses_to_start_without_secrets() -> None:
    doc = load_compose()
    for secret in TEST_SECRETS:
        env = {k: v for k, v in TEST_SECRETS.items() if k != secret}
        with pytest.raises(InterpolationError, match=secret):
            resolve(doc, env)


def test_compose_topology() -> None:
    services = load_compose()["services"]
    assert {"kafka", "postgres", "redis", "prometheus", "grafana"} <= set(services)
    assert services["api"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] == 2
    assert services["postgres"]["image"].startswith("postgres:18")
    assert services["redis"]["image"].startswith("redis:7")
    worker_env = env_dict(services["worker"]["environment"])
    assert worker_env["FINTIDE_WORKER_WEB_PORT"] == str(WORKER_WEB_PORT)
    # 18+ images keep data under /var/lib/postgresql/18/...: a mount at .../data is lost.
    assert any(_volume(v)[1] == "/var/lib/postgresql" for v in services["postgres"]["volumes"])
    # The app starts only once migrations ran.
    for name in ("api", "worker"):
        deps = _depends_on(services[name])
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["kafka"]["condition"] == "service_healthy"
    assert _depends_on(services["migrate"])["postgres"]["condition"] == "service_healthy"


def test_api_trusts_exactly_the_proxy_network() -> None:
    """Behind the proxy every peer is the proxy: without trusting its network, rate limits
    would put all clients in one bucket; trusting more would let clients spoof addresses."""
    doc = resolve(load_compose(), TEST_SECRETS)
    subnets = [c["subnet"] for c in doc["networks"]["default"]["ipam"]["config"]]
    api_env = env_dict(doc["services"]["api"]["environment"])
    assert api_env["FINTIDE_TRUSTED_PROXIES"].split(",") == subnets
    assert "proxy" in doc["services"] and "api" not in [
        s for s, svc in doc["services"].items() if svc.get("ports")
    ]


def test_kafka_is_single_node_kraft() -> None:
    services = load_compose()["services"]
    env = env_dict(resolve(services["kafka"], {})["environment"])
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node = env["KAFKA_NODE_ID"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert [v.split("@")[0] for v in voters] == [node]
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env["KAFKA_LISTENERS"]
    assert env["CLUSTER_ID"], "the apache/kafka image refuses KRaft without CLUSTER_ID"
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert env[key] == "1", key
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "true"
    # The app's bootstrap must be exactly what the broker advertises on the network.
    app_env = env_dict(services["api"]["environment"])
    assert f"PLAINTEXT://{app_env['FINTIDE_KAFKA_BOOTSTRAP']}" in env["KAFKA_ADVERTISED_LISTENERS"]


def test_every_compose_variable_is_documented() -> None:
    doc = DEPLOY_DOC.read_text()
    for name, op in variables(load_compose()).items():
        assert name in doc, f"${{{name}}} is not explained in docs/DEPLOY.md"
        if op in (":?", "?"):
            assert re.search(rf"\|\s*`{name}`\s*\|\s*yes", doc), f"{name} not marked required"


# Each mutation breaks one rule; compose_problems must notice it.
def _drop(path: list[str]):
    def mutate(doc: dict[str, Any]) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]

    return mutate


def _set(path: list[str], value: Any):
    def mutate(doc: dict[str, Any]) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


def _drop_env(service: str, key: str):
    def mutate(doc: dict[str, Any]) -> None:
        env = dict(doc["services"][service]["environment"])
        del env[key]
        doc["services"][service]["environment"] = env

    return mutate


COMPOSE_MUTATIONS = {
    "redis without healthcheck": _drop(["services", "redis", "healthcheck"]),
    "feed without healthcheck test": _set(["services", "feed", "healthcheck"], {"interval": "5s"}),
    "api healthcheck disabled": _set(["services", "api", "healthcheck"], {"test": ["NONE"]}),
    "kafka without command": _drop(["services", "kafka", "command"]),
    "grafana without environment": _drop(["services", "grafana", "environment"]),
    "api without jwt secret": _drop_env("api", "FINTIDE_JWT_SECRET"),
    "worker without kafka": _drop_env("worker", "FINTIDE_KAFKA_BOOTSTRAP"),
    "worker in dev mode": _set(["services", "worker", "environment", "FINTIDE_ENV"], "dev"),
    "api with a local database": _set(
        ["services", "api", "environment", "FINTIDE_DATABASE_URL"], "sqlite:///x.db"
    ),
    "depends on a missing service": _set(["services", "api", "depends_on", "zookeeper"], {}),
    "waits for a healthcheck that is not there": lambda doc: (
        doc["services"]["prometheus"].pop("healthcheck"),
        doc["services"]["grafana"]["depends_on"]["prometheus"].update(condition="service_healthy"),
    ),
    "migrate restarts": _set(["services", "migrate", "restart"], "always"),
    "replicas on one host port": _set(["services", "api", "ports"], ["8000:8000"]),
    "missing mounted file": _set(
        ["services", "prometheus", "volumes"], ["./ops/prometheus/missing.yml:/etc/p.yml:ro"]
    ),
    "shared worker data volume": lambda doc: (
        doc["services"]["worker"].__setitem__("volumes", ["worker-data:/data"]),
        doc["volumes"].__setitem__("worker-data", None),
    ),
    "worker runs the api": _set(["services", "worker", "command"], ["fintide", "api"]),
    "no feed service": _drop(["services", "feed"]),
}


@pytest.mark.parametrize("mutation", COMPOSE_MUTATIONS, ids=list(COMPOSE_MUTATIONS))
def test_compose_check_catches(mutation: str) -> None:
    doc = copy.deepcopy(load_compose())
    # Anchored mappings are shared objects; give every service its own copies to mutate.
    for svc in doc["services"].values():
        if isinstance(svc.get("environment"), dict):
            svc["environment"] = dict(svc["environment"])
    COMPOSE_MUTATIONS[mutation](doc)
    assert compose_problems(resolve(doc, TEST_SECRETS)), f"{mutation} went unnoticed"


# --- healthchecks, run for real where they can be ------------------------------------------


def _healthcheck_code(service: str) -> str:
    test = load_compose()["services"][service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"], test
    return test[3]


def _run_check(code: str) -> int:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


class _Handler(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.server.status)  # type: ignore[attr-defined]
        self.end_headers()
        self.wfile.write(b'{"status": "OK"}')

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize(
    ("service", "port", "path"), [("api", API_PORT, "/health"), ("worker", WORKER_WEB_PORT, "/")]
)
def test_http_healthcheck_follows_status(service: str, port: int, path: str) -> None:
    code = _healthcheck_code(service)
    assert f"127.0.0.1:{port}{path}'" in code
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        local = code.replace(f"127.0.0.1:{port}", f"127.0.0.1:{server.server_port}")
        server.status = 200  # type: ignore[attr-defined]
        assert _run_check(local) == 0
        server.status = 503  # type: ignore[attr-defined]
        assert _run_check(local) != 0
    finally:
        server.shutdown()
    assert _run_check(local) != 0, "nothing listening must be unhealthy"


def _feed_running() -> bool:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"feed" in argv and any(a.endswith(b"fintide") for a in argv):
            return True
    return False


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_feed_healthcheck_follows_process(tmp_path: Path) -> None:
    code = _healthcheck_code("feed")
    if _feed_running():
        pytest.skip("a real `fintide feed` runs here")
    assert _run_check(code) != 0, "no feed process must be unhealthy"
    fake = tmp_path / "fintide"  # the console script's name, as in the image
    fake.write_text("import time\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(fake), "feed"])
    try:
        deadline = time.monotonic() + 10
        while _run_check(code) != 0:
            assert time.monotonic() < deadline, "feed process not seen"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    assert _run_check(code) != 0


# --- Prometheus ----------------------------------------------------------------------------


def prometheus_problems(conf: dict[str, Any], services: dict[str, Any]) -> list[str]:
    problems = []
    if (conf.get("global") or {}).get("scrape_interval") != "5s":
        problems.append("scrape_interval must be 5s")
    jobs = {j.get("job_name"): j for j in conf.get("scrape_configs") or []}
    for job, port in (("api", API_PORT), ("worker", WORKER_WEB_PORT)):
        scrape = jobs.get(job)
        if not scrape:
            problems.append(f"no {job} job")
            continue
        if scrape.get("metrics_path", "/metrics") != "/metrics":
            problems.append(f"{job}: metrics_path must be /metrics")
        sd = scrape.get("dns_sd_configs") or []
        # DNS discovery finds every replica; a static target would hit only one of them.
        if not any(
            job in c.get("names", []) and c.get("port") == port and c.get("type", "SRV") == "A"
            for c in sd
        ):
            problems.append(f"{job}: needs dns_sd_configs names [{job}], type A, port {port}")
        for c in sd:
            for dns_name in c.get("names", []):
                if dns_name not in services:
                    problems.append(f"{job}: {dns_name} is not a compose service")
    return problems


def test_prometheus_scrapes_api_and_workers() -> None:
    services = load_compose()["services"]
    assert prometheus_problems(load_yaml(PROMETHEUS), services) == []
    mounts = [_volume(v) for v in services["prometheus"]["volumes"]]
    assert ("./ops/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml") in mounts


@pytest.mark.parametrize(
    "mutation",
    [
        lambda c: c["scrape_configs"].pop(0),
        lambda c: c["scrape_configs"][1].update(
            dns_sd_configs=[], static_configs=[{"targets": ["worker:6066"]}]
        ),
        lambda c: c["scrape_configs"][0]["dns_sd_configs"][0].update(port=9000),
        lambda c: c["global"].update(scrape_interval="1m"),
    ],
)
def test_prometheus_check_catches(mutation: Any) -> None:
    conf = load_yaml(PROMETHEUS)
    mutation(conf)
    assert prometheus_problems(conf, load_compose()["services"])


# --- Grafana -------------------------------------------------------------------------------


def dashboard_problems(dash: dict[str, Any], datasource_uid: str) -> list[str]:
    problems = []
    if not 36 <= dash.get("schemaVersion", 0) <= 41:
        problems.append(f"schemaVersion {dash.get('schemaVersion')} is not a current one")
    if not dash.get("uid"):
        problems.append("no uid: provisioning needs a stable one")
    panels = dash.get("panels") or []
    if not panels:
        problems.append("no panels")
    ids = [p.get("id") for p in panels]
    if len(set(ids)) != len(ids):
        problems.append("panel ids are not unique")
    exprs = []
    for p in panels:
        where = f"panel {p.get('title')!r}"
        ds = p.get("datasource") or {}
        if ds.get("uid") != datasource_uid:
            problems.append(f"{where}: datasource is not the provisioned uid {datasource_uid}")
        targets = [t for t in p.get("targets") or [] if t.get("expr")]
        if not targets:
            problems.append(f"{where}: no target with an expr")
        for t in targets:
            expr = t["expr"]
            exprs.append(expr)
            if any(expr.count(a) != expr.count(b) for a, b in ("()", "{}", "[]")):
                problems.append(f"{where}: unbalanced brackets in {expr}")
            if "histogram_quantile" in expr and "_bucket" not in expr:
                problems.append(f"{where}: histogram_quantile needs the _bucket series")
            for metric in re.findall(r"rate\((\w+)", expr):
                if not metric.endswith(("_total", "_bucket", "_count", "_sum")):
                    problems.append(f"{where}: rate() over {metric}, which is not a counter")
    text = "\n".join(exprs)
    for metric in FINTIDE_METRICS + list(litestar_metrics().values()):
        if not re.search(rf"\b{metric}(_bucket)?\b", text):
            problems.append(f"no panel charts {metric}")
    return problems


def litestar_metrics() -> dict[str, str]:
    """Litestar's Prometheus metric names, read from the installed plugin, not assumed."""
    middleware = pytest.importorskip("litestar.plugins.prometheus.middleware")
    config = pytest.importorskip("litestar.plugins.prometheus.config")
    prefix = config.PrometheusConfig().prefix
    source = Path(middleware.__file__).read_text()
    names = {}
    suffixes = (("requests", "_requests_total"), ("duration", "_request_duration_seconds"))
    for kind, suffix in suffixes:
        assert f'f"{{self._config.prefix}}{suffix}"' in source, f"litestar no longer names {suffix}"
        names[kind] = prefix + suffix
    for label in ("method", "path", "status_code", "app_name"):
        assert f'"{label}"' in source, f"litestar no longer labels {label}"
    return names


def test_grafana_datasource_and_provider() -> None:
    services = load_compose()["services"]
    grafana_mounts = dict(_volume(v) for v in services["grafana"]["volumes"])
    sources = load_yaml(GRAFANA_DATASOURCES)["datasources"]
    assert len(sources) == 1 and sources[0]["type"] == "prometheus"
    host, port = url_host_port(sources[0]["url"])
    assert host == "prometheus" and host in services and port == 9090
    provider = load_yaml(GRAFANA_PROVIDERS)["providers"][0]
    assert provider["type"] == "file"
    assert grafana_mounts["./ops/grafana/dashboards"] == provider["options"]["path"]
    for sub in ("datasources", "dashboards"):
        target = f"/etc/grafana/provisioning/{sub}"
        assert grafana_mounts[f"./ops/grafana/provisioning/{sub}"] == target
    env = env_dict(services["grafana"]["environment"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_every_metric_the_dashboard_charts_is_exported_by_the_code() -> None:
    # A panel over a name nothing exports stays empty without an error anywhere.
    sources = "\n".join(p.read_text() for d in ("api", "agents", "streams", "tables", "services")
                        for p in (ROOT / d).rglob("*.py"))
    declared = set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(fintide_\w+)"', sources))
    exported = declared | {f"{name}_total" for name in declared}
    assert [m for m in FINTIDE_METRICS if m not in exported] == []


def test_dashboard_is_valid() -> None:
    uid = load_yaml(GRAFANA_DATASOURCES)["datasources"][0]["uid"]
    assert dashboard_problems(json.loads(DASHBOARD.read_text()), uid) == []


def _drop_fintide_metric(d: dict[str, Any]) -> None:
    d["panels"] = [p for p in d["panels"] if "fintide_ws_clients" not in json.dumps(p)]


@pytest.mark.parametrize(
    "mutation",
    [
        lambda d: d["panels"][0].pop("datasource"),
        lambda d: d["panels"][1].update(targets=[{"refId": "A"}]),
        lambda d: d["panels"][2].update(targets=[]),
        lambda d: d["panels"][3]["targets"][0].update(expr="sum(rate(litestar_requests_total[5m])"),
        lambda d: d["panels"][4].update(id=d["panels"][0]["id"]),
        lambda d: d.update(schemaVersion=16),
        _drop_fintide_metric,
    ],
)
def test_dashboard_check_catches(mutation: Any) -> None:
    dash = json.loads(DASHBOARD.read_text())
    mutation(dash)
    assert dashboard_problems(dash, "prometheus")


# --- Dockerfile and .dockerignore ----------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        if full:
            instr, _, args = full.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def dockerfile_problems(text: str) -> list[str]:
    instrs = dockerfile_instructions(text)
    froms = [i for i, (k, _) in enumerate(instrs) if k == "FROM"]
    if not froms:
        return ["no FROM"]
    final = instrs[froms[-1]:]
    problems = []
    if not all(args.split()[0] == "python:3.11-slim" for k, args in instrs if k == "FROM"):
        problems.append("every stage must be FROM python:3.11-slim")
    pip_install = re.compile(r"pip install (--no-deps )?\.(\s|$)")
    if not any(k == "RUN" and pip_install.search(a) for k, a in instrs):
        problems.append("the package is not installed with `pip install .`")
    users = [a for k, a in final if k == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the final stage must switch to a non-root USER")
    envs = " ".join(a for k, a in final if k == "ENV")
    if not re.search(r"(^|\s)FINTIDE_DATA_DIR=/data(\s|$)", envs):
        problems.append("FINTIDE_DATA_DIR=/data is not set")
    if not any(k == "VOLUME" and "/data" in a for k, a in final):
        problems.append("no VOLUME for /data")
    cmds = [a for k, a in final if k == "CMD"]
    if not cmds:
        problems.append("no CMD")
    else:
        try:
            cmd = json.loads(cmds[-1])
        except json.JSONDecodeError:
            cmd = None
        # Exec form, so the app is PID 1's child directly and gets SIGTERM.
        if cmd != ["fintide", "api"]:
            problems.append('CMD must be ["fintide", "api"] in exec form')
    return problems


def test_dockerfile_is_valid() -> None:
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("USER fintide\n", ""),
        ("USER fintide\n", "USER root\n"),
        ('CMD ["fintide", "api"]', ""),
        ('CMD ["fintide", "api"]', "CMD fintide api"),
        ('VOLUME ["/data"]', ""),
        ("FINTIDE_DATA_DIR=/data", "FINTIDE_DATA_DIR=/tmp"),
        ("FROM python:3.11-slim\n", "FROM python:3.12\n"),
    ],
)
def test_dockerfile_check_catches(old: str, new: str) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    assert dockerfile_problems(text.replace(old, new))


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path` (top-level patterns and `**/` globs, `!` undoes)."""
    from fnmatch import fnmatch

    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch(p, pattern[3:]) for p in parts)
        else:
            hit = any(fnmatch(p, pattern) for p in prefixes)
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_package_and_drops_local_state() -> None:
    import tomllib

    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    patterns = [line for line in lines if line and not line.startswith("#")]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [p.rstrip("*") for p in includes]
    needed = ["pyproject.toml", "README.md", "ops/settings.py"]
    needed += [f"{p}/__init__.py" for p in packages]
    for path in needed:
        assert not dockerignored(path, patterns), f"{path} is needed by `pip install .`"
    for path in (".venv/bin/python", ".git/HEAD", ".fintide/data", ".env", "api/__pycache__/x.pyc"):
        assert dockerignored(path, patterns), f"{path} must not reach the image"
