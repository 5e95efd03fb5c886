"""The `fintide` command: up | api | worker | feed | migrate | status | admin | reconcile."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.request
from collections.abc import Callable, Sequence

from ops.logging import configure_logging
from ops.settings import Settings, load_settings


def cmd_up(settings: Settings, _args: argparse.Namespace) -> int:
    from ops.supervisor import run_up

    return run_up(settings)


def cmd_api(settings: Settings, _args: argparse.Namespace) -> int:
    from api.server import run_api

    run_api(settings)
    return 0


def cmd_worker(settings: Settings, _args: argparse.Namespace) -> int:
    from streams.worker import run_worker

    run_worker(settings)
    return 0


def cmd_feed(settings: Settings, args: argparse.Namespace) -> int:
    from ops.feed import run_feed

    return run_feed(settings, args)


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from db.migrate import migrate_all

    _require(settings.database_url, "FINTIDE_DATABASE_URL")
    applied = asyncio.run(migrate_all(settings.database_url))
    print(f"applied {len(applied)} migration(s)" + "".join(f"\n  {m}" for m in applied))
    return 0


def cmd_status(settings: Settings, _args: argparse.Namespace) -> int:
    from ops.supervisor import RUN_FILE

    run_file = settings.data_path / RUN_FILE
    if not run_file.exists():
        print(f"not running (no {run_file})")
        return 1
    state = json.loads(run_file.read_text())
    print(f"fintide up, pid {state['pid']}")
    for name, url in state["urls"].items():
        print(f"  {name:8} {url}")
    try:
        with urllib.request.urlopen(state["urls"]["ready"], timeout=5) as response:
            ready = json.loads(response.read())
    except OSError as exc:
        print(f"  ready    unreachable: {exc}")
        return 1
    for dep in ready["dependencies"]:
        mark = "up" if dep["ok"] else f"DOWN ({dep['error']})"
        print(f"  {dep['name']:8} {mark} {dep['latency_ms']} ms")
    return 0 if ready["status"] == "ready" else 1


def cmd_admin_create(settings: Settings, args: argparse.Namespace) -> int:
    from api.problems import Problem
    from services.identity import create_admin

    _require(settings.database_url, "FINTIDE_DATABASE_URL")
    try:
        user_id = asyncio.run(create_admin(settings, args.email, args.password))
    except Problem as exc:
        details = "".join(f"\n  {e.get('field') or ''}: {e.get('message')}" for e in exc.errors or [])
        print(f"fintide admin create: {exc.detail}{details}", file=sys.stderr)
        return 2
    print(f"platform admin {args.email} ready (id {user_id})")
    return 0


def cmd_reconcile(settings: Settings, _args: argparse.Namespace) -> int:
    from db.engine import dsn_for
    from services.payments import reconcile

    _require(settings.database_url, "FINTIDE_DATABASE_URL")
    differences = asyncio.run(reconcile(dsn_for(settings.database_url, "payments")))
    for diff in differences:
        print(f"DIFFERENCE {diff}")
    print("ledger and balances agree" if not differences else f"{len(differences)} difference(s)")
    return 1 if differences else 0


def cmd_simulate(settings: Settings, args: argparse.Namespace) -> int:
    # Parsed here, not in build_parser: the generator imports Numba kernels, which every
    # other command would otherwise pay for at start-up.
    from ops.simulate import add_arguments, run_simulate

    parser = argparse.ArgumentParser(prog="fintide simulate")
    add_arguments(parser)
    return run_simulate(settings, parser.parse_args(args.feed_args))


def _require(value: str, name: str) -> None:
    if not value:
        raise SystemExit(f"{name} is not set (or run `fintide up`, which starts the embedded servers)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fintide", description=__doc__)
    parser.add_argument("--data-dir", help="where embedded servers and tables keep data (FINTIDE_DATA_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the whole platform on the embedded servers")
    up.add_argument("--api-port", type=int, help="API port (FINTIDE_API_PORT, default 8000)")
    sub.add_parser("api", help="serve the REST/WebSocket API")
    sub.add_parser("worker", help="run a Faust stream worker")
    # The feed parses its own options (ops/feed.py); everything after `feed` is passed on.
    sub.add_parser("feed", help="publish market data (simulator, CSV replay, exchange)", add_help=False)
    sub.add_parser("migrate", help="apply database migrations (idempotent)")
    sub.add_parser("status", help="show what `fintide up` runs and whether it is ready")
    admin = sub.add_parser("admin", help="platform administration")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    create = admin_sub.add_parser("create", help="create (or update) a platform admin")
    create.add_argument("--email", required=True)
    create.add_argument("--password", required=True)
    sub.add_parser("reconcile", help="compare balances with the journal; exit 1 on a difference")
    sub.add_parser("simulate", help="labelled synthetic payment traffic for fraud scoring", add_help=False)
    return parser


# Commands that parse their own options (everything after the command name).
PASS_THROUGH = ("feed", "simulate")

COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "up": cmd_up, "api": cmd_api, "worker": cmd_worker, "feed": cmd_feed, "migrate": cmd_migrate,
    "status": cmd_status, "admin": cmd_admin_create, "reconcile": cmd_reconcile,
    "simulate": cmd_simulate,
}


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if rest and args.command not in PASS_THROUGH:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    args.feed_args = rest
    overrides = {"data_dir": args.data_dir, "api_port": getattr(args, "api_port", None)}
    try:
        settings = load_settings(**overrides)
    except (ValueError, Exception) as exc:  # noqa: BLE001 - a bad setting is a user error
        print(f"fintide: invalid settings: {exc}", file=sys.stderr)
        return 2
    secrets = (settings.jwt_secret, settings.admin_password, settings.pii_key)
    configure_logging(settings.log_level, secrets=tuple(s for s in secrets if s))
    return COMMANDS[args.command](settings, args)


if __name__ == "__main__":
    sys.exit(main())
