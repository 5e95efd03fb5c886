"""Quick start on a machine with only Python 3.11+: `python3 ops/bootstrap.py up|test [args]`.

Creates the repo's virtualenv (.venv) when missing, installs the project with its dev
extras whenever pyproject.toml changed, then runs `fintide up` or the test suite in it.
Standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import os
import sys

# Run as `python3 ops/bootstrap.py`, this folder is first on sys.path and ops/logging.py
# would shadow the standard library's logging (which venv imports): drop it first.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import hashlib  # noqa: E402
import subprocess  # noqa: E402
import venv  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
STAMP = VENV / ".fintide-installed"
MIN_PYTHON = (3, 11)


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _wanted_stamp() -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    digest.update(sys.version.encode())
    return digest.hexdigest()


def ensure_environment() -> Path:
    if sys.version_info < MIN_PYTHON:
        raise SystemExit(f"Fintide needs Python {'.'.join(map(str, MIN_PYTHON))}+, this is {sys.version.split()[0]}")
    if not _venv_python().exists():
        print(f"creating virtualenv in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    if not STAMP.exists() or STAMP.read_text() != _wanted_stamp():
        print("installing fintide and its dependencies (first run takes a minute)", flush=True)
        pip = [str(_venv_python()), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        subprocess.run(pip + ["--upgrade", "pip"], check=True)
        subprocess.run(pip + ["-e", f"{ROOT}[dev]"], check=True, cwd=ROOT)
        STAMP.write_text(_wanted_stamp())
    return _venv_python()


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "test", "install"):
        print(__doc__)
        return 2
    python = ensure_environment()
    command, rest = argv[0], argv[1:]
    os.chdir(ROOT)
    if command == "install":
        return 0
    if command == "up":
        args = [str(python), "-m", "ops.cli", "up", *rest]
    else:
        args = [str(python), "-m", "pytest", *rest]
    os.execv(args[0], args)
    return 0  # unreachable: execv replaces this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
