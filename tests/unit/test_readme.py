"""The README is the user's first contact: keep its settings table and commands true."""

from pathlib import Path

import msgspec

from ops.cli import build_parser
from ops.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_documented_in_the_readme():
    missing = [f.name for f in msgspec.structs.fields(Settings) if f"`FINTIDE_{f.name.upper()}`" not in README]
    assert missing == []


def test_every_cli_command_is_documented_in_the_readme():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert [c for c in sub.choices if f"`fintide {c}" not in README] == []


def test_the_quick_start_is_the_ci_command():
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert "python3 ops/bootstrap.py test" in README and "python3 ops/bootstrap.py test" in ci
    assert "python3 ops/bootstrap.py up" in README


def test_the_bootstrap_runs_on_a_bare_python_without_shadowing_the_stdlib():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    # No arguments: prints its usage and exits 2, having imported venv (and so logging).
    out = subprocess.run([sys.executable, str(root / "ops" / "bootstrap.py")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2, out.stderr
    assert "Quick start" in out.stdout
