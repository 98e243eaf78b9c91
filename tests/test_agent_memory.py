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

import pytest
from fleetbus_base import heap, ops, tuning

AGENT_ROOT = Path(__file__).resolve().parent.parent / "agent"


def run_fresh(code: str, *args: str) -> str:
    """Run ``code`` in a new interpreter that sees only the agent package (``-I -S``, as
    ops/systemd runs the agent); ``sys.argv[1]`` is the package's directory."""
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", textwrap.dedent(code), str(AGENT_ROOT), *args],
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
        for name in ("fleetbus_agent.listen", "fleetbus_agent.tlsid", "fleetbus_base.throttle",
                     "fleetbus_agent.paths", "fleetbus_base.ops.files", "tempfile", "shutil", "lzma"):
            print(name, name in loaded)
    """)
    assert all(line.endswith(" False") for line in out.splitlines()), out


def test_a_connected_agent_carries_no_module_it_needs_once() -> None:
    """platform (three strings for the facts), random (one jitter per reconnect), the
    idna codec (ssl's encoding of a str server name: unicodedata and stringprep) and
    ctypes (one malloc_trim call) each stayed in every idle agent for good."""
    out = run_fresh("""
        import ssl, sys
        sys.path.insert(0, sys.argv[1])
        from fleetbus_base import heap
        from fleetbus_agent.connect import ConnectOptions, _jitter, _sni_name, client_context
        from fleetbus_base.ops.facts import server_facts
        server_facts()
        _jitter()
        heap.trim_heap()
        ctx = client_context(ConnectOptions("gw.example.com", 7443, "k", fingerprint="sha256:" + "0" * 64))
        ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=_sni_name("gw.example.com"))
        for name in ("platform", "random", "encodings.idna", "unicodedata", "ctypes"):
            print(name, name in sys.modules)
    """)
    assert out.split() == ["platform", "False", "random", "False", "encodings.idna", "False",
                           "unicodedata", "False", "ctypes", "False"], out


def test_the_server_name_is_what_idna_would_send() -> None:
    from fleetbus_agent.connect import _sni_name

    for name in ("gw.example.com", "127.0.0.1", "Gateway-1.example.org"):
        assert _sni_name(name) == name.encode("idna")
    assert _sni_name("bücher.example") == "bücher.example"  # non-ASCII: left to ssl's IDNA


def test_the_reconnect_jitter_stays_in_its_range() -> None:
    from fleetbus_agent.connect import _jitter

    draws = [_jitter() for _ in range(2000)]
    assert all(0.5 <= d < 1.0 for d in draws)
    assert max(draws) - min(draws) > 0.4  # spread, not a constant


def test_the_backoff_spreads_over_its_whole_range() -> None:
    from fleetbus_agent.connect import ConnectOptions, backoff_delay

    opts = ConnectOptions(host="gw", port=1, key="k", backoff_min_s=0.5, backoff_max_s=30.0)
    assert all(0.25 <= backoff_delay(opts, 0) < 0.5 for _ in range(200))  # jittered from the first
    draws = [backoff_delay(opts, 10) for _ in range(4000)]  # the ceiling reached: 30 s
    assert all(0.25 <= d < 30.0 for d in draws)
    # The whole range, not its upper half: a storm's agents come back at an even pace.
    assert sum(d < 15.0 for d in draws) > 1500 and sum(d < 7.5 for d in draws) > 700
    assert all(0.25 <= backoff_delay(opts, 3) < 4.0 for _ in range(200))  # 0.5 s doubled three times


def test_the_zipapp_runs_from_its_own_bytecode(tmp_path: Path) -> None:
    from fleetbus_agent.build import build_zipapp

    pyz = build_zipapp(tmp_path / "agent.pyz")
    out = run_fresh("""
        import sys
        sys.path.insert(0, sys.argv[2])
        import fleetbus_base.wire as protocol
        from fleetbus_base.heap import compiled_from_source
        print(protocol.__file__.endswith(".pyc"), compiled_from_source(protocol))
    """, str(pyz))
    assert out.split() == ["True", "False"], out


def test_a_zipapp_from_another_python_compiles_its_sources(tmp_path: Path) -> None:
    """Bytecode whose magic number is not this Python's (another version built the
    archive) is skipped: the module compiles from the source beside it."""
    import zipfile

    from fleetbus_agent.build import build_zipapp

    built = build_zipapp(tmp_path / "built.pyz")
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(built) as src, zipfile.ZipFile(foreign, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(".pyc"):
                data = b"\x00\x00" + data[2:]  # no Python's magic number
            dst.writestr(item, data)
    out = run_fresh("""
        import sys
        sys.path.insert(0, sys.argv[2])
        import fleetbus_base.wire as protocol
        from fleetbus_base.heap import compiled_from_source
        print(protocol.__file__.endswith(".py"), compiled_from_source(protocol), protocol.DEFAULT_HEARTBEAT_S)
    """, str(foreign))
    assert out.split() == ["True", "True", "5.0"], out


def test_ops_names_load_their_module_on_first_use() -> None:
    out = run_fresh("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from fleetbus_base import ops
        print("files before", "fleetbus_base.ops.files" in sys.modules)
        from fleetbus_base.ops import put_file
        print("files after", "fleetbus_base.ops.files" in sys.modules)
        print("same", put_file is sys.modules["fleetbus_base.ops.files"].put_file)
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
    # FLEETBUS_TUNING=off turns the heap policy off, trimming included.
    expected = tuning.enabled() and sys.platform.startswith("linux") and heap._malloc_trim() is not None
    assert heap.trim_heap() is expected
    assert heap.trim_heap() is expected  # the lookup is cached; a second call is the same


def test_keep_large_buffers_stops_a_page_fault_per_page_of_each_chunk() -> None:
    """The reason keep_large_buffers exists: with a few 1 MiB buffers in flight, glibc
    hands the freed ones back (mmap, or a trimmed heap top) and faults every page of the
    next ones in again."""
    out = run_fresh("""
        import resource, sys
        sys.path.insert(0, sys.argv[1])
        from fleetbus_base import heap

        def faults_per_chunk():
            # A window's worth of chunks in flight, then gone, as a transfer moves them.
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for i in range(10):
                window = [bytes([i]) * (1024 * 1024) for _ in range(6)]  # written through
                del window
            return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 60

        plain = faults_per_chunk()
        kept = heap.keep_large_buffers()
        faults_per_chunk()  # the heap grows to its working size once
        print(plain, kept, faults_per_chunk(), heap.keep_large_buffers())
    """)
    plain, kept, after, again = out.split()
    if kept == "False":
        assert not heap.trim_heap()  # only a C library without mallopt may refuse
        return
    assert float(plain) > 100, out  # 256 pages per MiB, one fault each (or nearly)
    assert float(after) < 10, out
    assert again == "True"


def test_transfer_heap_tunes_for_large_transfers_and_trims_after_the_last(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(heap, "keep_large_buffers", lambda: calls.append("keep"))
    monkeypatch.setattr(heap, "trim_heap", lambda: calls.append("trim"))
    transfers = heap.TransferHeap()
    with transfers.transfer(1024), transfers.transfer(None):
        pass
    assert calls == []  # small or unknown sizes leave the heap alone
    with transfers.transfer(heap.LARGE_TRANSFER):
        with transfers.transfer(10 * heap.LARGE_TRANSFER):
            pass
        assert calls == ["keep", "keep"]  # no trim while a transfer is still running
    assert calls == ["keep", "keep", "trim"]
    with pytest.raises(RuntimeError), transfers.transfer(heap.LARGE_TRANSFER):
        raise RuntimeError("a failed transfer ends too")
    assert calls[-1] == "trim"


def test_compiled_from_source_tells_cached_bytecode_from_a_compile(tmp_path: Path) -> None:
    out = run_fresh(f"""
        import importlib, os, py_compile, sys, time
        sys.path.insert(0, sys.argv[1])
        from fleetbus_base.heap import compiled_from_source
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
    from fleetbus_base.ops.process import spawn_error

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
