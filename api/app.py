"""The Litestar application factory.

One app serves every service's REST and WebSocket routes. Service modules are listed in
API_MODULES; each exposes `router` (a Litestar Router) and may expose `plugins`. The
app is stateless: all state lives in PostgreSQL, Redis and Kafka, so any number of
replicas can run behind a load balancer.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, Router
from litestar.channels import ChannelsPlugin
from litestar.config.compression import CompressionConfig
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from redis.asyncio import Redis

from api import auth as identity_auth
from api.channels import SerialPubSubBackend
from api.health import health, ready
from api.middleware import request_id_middleware, ws_clients_middleware
from api.problems import EXCEPTION_HANDLERS
from api.resources import Resources, open_resources
from ops.settings import Settings, load_settings

# Service modules with REST/WebSocket routes; each adds itself here.
API_MODULES: list[str] = ["api.identity", "api.payments", "api.market", "api.fraud"]
MAX_BODY_BYTES = 1 * 1024 * 1024
CHANNELS_PREFIX = "fintide:channels"


class MetricsController(PrometheusController):
    path = "/metrics"
    openmetrics_format = False


def _service_routers() -> tuple[list[Router], list[Any]]:
    routers: list[Router] = []
    plugins: list[Any] = []
    for name in API_MODULES:
        module = importlib.import_module(name)
        routers.append(module.router)
        plugins.extend(getattr(module, "plugins", []))
    return routers, plugins


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or load_settings()
    channels_redis = Redis.from_url(settings.redis_url)
    channels = ChannelsPlugin(
        backend=SerialPubSubBackend(redis=channels_redis, key_prefix=CHANNELS_PREFIX),
        arbitrary_channels_allowed=True,
    )

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        resources = await open_resources(settings)
        app.state.resources = resources
        try:
            yield
        finally:
            await resources.close()
            await channels_redis.aclose()


    routers, plugins = _service_routers()
    metrics = PrometheusConfig(app_name="fintide", prefix="litestar", group_path=True,
                               exclude=["/metrics", "/schema"])
    app = Litestar(
        route_handlers=[health, ready, MetricsController, *routers],
        dependencies={"resources": Provide(_resources_from_state, sync_to_thread=False)},
        plugins=[channels, *plugins],
        middleware=[request_id_middleware, metrics.middleware, ws_clients_middleware],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        cors_config=CORSConfig(allow_origins=[o.strip() for o in settings.cors_origins.split(",") if o.strip()],
                               expose_headers=["x-request-id", "retry-after"]),
        compression_config=CompressionConfig(backend="gzip", minimum_size=1024),
        openapi_config=OpenAPIConfig(title="Fintide API", version="1.0.0", path="/schema",
                                     render_plugins=[SwaggerRenderPlugin(path="/swagger"),
                                                     ScalarRenderPlugin(path="/")]),
        request_max_body_size=MAX_BODY_BYTES,
        # ops.logging configures JSON logging for the process; Litestar's own config would
        # start a queue-listener thread per app.
        logging_config=None,
        lifespan=[lifespan],
        # JWT/API-key auth and the rate limits (api/auth.py, api/ratelimit.py).
        on_app_init=[identity_auth.install(settings)],
        debug=False,
    )
    app.state.settings = settings
    return app


def _resources_from_state(state: State) -> Resources:
    # `state` is the app state Litestar injects; resources exist once the lifespan started.
    return state.resources
