"""Every runtime setting, read once from environment variables.

One msgspec Struct so the whole configuration is typed, printable (secrets masked) and
documented in one place; README lists each variable with its default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec

ENV_PREFIX = "FINTIDE_"
# Masked whole by `redacted()`; the notifier URLs carry provider credentials.
SECRET_FIELDS = frozenset({"jwt_secret", "pii_key", "admin_password", "gateway_webhook_secret",
                           "notify_email", "notify_sms", "gateway_api_key"})
DEV_JWT_SECRET = "dev-only-jwt-secret-change-me-0123456789abcdef"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # Where the embedded servers, RocksDB tables and logs live.
    data_dir: str = ".fintide"
    # "dev" enables the dev outbox and relaxed defaults; "prod" refuses dev secrets.
    env: str = "dev"
    log_level: str = "INFO"

    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Empty means: started by `fintide up` on the embedded servers.
    kafka_bootstrap: str = ""
    database_url: str = ""
    redis_url: str = ""
    # Ports for the embedded servers; 0 picks a free loopback port.
    kafka_port: int = 0
    postgres_port: int = 0
    redis_port: int = 0

    worker_web_port: int = 6066
    # Containers bind 0.0.0.0 so Prometheus and other workers (table routing) can reach them.
    worker_web_bind: str = "127.0.0.1"
    # The host other workers use to reach this one; empty means the bind address, or the
    # machine's hostname when bound to every interface.
    worker_web_host: str = ""
    worker_id: str = "worker-1"
    app_id: str = "fintide"
    # A topic prefix gives tests isolated topics on one broker.
    topic_prefix: str = ""
    topic_partitions: int = 4
    # Short group-join timings: Tansu otherwise takes ~30 s to join a consumer group.
    broker_rebalance_timeout_s: float = 3.0
    broker_session_timeout_s: float = 6.0
    broker_heartbeat_interval_s: float = 1.0
    stream_buffer_maxsize: int = 4096
    # How long a worker's fetch waits on an empty partition. Faust hard-codes 1,500 ms, and
    # Tansu answers a waiting fetch only when that wait expires (not when records arrive),
    # so the wait is the latency floor of every agent there (streams/kafka.py).
    broker_fetch_max_wait_ms: int = 10

    jwt_secret: str = DEV_JWT_SECRET
    access_token_ttl_s: int = 900
    refresh_token_ttl_s: int = 30 * 24 * 3600
    pii_key: str = ""
    admin_email: str = ""
    admin_password: str = ""
    cors_origins: str = "*"
    trusted_proxies: str = ""
    # Requests per minute per user (else API key, else IP); per IP on /api/v1/auth/*;
    # WebSocket handshakes per user (api/ratelimit.py).
    rate_limit_per_minute: int = 600
    rate_limit_auth_per_minute: int = 30
    rate_limit_ws_per_minute: int = 60
    gateway_webhook_secret: str = "dev-webhook-secret"
    # A Stripe-style payment gateway (services/gateway.py HttpGateway); empty: the simulator.
    gateway_url: str = ""
    gateway_api_key: str = ""
    # Payments saga (agents/payments.py). The fraud step: who answers fraud.requests
    # ("passthrough" allows everything; "model" is the fraud service's scorer), how long the
    # saga waits for a decision, and up to which amount it then lets a payment through
    # (fail-open) rather than failing it (fail-closed, reason risk_timeout).
    fraud_scorer: str = "passthrough"
    fraud_budget_ms: int = 2000
    fraud_fail_open_limit_minor: int = 10_000
    # Messages a payments agent takes per batch and how long it waits to fill one; how
    # often the outbox relay polls when it found nothing.
    payments_batch_max: int = 1000
    payments_batch_wait_ms: int = 10
    payments_relay_interval_ms: int = 20
    # Where OTP and other messages go: "outbox" (the dev outbox), or a provider URL such as
    # smtp://user:pass@host:587?from=a@b&starttls=1, sendgrid://KEY@api.sendgrid.com?from=a@b,
    # twilio://SID:TOKEN@api.twilio.com?from=%2B1555... (services/notify.py).
    notify_email: str = "outbox"
    notify_sms: str = "outbox"

    feed_enabled: bool = True
    feed_symbols: str = "BTCUSD,ETHUSD,AAPL,MSFT,EURUSD"
    feed_ticks_per_s: int = 200

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def is_dev(self) -> bool:
        return self.env == "dev"

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, safe to log."""
        out = msgspec.structs.asdict(self)
        for name in SECRET_FIELDS:
            if out.get(name):
                out[name] = "***"
        for name in ("database_url", "redis_url"):
            out[name] = _mask_url_password(out[name])
        return out


def _mask_url_password(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def load_settings(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from FINTIDE_* variables; keyword overrides win (used by the CLI)."""
    environ = dict(os.environ if environ is None else environ)
    raw: dict[str, Any] = {}
    for field in msgspec.structs.fields(Settings):
        key = ENV_PREFIX + field.name.upper()
        if key in environ:
            raw[field.name] = environ[key]
    raw.update({k: v for k, v in overrides.items() if v is not None})
    settings = msgspec.convert(raw, Settings, strict=False)
    _check(settings)
    return settings


def _check(settings: Settings) -> None:
    if settings.env not in ("dev", "test", "prod"):
        raise ValueError(f"FINTIDE_ENV must be dev, test or prod, not {settings.env!r}")
    if settings.env == "prod" and settings.jwt_secret == DEV_JWT_SECRET:
        raise ValueError("FINTIDE_JWT_SECRET must be set in prod")
    if len(settings.jwt_secret) < 32:
        raise ValueError("FINTIDE_JWT_SECRET must be at least 32 characters")
    if min(settings.rate_limit_per_minute, settings.rate_limit_auth_per_minute, settings.rate_limit_ws_per_minute) < 1:
        raise ValueError("FINTIDE_RATE_LIMIT_*_PER_MINUTE must be at least 1")
    if not 1 <= settings.broker_fetch_max_wait_ms <= 60_000:
        raise ValueError("FINTIDE_BROKER_FETCH_MAX_WAIT_MS must be 1..60000")
    _check_payments(settings)


def _check_payments(settings: Settings) -> None:
    if settings.fraud_scorer not in ("passthrough", "model"):
        raise ValueError(f"FINTIDE_FRAUD_SCORER must be passthrough or model, not {settings.fraud_scorer!r}")
    if not 1 <= settings.fraud_budget_ms <= 600_000 or settings.fraud_fail_open_limit_minor < 0:
        raise ValueError("FINTIDE_FRAUD_BUDGET_MS must be 1..600000 and FINTIDE_FRAUD_FAIL_OPEN_LIMIT_MINOR >= 0")
    if not 1 <= settings.payments_batch_max <= 4096 or not 1 <= settings.payments_batch_wait_ms <= 10_000 \
            or not 1 <= settings.payments_relay_interval_ms <= 10_000:
        raise ValueError("FINTIDE_PAYMENTS_BATCH_MAX must be 1..4096, the batch wait and relay interval 1..10000 ms")
    if settings.gateway_url and not settings.gateway_api_key:
        raise ValueError("FINTIDE_GATEWAY_API_KEY is required with FINTIDE_GATEWAY_URL")
