"""``fleetbus-agent``: the agent's command line.

    fleetbus-agent connect --gateway HOST:PORT --key-file FILE (--ca FILE | --fingerprint sha256:...)

The key comes from ``--key-file`` (which must be readable by its owner only) or the
``FLEETBUS_AGENT_KEY`` environment variable; never from the command line, where any
user could read it in the process list.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import stat
import sys
from typing import List, Optional

from . import __version__
from .connect import ConnectOptions, normalize_fingerprint, run_connect

KEY_ENV = "FLEETBUS_AGENT_KEY"


class UsageError(Exception):
    pass


def read_key(path: Optional[str]) -> str:
    if path:
        try:
            info = os.stat(path)
            if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise UsageError(f"{path} is readable by other users; run: chmod 600 {path}")
            with open(path, encoding="utf-8") as fh:
                key = fh.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read the key file {path}: {exc.strerror}") from None
    else:
        key = os.environ.get(KEY_ENV, "").strip()
        if not key:
            raise UsageError(f"give --key-file FILE or set {KEY_ENV}")
    if not key:
        raise UsageError("the key is empty")
    return key


def parse_gateway(value: str) -> "tuple[str, int]":
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--gateway must be HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetbus-agent", description="The fleetbus agent.")
    parser.add_argument("--version", action="version", version=f"fleetbus-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("connect", help="dial out to a fleetbus gateway (outbound agent)")
    c.add_argument("--gateway", required=True, metavar="HOST:PORT")
    c.add_argument("--key-file", metavar="FILE", help=f"the server's secret key (else ${KEY_ENV})")
    c.add_argument("--ca", metavar="FILE", help="CA certificate that signed the gateway's certificate")
    c.add_argument("--fingerprint", metavar="sha256:HEX", help="pin the gateway's certificate")
    c.add_argument("--server-name", metavar="NAME", help="host name to check the certificate against")
    c.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        host, port = parse_gateway(args.gateway)
        if not args.ca and not args.fingerprint:
            raise UsageError("give --ca FILE or --fingerprint sha256:...: the gateway must be verified")
        if args.fingerprint:
            try:
                normalize_fingerprint(args.fingerprint)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if args.ca and not os.path.exists(args.ca):
            raise UsageError(f"no CA file at {args.ca}")
        opts = ConnectOptions(host=host, port=port, key=read_key(args.key_file), ca_file=args.ca,
                              fingerprint=args.fingerprint, server_hostname=args.server_name)
    except UsageError as exc:
        print(f"fleetbus-agent: error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_serve(opts))


async def _serve(opts: ConnectOptions) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run_connect(opts, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
