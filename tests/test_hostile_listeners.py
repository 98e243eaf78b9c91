"""Hostile peers at the two listeners fleetbus exposes: the gateway and `fleetbus-agent listen`.

Real processes on loopback, each listener under a descriptor limit of 1,024 (soft and
hard, set in its own process, so raising soft to hard changes nothing): floods of silent
connections from one address and from many (tests/support/flood.py), wrong keys from one
address and from rotating ones, while a real agent, `local` and an inbound agent's
commands must keep working. Figures are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from fleetbus_base import wire as protocol
from fleetbus_base.admission import Gate, GateSettings, HandshakeSlots
from fleetbus_base.fdbudget import FdBudget
from fleetbus_base.throttle import AuthThrottle, FailureLog
from prometheus_client.parser import text_string_to_metric_families
from support import processes
from support.agents import AGENT, Agent, add_agent_server, gateway_of, wait_online
from support.processes import Fleet, stop_process, wait_for

NOFILE = 1024
FLOOD = str(Path(__file__).parent / "support" / "flood.py")
FLOOD_S = 15.0  # the 30 s, halved: the shape (sustained, then over) is what counts
RATE = 300  # silent connections per second from one address
HELD = 2000  # silent connections held from SOURCES addresses
SOURCES = 50


# ----------------------------------------------------------------------------- helpers


def limited(tmp_path: Path, real: str, nofile: int = NOFILE) -> str:
    """A wrapper that runs ``real`` with RLIMIT_NOFILE soft = hard = ``nofile``."""
    wrapper = tmp_path / f"{Path(real).name}-nofile{nofile}"
    wrapper.write_text(
        f"#!{sys.executable}\nimport os, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile}))\n"
        f"os.execv({real!r}, [{real!r}, *sys.argv[1:]])\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def nofile_limits(pid: int) -> tuple[int, int]:
    text = Path(f"/proc/{pid}/limits").read_text()
    soft, hard = re.search(r"Max open files\s+(\d+)\s+(\d+)", text).groups()  # type: ignore[union-attr]
    return int(soft), int(hard)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]


def start_flood(target: str, *, rate: float = 0, seconds: float = FLOOD_S, hold: int = 0,
                sources: int = 1) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, FLOOD, target, "--rate", str(rate), "--seconds", str(seconds),
         "--hold", str(hold), "--sources", str(sources)],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def stop_flood(proc: subprocess.Popen[str]) -> dict[str, int]:
    stop_process(proc)
    assert proc.stdout is not None
    return json.loads(proc.stdout.read().strip().splitlines()[-1])


def metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def client_tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a hostile peer does not care who the gateway is
    return ctx


async def try_hello(address: str, auth: dict[str, Any], source: str) -> str:
    """One agent handshake from ``source``: "welcome", "refused" or "dropped"."""
    host, port = address.rsplit(":", 1)
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            host, int(port), ssl=client_tls(), server_hostname="localhost",
            local_addr=(source, 0)), 10)
    except (TimeoutError, OSError, ssl.SSLError):
        return "dropped"
    try:
        await protocol.agent_handshake(reader, writer, auth, {}, agent="hostile", timeout=10)
        return "welcome"
    except protocol.AuthError:
        return "refused"
    except (TimeoutError, protocol.HandshakeError, OSError, ssl.SSLError):
        return "dropped"
    finally:
        writer.transport.abort()


def wrong_key() -> str:
    return f"fbk1_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}"


# ------------------------------------------------------------------ the gateway, flooded


def test_gateway_flood_a_real_agent_gets_in_and_local_never_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(processes, "FLEETBUS", limited(tmp_path, processes.FLEETBUS))
    stack = Fleet(tmp_path / "home").start()
    flood = agent = None
    try:
        assert stack.proc is not None and nofile_limits(stack.proc.pid) == (NOFILE, NOFILE)
        key = add_agent_server(stack, "real1")
        gw = gateway_of(stack)
        flood = start_flood(gw["address"], rate=RATE, hold=HELD, sources=SOURCES)
        # The flood bites: the gateway is shedding, and holds all it may.
        wait_for(lambda: metric(stack.metrics_url, "fleetbus_gateway_handshakes_dropped_total",
                                reason="shed") > 0, timeout=10, what="the gateway shedding")
        started = time.monotonic()
        agent = Agent(tmp_path / "agent", gw["address"], gw["fingerprint"], key).start()
        wait_for(lambda: "connected to" in agent.log(), timeout=5, what="the real agent in, under the flood")
        connect_s = time.monotonic() - started
        runs, most_fds = [], 0
        while flood.poll() is None:
            runs.append(stack.cli("run", "local", "--", "echo", "ok", timeout=30))
            most_fds = max(most_fds, open_fds(stack.proc.pid))
        through_agent = stack.cli("run", "real1", "--", "echo", "ok", timeout=30)
        counts = stop_flood(flood)
        flood = None
        print(f"\nreal agent connected {connect_s:.2f} s after it started, under the flood; "
              f"{len(runs)} `run local` during it; at most {most_fds} descriptors open of {NOFILE}; "
              f"flood {counts}")
        assert len(runs) >= 3
        assert [(r.returncode, r.stdout) for r in runs] == [(0, "ok\n")] * len(runs), \
            [r.stderr for r in runs if r.returncode]
        assert (through_agent.returncode, through_agent.stdout) == (0, "ok\n"), through_agent.stderr
        assert most_fds < NOFILE - 100  # the reserve was kept
        assert counts["closed_by_listener"] > RATE * FLOOD_S / 2
        output = stack.output()
        assert "Too many open files" not in output and "Traceback" not in output
        # Shed, not just timed out: every kind of drop is counted by reason.
        assert metric(stack.metrics_url, "fleetbus_gateway_handshakes_dropped_total", reason="source_cap") \
            + metric(stack.metrics_url, "fleetbus_gateway_handshakes_dropped_total", reason="silent") > 0
    finally:
        if flood is not None:
            stop_process(flood)
        if agent is not None:
            agent.stop()
        stack.stop()


# ------------------------------------------------------------- the gateway, wrong keys


def test_wrong_keys_neither_lock_out_a_nat_neighbour_nor_pass_from_rotating_addresses(tmp_path: Path) -> None:
    stack = Fleet(tmp_path / "home", extra_args=[
        "--transport-setting", "agent-outbound.auth_log_interval_s=2"]).start()
    try:
        key = add_agent_server(stack, "nat1")
        key_id = key.split("_")[1]
        address = gateway_of(stack)["address"]
        good = {"method": "key", "key": key}

        async def attack() -> dict[str, Any]:
            # 1,000 wrong keys from one address (a NAT neighbour's mistakes, or worse),
            # 16 at a time, with garbage and another auth method among them.
            sem = asyncio.Semaphore(16)

            async def one(i: int) -> str:
                auth = ({"method": "password", "password": "x"} if i % 50 == 0 else
                        {"method": "key", "key": "garbage"} if i % 50 == 1 else
                        {"method": "key", "key": wrong_key()})
                async with sem:
                    return await try_hello(address, auth, "127.0.0.5")

            neighbour = await asyncio.gather(*(one(i) for i in range(1000)))
            # The right key from behind the same address still gets in.
            behind_nat = await try_hello(address, good, "127.0.0.5")
            # An address that proved the key before the next attack stays trusted.
            trusted = await try_hello(address, good, "127.0.0.6")
            # 300 guesses at this server's key from rotating addresses.
            rotating = []
            for i in range(300):
                guess = {"method": "key", "key": f"fbk1_{key_id}_{secrets.token_urlsafe(32)}"}
                rotating.append(await try_hello(address, guess, f"127.0.1.{1 + i % 250}"))
            fresh = await try_hello(address, good, "127.0.2.1")
            again = await try_hello(address, good, "127.0.0.6")
            return {"neighbour": neighbour, "behind_nat": behind_nat, "trusted": trusted,
                    "rotating": rotating, "fresh": fresh, "again": again}

        started = time.monotonic()
        result = asyncio.run(attack())
        took = time.monotonic() - started
        neighbour = result["neighbour"]
        print(f"\n1,000 wrong keys from one address: {neighbour.count('refused')} refused at the hello, "
              f"{neighbour.count('dropped')} dropped at admission (penalised address); 300 rotating "
              f"guesses: {result['rotating'].count('refused')} refused; {took:.1f} s")
        assert "welcome" not in neighbour and "welcome" not in result["rotating"]
        assert result["behind_nat"] == "welcome"
        assert result["trusted"] == "welcome" and result["again"] == "welcome"
        assert result["fresh"] == "refused"  # the key id is locked for addresses it never came from
        url = stack.metrics_url
        # Most of the 1,000 never reach a hello once the address is penalised (dropped at
        # admission); of those that do, every kind is counted.
        assert metric(url, "fleetbus_auth_failures_total", reason="bad_method") > 0
        assert metric(url, "fleetbus_auth_failures_total", reason="unknown_key") >= 20 + 20
        # Past the per-key budget, rotating guesses were refused unchecked.
        assert metric(url, "fleetbus_auth_failures_total", reason="locked_out") >= 300 - 40
        assert metric(url, "fleetbus_gateway_handshakes_dropped_total", reason="source_cap") > 0
        # Logged in aggregate: no line per attempt, and never a key.
        wait_for(lambda: "more failed agent authentications from 127.0.0.5" in stack.output(),
                 timeout=10, what="the summary line")
        lines = [line for line in stack.output().splitlines() if "agent authentication" in line]
        intervals = took / 2 + 2  # auth_log_interval_s=2 above
        # At most 20 first-failure or lockout lines and 21 summaries per interval in all;
        # for one address, at most a first line, a lockout line and a summary.
        assert len(lines) <= intervals * 41, len(lines)
        assert len([line for line in lines if "from 127.0.0.5 " in line]) <= intervals * 3
        assert key not in stack.output() and key_id not in "\n".join(lines)
    finally:
        stack.stop()


# ---------------------------------------------------------- the listening agent, flooded


def test_listening_agent_flood_commands_keep_working_and_memory_returns(tmp_path: Path) -> None:
    stack = Fleet(tmp_path / "home").start()
    workdir = tmp_path / "listen"
    workdir.mkdir()
    key = secrets.token_urlsafe(32)
    key_file = workdir / "key"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, key.encode())
    os.close(fd)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
    log_path, out = workdir / "agent.log", workdir / "agent.out"
    with open(log_path, "ab") as log, open(out, "wb") as stdout:
        listener = subprocess.Popen(
            [limited(tmp_path, AGENT), "listen", "--bind", "127.0.0.1", "--port", "0",
             "--key-file", str(key_file)], stdout=stdout, stderr=log, stdin=subprocess.DEVNULL, env=env)
    flood = None
    try:
        def ready() -> tuple[int, str] | None:
            text = out.read_text()
            fp = re.search(r"fingerprint (sha256:[0-9a-f]{64})", text)
            port = re.search(r"listening on [^\s]*:(\d+)", text)
            return (int(port.group(1)), fp.group(1)) if fp and port else None

        port, fingerprint = wait_for(ready, what="the agent listening")
        assert nofile_limits(listener.pid) == (NOFILE, NOFILE)
        added = stack.cli("servers", "add", "in1", "--transport", "agent-inbound", "--host", "127.0.0.1",
                          "--port", str(port), "--fingerprint", fingerprint, input=key.encode())
        assert added.returncode == 0, added.stderr
        wait_online(stack, "in1")
        before = rss_mib(listener.pid)

        async def new_controller() -> float:
            """A controller connecting afresh, as a worker does after a restart: seconds to welcome."""
            started = time.monotonic()
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=client_tls(), server_hostname="localhost"), 10)
            await protocol.controller_connect_handshake(
                reader, writer, key=key, agent_fingerprint=fingerprint, server="in1", timeout=10)
            writer.transport.abort()
            return time.monotonic() - started

        flood = start_flood(f"127.0.0.1:{port}", rate=RATE, hold=HELD + 1000, sources=SOURCES)
        wait_for(lambda: open_fds(listener.pid) > 200,  # MAX_UNAUTHENTICATED of listen.py: 256
                 timeout=10, what="the flood biting")
        runs, joins, peak = [], [], 0.0
        while flood.poll() is None:
            runs.append(stack.cli("run", "in1", "--", "echo", "ok", timeout=30))
            joins.append(asyncio.run(new_controller()))
            peak = max(peak, rss_mib(listener.pid))
        counts = stop_flood(flood)
        flood = None
        assert len(runs) >= 3
        assert [(r.returncode, r.stdout) for r in runs] == [(0, "ok\n")] * len(runs), \
            [r.stderr for r in runs if r.returncode]
        assert max(joins) < 5
        # Memory comes back once the flood is over (the heap is trimmed after accepts).
        settled = wait_for(lambda: (rss := rss_mib(listener.pid)) < before + 20 and rss,
                           timeout=30, what="the listening agent's memory to come back")
        text = log_path.read_text()
        print(f"\nlistening agent: {len(runs)} commands and {len(joins)} new controllers during the flood "
              f"(slowest welcome {max(joins):.2f} s); RSS {before:.0f} MiB before, {peak:.0f} at most, "
              f"{settled:.0f} after; log {len(text)} bytes; flood {counts}")
        assert "Traceback" not in text and "Too many open files" not in text
        # A handful of lines beside the test's own controllers, not one per flood connection.
        other = [line for line in text.splitlines() if "controller connected from" not in line
                 and "disconnected:" not in line]
        assert len(other) < 30, other[:40]
    finally:
        if flood is not None:
            stop_process(flood)
        stop_process(listener)  # type: ignore[arg-type]
        stack.stop()


# ------------------------------------------------------------------ the parts, alone


async def test_a_new_address_goes_before_a_flooding_one() -> None:
    admission = HandshakeSlots(1)
    assert await admission.take(30, "flood") == ""
    flood = [asyncio.ensure_future(admission.take(30, "flood")) for _ in range(100)]
    await asyncio.sleep(0)
    agent = asyncio.ensure_future(admission.take(30, "agent"))
    await asyncio.sleep(0)
    admission.release()
    await asyncio.sleep(0)
    assert agent.done() and agent.result() == ""  # one slot's wait, not a place behind 100
    assert sum(f.done() for f in flood) == 0
    admission.release()
    await asyncio.sleep(0)
    assert flood[-1].done()  # within one address the newest goes first
    for f in flood:
        f.cancel()
    await asyncio.gather(*flood, return_exceptions=True)


async def test_a_newcomer_evicts_from_the_heaviest_address_when_the_gate_is_full() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    handshakes: list[str] = []
    dropped: list[str] = []

    async def handshake(sock: socket.socket, source: str, deadline: float) -> None:
        handshakes.append(source)
        sock.close()

    async def serve(_: object) -> None:
        raise AssertionError("no handshake succeeds here")

    gate: Gate[None] = Gate(listener, GateSettings(max_unauthenticated=4, silent_s=30), handshake,
                            serve, log=logging.getLogger("test.gate"), dropped=dropped.append)
    gate.start()
    loop = asyncio.get_running_loop()
    silent = []
    try:
        for _ in range(4):  # silent: they wait for a first byte, holding every place
            sock = socket.socket()
            sock.setblocking(False)
            sock.bind(("127.0.0.2", 0))
            await loop.sock_connect(sock, ("127.0.0.1", port))
            silent.append(sock)
        deadline = loop.time() + 5
        while gate.unauthenticated < 4:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        newcomer = socket.socket()
        newcomer.setblocking(False)
        newcomer.bind(("127.0.0.3", 0))
        await loop.sock_connect(newcomer, ("127.0.0.1", port))
        await loop.sock_sendall(newcomer, b"\x16")
        while not handshakes:
            assert loop.time() < deadline, dropped
            await asyncio.sleep(0.01)
        assert handshakes == ["127.0.0.3"] and dropped == ["shed"]
        assert gate.unauthenticated == 3  # the evicted one and the newcomer are gone
        newcomer.close()
    finally:
        for sock in silent:
            sock.close()
        await gate.aclose()


async def test_a_connection_accepted_in_the_same_batch_can_be_evicted() -> None:
    # All three wait in the kernel's backlog and are accepted in one wake-up, before any
    # of their tasks has run: the newcomer still gets its place, and the socket of the
    # evicted connection (whose task never runs) is closed.
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    dropped: list[str] = []

    async def never(*_: object) -> None:
        raise AssertionError("nobody sends a byte here")

    loop = asyncio.get_running_loop()
    clients = []
    for source in ("127.0.0.2", "127.0.0.2", "127.0.0.3"):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        await loop.sock_connect(sock, listener.getsockname())
        clients.append(sock)
    gate: Gate[None] = Gate(listener, GateSettings(max_unauthenticated=2, silent_s=30), never, never,
                            log=logging.getLogger("test.gate"), dropped=dropped.append)
    gate.start()
    try:
        deadline = loop.time() + 5
        while gate.accepted < 3:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert dropped == ["shed"] and gate.unauthenticated == 2
        assert await asyncio.wait_for(loop.sock_recv(clients[0], 1), 5) == b""  # the oldest, evicted
        with pytest.raises(asyncio.TimeoutError):  # the newcomer is held
            await asyncio.wait_for(loop.sock_recv(clients[2], 1), 0.2)
    finally:
        for sock in clients:
            sock.close()
        await gate.aclose()


async def test_the_gate_stops_accepting_at_the_descriptor_reserve_and_resumes() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    handshakes: list[str] = []

    async def handshake(sock: socket.socket, source: str, deadline: float) -> None:
        handshakes.append(source)
        sock.close()

    async def serve(_: object) -> None:
        raise AssertionError("no handshake succeeds here")

    room = [0]  # descriptors left before the reserve
    budget = FdBudget(limit=1024, counter=lambda: 1024 - 256 - room[0], sample_s=0)
    gate: Gate[None] = Gate(listener, GateSettings(), handshake, serve,
                            log=logging.getLogger("test.gate"), budget=budget)
    gate.start()
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    try:
        await loop.sock_connect(client, listener.getsockname())
        await loop.sock_sendall(client, b"\x16")
        deadline = loop.time() + 5
        while not gate.paused:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert gate.accepted == 0 and not handshakes  # left in the kernel's backlog
        room[0] = 500
        while not handshakes:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert handshakes == ["127.0.0.1"] and not gate.paused
    finally:
        client.close()
        await gate.aclose()


def test_auth_throttle_by_key_id_and_by_address() -> None:
    now = [0.0]
    throttle = AuthThrottle(clock=lambda: now[0])
    for _ in range(1000):  # the NAT neighbour's wrong keys, each with its own key id
        throttle.failure("10.0.0.1", secrets.token_hex(8))
    assert throttle.penalised("10.0.0.1")
    assert not throttle.locked("10.0.0.1", "goodkeyid")  # the right key is still checked
    for _ in range(5):  # one address guessing one key: that pair is locked
        throttle.failure("10.0.0.2", "goodkeyid")
    assert throttle.locked("10.0.0.2", "goodkeyid")
    throttle.success("10.0.0.3", "goodkeyid")
    for i in range(300):  # rotating addresses guessing one key
        throttle.failure(f"10.1.{i // 250}.{i % 250}", "goodkeyid")
    assert throttle.locked("10.9.9.9", "goodkeyid")
    assert not throttle.locked("10.0.0.3", "goodkeyid")  # proved it before: trusted
    assert not throttle.locked("10.9.9.9", "otherkeyid")
    now[0] += 2000
    assert not throttle.locked("10.9.9.9", "goodkeyid")


def test_failures_are_logged_in_aggregate(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.failures")
    failures = FailureLog(log, "agent authentication", "agent authentications", interval_s=60)
    with caplog.at_level(logging.WARNING, logger="test.failures"):
        for i in range(1000):
            failures.note("10.0.0.1", "unknown_key", locked=i == 4)
        for i in range(500):
            failures.note(f"10.2.{i // 250}.{i % 250}", "bad_method")
        assert len(caplog.records) == failures.max_immediate  # 2 for 10.0.0.1, 18 rotating
        caplog.clear()
        failures.flush()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "998 more failed agent authentications from 10.0.0.1 in the last 60 s (unknown_key 998)"
    assert len(lines) == failures.max_itemised + 1
    assert lines[-1] == ("463 more failed agent authentications from 463 other addresses "
                         "in the last 60 s (bad_method 463)")


def test_fd_budget_keeps_a_reserve() -> None:
    open_now = [100]
    budget = FdBudget(limit=1024, counter=lambda: open_now[0], clock=lambda: 0.0, sample_s=1.0)
    assert budget.reserve == 256
    assert budget.room() == 1024 - 256 - 100
    budget.took(10)
    assert budget.room() == 1024 - 256 - 110
    assert FdBudget(limit=100, counter=lambda: 0).reserve == 50  # never more than half


def test_raise_nofile_limit_raises_soft_to_hard() -> None:
    code = ("import resource; from fleetbus_base.fdbudget import raise_nofile_limit; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096)); print(raise_nofile_limit())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "(4096, 4096)"
