"""``fleetbus-agent``: the agent's command line.

    fleetbus-agent connect --gateway HOST:PORT [--gateway HOST:PORT]... --key-file FILE
                           (--ca FILE | --fingerprint sha256:...)
    fleetbus-agent listen [--bind ADDR] [--port PORT] --key-file FILE [--allow-path PATH]...
                          [--cert FILE --key FILE] [--tls-dir DIR] [--new-cert]

The key comes from ``--key-file`` (which must be readable by its owner only) or the
``FLEETBUS_AGENT_KEY`` environment variable; never from the command line, where any
user could read it in the process list. The variable is taken out of the agent's
environment first thing (:mod:`fleetbus_base.ownenv`), so neither the commands the
agent runs nor ``/proc/<agent pid>/environ`` show it. ``--key`` (listen) is the TLS private key of an
operator-provided certificate, not the server's secret key.

On start, ``listen`` prints two lines to stdout, ``fingerprint sha256:<hex>`` (what
fleetbus must pin) and ``listening on ADDR:PORT`` (the real port when ``--port 0``),
then logs to stderr. Errors are one line, ``fleetbus-agent: error: ...``, exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import stat
import sys
from typing import TYPE_CHECKING, List, Optional

from fleetbus_base.fdbudget import raise_nofile_limit
from fleetbus_base.ownenv import secret, take_secrets
from fleetbus_base.tuning import apply as apply_tuning

from . import DEFAULT_LISTEN_BIND as DEFAULT_BIND
from . import DEFAULT_LISTEN_PORT as DEFAULT_PORT
from . import __version__

if TYPE_CHECKING:
    from .connect import ConnectOptions
    from .listen import ListenOptions, ListenReady
    from .tlsid import TLSIdentity

# Each mode imports its own modules when it starts (connect: the dialler; listen: the
# listener, its TLS identity, throttling and path policy), so neither holds the other's.

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
        key = (secret(KEY_ENV) or "").strip()
        if not key:
            raise UsageError(f"give --key-file FILE or set {KEY_ENV}")
    if not key:
        raise UsageError("the key is empty")
    return key


def parse_gateway(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--gateway must be HOST:PORT, not {value!r}")
    return host.strip("[]"), int(port)


def _terminal_columns() -> int:
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, sized without shutil.

    argparse makes a formatter for every add_argument, and the stock one imports shutil
    (which imports bz2 and lzma) to ask for the terminal width: about half a MiB that
    an agent would hold for as long as it runs, for help it almost never prints.
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: Optional[int] = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         width if width is not None else _terminal_columns() - 2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetbus-agent", description="The fleetbus agent.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fleetbus-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("connect", help="dial out to a fleetbus gateway (outbound agent)",
                       formatter_class=_HelpFormatter)
    c.add_argument("--gateway", required=True, action="append", metavar="HOST:PORT",
                   help="a gateway to dial (repeatable: tried in order, the next when one fails; "
                        "a name is tried at each of its addresses)")
    c.add_argument("--key-file", metavar="FILE", help=f"the server's secret key (else ${KEY_ENV})")
    c.add_argument("--ca", metavar="FILE", help="CA certificate that signed the gateway's certificate")
    c.add_argument("--fingerprint", action="append", metavar="sha256:HEX",
                   help="pin the gateways' CA or one gateway's certificate (repeatable: any matches)")
    c.add_argument("--server-name", metavar="NAME", help="host name to check the certificate against")
    c.add_argument("--source-address", metavar="ADDR",
                   help="local address to dial from (a host with several), else the system's choice")
    c.add_argument("-v", "--verbose", action="count", default=0)
    li = sub.add_parser("listen", help="listen for fleetbus to connect in (inbound agent)",
                        formatter_class=_HelpFormatter)
    li.add_argument("--bind", default=DEFAULT_BIND, metavar="ADDR",
                    help=f"address to listen on (default {DEFAULT_BIND})")
    li.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="PORT",
                    help=f"port to listen on (default {DEFAULT_PORT}; 0 picks a free one)")
    li.add_argument("--key-file", metavar="FILE", help=f"the server's secret key (else ${KEY_ENV})")
    li.add_argument("--allow-path", action="append", default=[], metavar="PATH",
                    help="allow put/get only inside this directory (repeatable; "
                         "does not restrict exec)")
    li.add_argument("--cert", dest="tls_cert", metavar="FILE",
                    help="use this TLS certificate instead of the agent's own")
    li.add_argument("--key", dest="tls_key", metavar="FILE",
                    help="the private key of --cert (unencrypted, or encrypted with the "
                         "password derived from the server key)")
    li.add_argument("--tls-dir", metavar="DIR",
                    help="where the agent keeps its own certificate (default: the key file's directory)")
    li.add_argument("--new-cert", action="store_true",
                    help="make a new certificate (fleetbus must then pin the new fingerprint)")
    li.add_argument("--handshake-timeout", type=float, default=5.0, metavar="SECONDS",
                    help="drop a controller that has not finished TLS and proved the key "
                         "within this time (default 5)")
    li.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    take_secrets()  # before anything can start a thread or a process
    raise_nofile_limit()  # a listening agent faces peers that hold connections open
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "listen":
        return main_listen(args)
    from .connect import ConnectOptions, normalize_fingerprint

    try:
        gateways = [parse_gateway(value) for value in args.gateway]
        pins = args.fingerprint or []
        if not args.ca and not pins:
            raise UsageError("give --ca FILE or --fingerprint sha256:...: the gateway must be verified")
        for pin in pins:
            try:
                normalize_fingerprint(pin)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
        if args.ca and not os.path.exists(args.ca):
            raise UsageError(f"no CA file at {args.ca}")
        (host, port), more = gateways[0], gateways[1:]
        opts = ConnectOptions(host=host, port=port, key=read_key(args.key_file), ca_file=args.ca,
                              fingerprint=pins[0] if pins else None, server_hostname=args.server_name,
                              more_gateways=more, more_fingerprints=pins[1:],
                              source_address=args.source_address)
    except UsageError as exc:
        print(f"fleetbus-agent: error: {exc}", file=sys.stderr)
        return 2
    apply_tuning()  # after the imports above: it trims what compiling them left
    return asyncio.run(_serve(opts))


def _error(message: str) -> int:
    print(f"fleetbus-agent: error: {message}", file=sys.stderr, flush=True)
    return 2


def listen_options(args: argparse.Namespace) -> ListenOptions:
    """Check ``listen``'s arguments; raises :class:`UsageError`."""
    from .listen import ListenOptions

    if not 0 < args.handshake_timeout <= 300:
        raise UsageError("--handshake-timeout must be more than 0 and at most 300 seconds")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be between 0 and 65535, not {args.port}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("give both --cert FILE and --key FILE, or neither")
    if args.tls_cert and args.new_cert:
        raise UsageError("--new-cert makes the agent's own certificate; it cannot be used with --cert/--key")
    for option, path in (("--cert", args.tls_cert), ("--key", args.tls_key)):
        if path and not os.path.isfile(path):
            raise UsageError(f"no {option} file at {path}")
    allow = []
    for path in args.allow_path:
        if not os.path.isabs(path):
            raise UsageError(f"--allow-path must be an absolute path, not {path!r}")
        if not os.path.isdir(path):
            logging.getLogger("fleetbus_agent.cli").warning(
                "--allow-path %s is not an existing directory", path)
        allow.append(path)
    key = read_key(args.key_file)
    tls_dir = args.tls_dir
    if not tls_dir and not args.tls_cert:
        if not args.key_file:
            raise UsageError(f"with the key in ${KEY_ENV}, give --tls-dir DIR: where the agent "
                             "keeps its TLS certificate")
        tls_dir = os.path.dirname(os.path.abspath(args.key_file))
    return ListenOptions(key=key, bind=args.bind, port=args.port, tls_dir=tls_dir,
                         cert_file=args.tls_cert, key_file=args.tls_key, new_cert=args.new_cert,
                         allow_paths=allow, handshake_timeout_s=args.handshake_timeout)


def main_listen(args: argparse.Namespace) -> int:
    from .listen import identity_for
    from .tlsid import TLSIdentityError

    try:
        opts = listen_options(args)
        identity = identity_for(opts)  # may run openssl once, on first start
    except (UsageError, TLSIdentityError) as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return 130
    if identity.created:
        logging.getLogger("fleetbus_agent.cli").info(
            "made a new TLS certificate %s; fleetbus must pin %s", identity.cert_file,
            identity.fingerprint)
    apply_tuning()
    try:
        return asyncio.run(_serve_listen(opts, identity))
    except KeyboardInterrupt:
        return 130


def _print_ready(info: ListenReady) -> None:
    print(f"fingerprint {info.fingerprint}", flush=True)
    print(f"listening on {info.address}", flush=True)


async def _serve_listen(opts: ListenOptions, identity: TLSIdentity) -> int:
    from .listen import run_listen
    from .tlsid import TLSIdentityError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await run_listen(opts, stop, _print_ready, identity=identity)
    except TLSIdentityError as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error(f"cannot listen on {opts.bind}:{opts.port}: {exc.strerror or exc}")
    return 0


async def _serve(opts: ConnectOptions) -> int:
    from .connect import run_connect

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run_connect(opts, stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
