"""Run a Faust worker: `fintide worker` calls run_worker(load_settings()).

    python -m streams.worker [--agents agents.ops,agents.market]

The worker installs the ops views and every module in agents.AGENT_MODULES (or the
`--agents` list), creates the registered topics, writes its web URL to
`<data_dir>/worker/<worker_id>/web.url` (useful with FINTIDE_WORKER_WEB_PORT=0), and runs
until SIGTERM or SIGINT, on which it stops cleanly: agents finish their current event,
offsets are committed, tables are flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import faust

from ops.heap import freeze_startup_heap
from ops.logging import configure_logging
from ops.settings import SECRET_FIELDS, Settings, load_settings
from streams.app import FintideApp, create_app, worker_dir
from streams.topics import ensure_topics
from tables.ops import install_ops_views

log = logging.getLogger("fintide.streams.worker")

WEB_URL_FILE = "web.url"


def build_app(settings: Settings, agent_modules: Sequence[str] | None = None) -> FintideApp:
    """The worker's app: ops views plus the `install(app)` of every agent module."""
    if agent_modules is None:
        from agents import AGENT_MODULES

        agent_modules = AGENT_MODULES
    app = create_app(settings)
    install_ops_views(app)
    for name in agent_modules:
        install = getattr(importlib.import_module(name), "install", None)
        if not callable(install):
            raise TypeError(f"agent module {name!r} has no install(app) function")
        install(app)
    return app


def web_url_path(settings: Settings) -> Path:
    return worker_dir(settings) / WEB_URL_FILE


def run_worker(settings: Settings, agent_modules: Sequence[str] | None = None) -> NoReturn:
    """Run the worker until a signal stops it; exits the process with the worker's status."""
    secrets = tuple(str(getattr(settings, name)) for name in SECRET_FIELDS if getattr(settings, name))
    configure_logging(settings.log_level, secrets=secrets)
    app = build_app(settings, agent_modules)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # Topics first: Faust would otherwise create source topics with its own defaults.
    loop.run_until_complete(ensure_topics(settings))
    url_file = web_url_path(settings)
    url_file.write_text(str(app.conf.canonical_url) + "\n")
    log.info("worker starting", extra={"app": app.conf.id, "web_url": str(app.conf.canonical_url),
                                       "agents": sorted(app.agents)})
    # mode's Worker installs the SIGTERM/SIGINT handlers that stop the app gracefully.
    # Logging stays ours (JSON): override_logging=False, no stdout redirection.
    worker = faust.Worker(app, loop=loop, quiet=True, redirect_stdouts=False, override_logging=False)
    # The terminal progress spinner writes escape codes to stdout even when quiet.
    worker.spinner = None
    freeze_startup_heap()
    try:
        worker.execute_from_commandline()
    finally:
        url_file.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = argparse.ArgumentParser(prog="python -m streams.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--agents", help="comma-separated agent modules (default: agents.AGENT_MODULES)")
    args = parser.parse_args(argv)
    modules = [m.strip() for m in args.agents.split(",") if m.strip()] if args.agents else None
    run_worker(load_settings(), modules)


if __name__ == "__main__":
    main()
