"""A hostile peer that sends nothing: `flood.py HOST:PORT [options]`, loopback only.

Two kinds of silent TCP connections, neither ever sending a byte:

- ``--rate R --rate-from ADDR --seconds S``: R new connections per second from ADDR for
  S seconds, each kept open until the listener closes it;
- ``--hold N --hold-from A.B.C.D --sources K``: N connections spread over K consecutive
  source addresses from A.B.C.D, kept open; one the listener closes is opened again
  (at most ``--reopen-rate`` per second in all, so the test machine is not saturated).

Prints ``ready`` once the held connections were first opened, and on exit (SIGTERM or
after ``--seconds``) one JSON line of counts. Every source is a 127.x address.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import resource
import selectors
import signal
import socket
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("target")
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--rate-from", default="127.0.0.2")
    parser.add_argument("--hold", type=int, default=0)
    parser.add_argument("--hold-from", default="127.0.0.10")
    parser.add_argument("--sources", type=int, default=1)
    parser.add_argument("--reopen-rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    host, port = args.target.rsplit(":", 1)
    target = (host, int(port))
    for addr in (host, args.rate_from, args.hold_from):
        assert ipaddress.ip_address(addr).is_loopback, f"{addr} is not a loopback address"
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    sel = selectors.DefaultSelector()
    counts = {"opened": 0, "closed_by_listener": 0, "connect_errors": 0}
    held_sources = [str(ipaddress.ip_address(args.hold_from) + i) for i in range(args.sources)]
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    def open_one(source: str, held: bool) -> bool:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((source, 0))
            err = sock.connect_ex(target)
        except OSError:
            sock.close()
            counts["connect_errors"] += 1
            return False
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            counts["connect_errors"] += 1
            return False
        counts["opened"] += 1
        sel.register(sock, selectors.EVENT_READ, (source, held))
        return True

    for i in range(args.hold):
        open_one(held_sources[i % len(held_sources)], True)
    print("ready", flush=True)

    reopen: list[str] = []
    started = time.monotonic()
    sent = 0
    tokens = 0.0
    last = started
    while not stopping:
        now = time.monotonic()
        if now - started >= args.seconds:
            break
        due = int((now - started) * args.rate)
        while sent < due:
            open_one(args.rate_from, False)
            sent += 1
        tokens = min(args.reopen_rate, tokens + (now - last) * args.reopen_rate)
        last = now
        while reopen and tokens >= 1:
            tokens -= 1
            open_one(reopen.pop(), True)
        for key, _ in sel.select(timeout=0.002):
            sock = key.fileobj
            try:
                data = sock.recv(4096)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                continue  # a TLS alert or the like: wait for the close
            source, held = key.data
            sel.unregister(sock)
            sock.close()  # type: ignore[union-attr]
            counts["closed_by_listener"] += 1
            if held:
                reopen.append(source)
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    sys.exit(main())
