#!/usr/bin/env python3
"""One entry point for a fresh checkout: set up .venv/, then run the stack or the tests.

    python3 dev.py up      # set up, then `fleetbus up` on the embedded NATS
    python3 dev.py test    # set up, then the whole test suite
    python3 dev.py bench   # set up, then every benchmark (--quick: under two minutes)

Both are safe to run again: the virtual environment is reused and reinstalled only
when pyproject.toml changes. Only the standard library is used here, because this runs
before anything is installed.

CI (.ci/run) runs the tests twice: as above, and with FLEETBUS_TUNING=off, which turns
off every process tweak and library patch (core/fleetbus/tuning):

    FLEETBUS_TUNING=off python3 dev.py test -q
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".fleetbus-installed"
# One set of extras for every command, so switching between them reinstalls nothing;
# "fast" (uvloop) so the tests cover FLEETBUS_LOOP=uvloop too.
EXTRAS = "test,fast"


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def setup(extras: str) -> Path:
    # This file runs under whatever python3 the reader has, so the check is real.
    if sys.version_info < (3, 11):  # noqa: UP036
        sys.exit(f"fleetbus needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not venv_python().exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    # The editable install maps each top-level package by name, so a package added or
    # moved since the last install needs a new one, as a changed pyproject.toml does.
    packages = sorted(p.parent.relative_to(ROOT).as_posix()
                      for where in ("core", "plugins", "agent") for p in (ROOT / where).glob("*/__init__.py"))
    state = (ROOT / "pyproject.toml").read_bytes() + extras.encode() + "\n".join(packages).encode()
    want = hashlib.sha256(state).hexdigest()
    if not STAMP.exists() or STAMP.read_text().strip() != want:
        print("installing fleetbus and its dependencies into .venv/", flush=True)
        py = str(venv_python())
        subprocess.run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
        target = f".[{extras}]" if extras else "."
        subprocess.run([py, "-m", "pip", "install", "-q", "-e", target], check=True, cwd=ROOT)
        STAMP.write_text(want)
    # An editable install leaves fleetbus's own modules uncompiled, and where
    # PYTHONDONTWRITEBYTECODE is set (as on some CI machines) every start of `fleetbus
    # up` compiled them all again: 180-350 ms of a ~0.7 s start (docs/performance.md).
    # compileall writes bytecode whatever that variable says, and only for changed files.
    subprocess.run([str(venv_python()), "-m", "compileall", "-q", "core", "plugins", "agent"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return venv_python()


# Real servers the test suite runs (it never mocks them): Debian package -> a file it installs.
TEST_SYSTEM_PACKAGES = {
    "openssh-server": "/usr/sbin/sshd",
    "prometheus": "/usr/bin/prometheus",
    # The Node.js worked example of a job (docs/examples/job_example.mjs) runs under them.
    "nodejs": "/usr/bin/node",
    "npm": "/usr/bin/npm",
}


def ensure_system_packages() -> None:
    """Install the real servers the tests need, when missing and when we may (root + apt)."""
    missing = [pkg for pkg, path in TEST_SYSTEM_PACKAGES.items() if not Path(path).exists()]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print(f"note: tests need {', '.join(missing)}; install them (they are skipped or fail without)",
              file=sys.stderr)
        return
    print(f"installing {', '.join(missing)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "help"
    rest = argv[1:]
    if cmd == "setup":
        setup(EXTRAS)
        return 0
    if cmd == "up":
        py = setup(EXTRAS)
        fleetbus = py.parent / "fleetbus"
        os.execv(str(fleetbus), [str(fleetbus), "up", *rest])
    if cmd == "test":
        py = setup(EXTRAS)
        ensure_system_packages()
        return subprocess.call([str(py), "-m", "pytest", *rest], cwd=ROOT)
    if cmd == "bench":
        py = setup(EXTRAS)
        ensure_system_packages()
        return subprocess.call([str(py), str(ROOT / "bench" / "run.py"), *rest], cwd=ROOT)
    print(__doc__)
    return 0 if cmd in ("help", "-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
