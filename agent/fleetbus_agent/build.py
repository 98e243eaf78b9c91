"""Building the agent into one zipapp file: ``python -m fleetbus_agent.build OUT``."""

from __future__ import annotations

import shutil
import sys
import tempfile
import zipapp
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def build_zipapp(output: Path) -> Path:
    """Write ``output`` (a .pyz) holding the fleetbus_agent package and nothing else."""
    output = output.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "app"
        shutil.copytree(PACKAGE, staging / "fleetbus_agent",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build.py"))
        zipapp.create_archive(staging, output, interpreter="/usr/bin/env python3",
                              main="fleetbus_agent.cli:main", compressed=True)
    return output


if __name__ == "__main__":
    print(build_zipapp(Path(sys.argv[1] if len(sys.argv) > 1 else "fleetbus-agent.pyz")))
