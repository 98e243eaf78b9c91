"""Building the agent into one zipapp file: ``python -m fleetbus_agent.build OUT``."""

from __future__ import annotations

import py_compile
import shutil
import sys
import tempfile
import zipapp
from pathlib import Path

PACKAGES = (Path(__file__).resolve().parent, Path(__file__).resolve().parent.parent / "fleetbus_base")
"""What the archive holds: the agent program and the standard-library layer under it."""


def build_zipapp(output: Path) -> Path:
    """Write ``output`` (a .pyz) holding the fleetbus_agent and fleetbus_base packages and nothing else.

    Beside each module's source the archive carries its bytecode for the Python that
    builds it. zipimport never writes bytecode, so without it every start compiles
    every module (slower, and about 1 MiB more resident memory in an idle agent, even
    after the heap is trimmed). The bytecode is unchecked-hash (PEP 552): it does not
    depend on file times in the archive. A Python of another version finds the magic
    number wrong and compiles the source, as before.
    """
    output = output.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "app"
        for package in PACKAGES:
            shutil.copytree(package, staging / package.name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build.py"))
        for source in sorted(staging.rglob("*.py")):
            relative = source.relative_to(staging).as_posix()
            # zipimport looks for module.pyc next to module.py (not in __pycache__).
            py_compile.compile(str(source), cfile=str(source) + "c", dfile=relative, doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        zipapp.create_archive(staging, output, interpreter="/usr/bin/env python3",
                              main="fleetbus_agent.cli:main", compressed=True)
    return output


if __name__ == "__main__":
    print(build_zipapp(Path(sys.argv[1] if len(sys.argv) > 1 else "fleetbus-agent.pyz")))
