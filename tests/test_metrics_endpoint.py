"""The /metrics endpoint of a real `fleetbus up` against idle connections: a crowd of
silent ones holds no thread each, cannot keep a scrape out, and is closed."""

from __future__ import annotations

import selectors
import socket
import time
import urllib.parse
import urllib.request
from pathlib import Path

from fleetbus.metrics_http import MetricsHttpSettings
from support.processes import Fleet

IDLE_TIMEOUT_S = MetricsHttpSettings().idle_timeout_s
MAX_CONNECTIONS = MetricsHttpSettings().max_connections


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def scrape(fleet: Fleet) -> str:
    with urllib.request.urlopen(fleet.metrics_url, timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def silent_connections(fleet: Fleet, count: int) -> list[socket.socket]:
    target = urllib.parse.urlsplit(fleet.metrics_url)
    socks = []
    for _ in range(count):
        sock = socket.create_connection((target.hostname, target.port), timeout=10)
        socks.append(sock)
    return socks


def wait_all_closed_by_peer(socks: list[socket.socket], timeout: float) -> int:
    """Wait until the server has closed every socket (EOF or reset); how many it closed."""
    sel = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    closed = 0
    deadline = time.monotonic() + timeout
    try:
        while closed < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                try:
                    data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except (ConnectionResetError, BrokenPipeError):
                    data = b""
                except BlockingIOError:
                    continue
                assert data == b"", "a silent connection got an answer"
                sel.unregister(key.fileobj)
                closed += 1
    finally:
        sel.close()
    return closed


def test_hundreds_of_silent_connections_hold_no_threads_and_keep_no_scrape_out(fleet: Fleet) -> None:
    pid = fleet.proc.pid  # type: ignore[union-attr]
    assert "fleetbus_info" in scrape(fleet)
    before = threads_of(pid)
    socks = silent_connections(fleet, 300)
    try:
        # Held: a real scrape still gets in, and no thread was started for them.
        text = scrape(fleet)
        assert "fleetbus_commands_in_flight" in text
        assert threads_of(pid) <= before + 2
        # Every one of them is closed: the oldest to make room, the rest at the timeout.
        assert wait_all_closed_by_peer(socks, IDLE_TIMEOUT_S + 20) == len(socks)
    finally:
        for sock in socks:
            sock.close()
    assert "fleetbus_info" in scrape(fleet)
    assert threads_of(pid) <= before + 2


def test_a_few_silent_connections_are_closed_after_the_idle_timeout(fleet: Fleet) -> None:
    # Fewer than the cap, so none is dropped to make room: only the timeout closes them.
    socks = silent_connections(fleet, 5)
    assert 5 < MAX_CONNECTIONS
    try:
        assert wait_all_closed_by_peer(socks, IDLE_TIMEOUT_S + 20) == 5
    finally:
        for sock in socks:
            sock.close()


def test_a_slow_request_head_is_served_and_other_paths_and_methods_are_refused(fleet: Fleet) -> None:
    target = urllib.parse.urlsplit(fleet.metrics_url)

    def ask(*parts: bytes) -> bytes:
        chunks = []
        with socket.create_connection((target.hostname, target.port), timeout=10) as sock:
            try:
                for part in parts:
                    sock.sendall(part)
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            except ConnectionResetError:
                pass  # refused with our bytes unread
        return b"".join(chunks)

    answer = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n", b"Accept: */*\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"fleetbus_info" in answer
    assert ask(b"GET /nothing HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
    assert ask(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").startswith(b"HTTP/1.1 405 ")
    assert ask(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n") == b""
