"""What keeps the agent's idle memory down: modules each mode needs, loaded when needed.

These check which modules are loaded, not how much memory they take: a memory
threshold would fail on a slower or differently built machine; a module that sneaks
back into the start-up path is a regression on every machine.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from fleetbus_agent import heap, ops

AGENT_ROOT = Path(__file__).resolve().parent.parent / "agent"


def run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter that sees only the agent package."""
    proc = subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(code), str(AGENT_ROOT)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_connect_mode_starts_without_listen_or_file_code() -> None:
    out = run_fresh("""
        import sys
        sys.path.insert(0, sys.argv[1])
        import fleetbus_agent.cli
        import fleetbus_agent.connect
        fleetbus_agent.cli.build_parser().parse_args(["connect", "--gateway", "gw:7443"])
        loaded = set(sys.modules)
        for name in ("fleetbus_agent.listen", "fleetbus_agent.tlsid", "fleetbus_agent.throttle",
                     "fleetbus_agent.paths", "fleetbus_agent.ops.files", "tempfile", "shutil", "lzma"):
            print(name, name in loaded)
    """)
    assert all(line.endswith(" False") for line in out.splitlines()), out


def test_ops_names_load_their_module_on_first_use() -> None:
    out = run_fresh("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from fleetbus_agent import ops
        print("files before", "fleetbus_agent.ops.files" in sys.modules)
        from fleetbus_agent.ops import put_file
        print("files after", "fleetbus_agent.ops.files" in sys.modules)
        print("same", put_file is sys.modules["fleetbus_agent.ops.files"].put_file)
    """)
    assert out.split("\n")[:3] == ["files before False", "files after True", "same True"], out


def test_every_ops_name_resolves() -> None:
    for name in ops.__all__:
        assert getattr(ops, name) is not None, name
    assert set(ops.__all__) <= set(dir(ops))
    try:
        ops.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")


def test_trim_heap_reports_whether_it_can() -> None:
    expected = sys.platform.startswith("linux") and heap._malloc_trim() is not None
    assert heap.trim_heap() is expected
    assert heap.trim_heap() is expected  # the lookup is cached; a second call is the same


def test_compiled_from_source_tells_cached_bytecode_from_a_compile(tmp_path: Path) -> None:
    out = run_fresh(f"""
        import importlib, os, py_compile, sys, time
        sys.path.insert(0, sys.argv[1])
        from fleetbus_agent.heap import compiled_from_source
        sys.path.insert(0, {str(tmp_path)!r})
        with open({str(tmp_path / "fresh.py")!r}, "w") as fh:
            fh.write("X = 1\\n")
        sys.dont_write_bytecode = True
        fresh = importlib.import_module("fresh")  # no bytecode file: compiled
        print("no cache", compiled_from_source(fresh))
        py_compile.compile(fresh.__file__, cfile=fresh.__spec__.cached)
        print("cached", compiled_from_source(fresh))
        print("builtin", compiled_from_source(sys))
    """)
    assert out.splitlines()[:3] == ["no cache True", "cached False", "builtin False"], out


def test_a_refused_path_search_still_checks_the_path(tmp_path: Path) -> None:
    """spawn_error imports shutil only on this path (kept out of an idle agent)."""
    from fleetbus_agent.ops.process import spawn_error

    searched = tmp_path / "bin"
    searched.mkdir()
    (searched / "fb-there").write_text("#!/bin/sh\n")
    (searched / "fb-there").chmod(0o755)
    refused = PermissionError(13, "Permission denied")
    missing = spawn_error(refused, ["fb-not-there"], None, path=str(searched))
    assert (missing.code, missing.message) == ("not_found", "no such file or directory: 'fb-not-there'")
    found = spawn_error(refused, ["fb-there"], None, path=str(searched))
    assert (found.code, found.message) == ("transport_error", "permission denied: 'fb-there'")


def test_agent_help_still_fits_the_terminal() -> None:
    out = subprocess.run([sys.executable, "-I", "-c", textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from fleetbus_agent.cli import build_parser
        build_parser().parse_args(["connect", "--help"])
    """), str(AGENT_ROOT)], capture_output=True, text=True, timeout=60, check=False,
                         env={"COLUMNS": "60"})
    assert out.returncode == 0 and "--fingerprint sha256:HEX" in out.stdout, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 60, out.stdout
