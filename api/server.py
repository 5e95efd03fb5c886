"""`fintide api`: serve the app with uvicorn on uvloop."""

from __future__ import annotations

import uvicorn

from ops.heap import freeze_startup_heap
from ops.settings import Settings


def run_api(settings: Settings) -> None:
    from api.app import create_app

    config = uvicorn.Config(create_app(settings), host=settings.api_host, port=settings.api_port,
                            loop="uvloop", http="auto", lifespan="on", access_log=False,
                            log_config=None, proxy_headers=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    # Everything the app built and imported lives until exit: out of the collector's way.
    freeze_startup_heap()
    server.run()
