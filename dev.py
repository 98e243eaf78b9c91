#!/usr/bin/env python3
"""One entry point for a fresh checkout: set up .venv/, then run the stack or the tests.

    python3 dev.py up      # set up, then `fleetbus up` on the embedded NATS
    python3 dev.py test    # set up, then the whole test suite

Both are safe to run again: the virtual environment is reused and reinstalled only
when pyproject.toml changes. Only the standard library is used here, because this runs
before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".fleetbus-installed"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def setup(extras: str) -> Path:
    if sys.version_info < (3, 11):
        sys.exit(f"fleetbus needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not venv_python().exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()
    if not STAMP.exists() or STAMP.read_text().strip() != want:
        print("installing fleetbus and its dependencies into .venv/", flush=True)
        py = str(venv_python())
        subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        target = f".[{extras}]" if extras else "."
        subprocess.run([py, "-m", "pip", "install", "-q", "-e", target], check=True, cwd=ROOT)
        STAMP.write_text(want)
    return venv_python()


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "help"
    rest = argv[1:]
    if cmd == "setup":
        setup("test")
        return 0
    if cmd == "up":
        py = setup("test")
        fleetbus = py.parent / "fleetbus"
        os.execv(str(fleetbus), [str(fleetbus), "up", *rest])
    if cmd == "test":
        py = setup("test")
        return subprocess.call([str(py), "-m", "pytest", *rest], cwd=ROOT)
    print(__doc__)
    return 0 if cmd in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
