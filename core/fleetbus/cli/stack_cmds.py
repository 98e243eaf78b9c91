"""``fleetbus up|core|worker``: the long-running processes."""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .. import __version__, tuning
from ..errors import FleetbusError
from ..home import Home
from .context import Globals, choose_event_loop, fail, parse_options, pass_globals, run_async
from .extend import flag_values, registry, takes_plugin_flags

if TYPE_CHECKING:
    from ..natsaccounts import SharedUsers


def _logging(verbose: int) -> None:
    loop = choose_event_loop()
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 2:
        logging.getLogger("nats").setLevel(logging.CRITICAL)
        # Client libraries that log what their transport reports itself (fleetbus_cli hook).
        for name in registry().quiet_loggers:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("fleetbus").info("event loop: %s", loop)
    applied = tuning.apply(tuning.SERVER)  # after the loop policy is chosen: it may patch it
    logging.getLogger("fleetbus").info("tuning: %s", ", ".join(applied) or f"none ({tuning.ENV}=off)")


def _transports(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def _days(days: float | None) -> float | None:
    return None if days is None else days * 86400.0


def _metrics(addr: str) -> str | None:
    return None if addr.strip().lower() in ("", "off", "none") else addr


def _settings(command: str, pairs: tuple[str, ...]) -> dict[str, dict[str, object]]:
    """Per-transport settings: every --transport-setting T.KEY=VALUE, then the settings
    flags transports add to ``command`` (``--gateway-listen``: they win over the same key)."""
    out: dict[str, dict[str, object]] = {}
    for name, value in parse_options(pairs).items():
        transport, dot, key = name.partition(".")
        if not dot or not transport or not key:
            raise click.BadParameter(f"{name!r} is not TRANSPORT.KEY", param_hint="--transport-setting")
        out.setdefault(transport, {})[key] = value
    for transport, values in registry().settings_from_flags(command, flag_values()).items():
        out.setdefault(transport, {}).update(values)
    return out


def replicas_option(fn):  # type: ignore[no-untyped-def]
    """``--replicas N`` / FLEETBUS_REPLICAS, the same on every process that may create state."""
    return click.option(
        "--replicas", type=click.IntRange(1, 5), envvar="FLEETBUS_REPLICAS", default=None,
        help="JetStream replicas for fleetbus's state (env FLEETBUS_REPLICAS; default: 3 on a "
             "NATS cluster of 3 or more servers, else 1). State found with fewer is warned about; "
             "`fleetbus admin migrate` changes it.")(fn)


def _secure(home: Home) -> None:
    """Take secrets out of the environment and close the home folder, before anything
    else runs (:func:`fleetbus.stack.secure_process_start`); a problem is one line."""
    from ..stack import secure_process_start

    try:
        secure_process_start(home)
    except FleetbusError as exc:
        fail(exc.message)


def _reply_prefixes(own_prefix: str) -> tuple[str, ...]:
    """FLEETBUS_REPLY_PREFIXES (comma-separated), else _INBOX. (docs/bus-api.md, "Reply subjects")."""
    from ..subjects import ENV_REPLY_PREFIXES, ReplySubjects

    try:
        return ReplySubjects.parse(os.environ.get(ENV_REPLY_PREFIXES), own_prefix).prefixes
    except FleetbusError as exc:
        fail(f"{ENV_REPLY_PREFIXES}: {exc.message}")


def _shared_users(users_file: str | None, pid_file: str | None, config: str | None) -> SharedUsers | None:
    """The core's --nats-users-file, --nats-pid-file and --nats-config, checked together."""
    from ..natsaccounts import SharedUsers

    if users_file is None:
        if pid_file is not None or config is not None:
            fail("--nats-pid-file and --nats-config go with --nats-users-file")
        return None
    if pid_file is None:
        fail("--nats-users-file needs --nats-pid-file: the pid of the nats-server to make re-read it")
    return SharedUsers(Path(users_file).expanduser().absolute(), Path(pid_file).expanduser().absolute(),
                       Path(config).expanduser().absolute() if config else None)


def _say(text: str) -> None:
    click.echo(text, err=False)
    sys.stdout.flush()


@click.command("up")
@click.option("--nats-host", default="127.0.0.1", show_default=True, help="Address the embedded NATS listens on.")
@click.option("--nats-port", type=click.IntRange(0, 65535), default=4222, show_default=True,
              help="Port of the embedded NATS (0: any free port).")
@click.option("--transports", help="Comma-separated transports to serve (default: all installed).")
@click.option("--transport-setting", "transport_settings", multiple=True, metavar="TRANSPORT.KEY=VALUE",
              help="A transport setting, e.g. NAME.idle_timeout_s=60 (repeatable); checked at start.")
@click.option("--metrics-addr", default="127.0.0.1:9464", show_default=True, metavar="HOST:PORT",
              help="Serve Prometheus metrics here (port 0: any free port; 'off' to disable).")
@click.option("--check-interval", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds between server checks (0 disables them).")
@click.option("--check-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds a server check waits for the server's answer.")
@click.option("--job-retention", type=click.FloatRange(min=0.01), metavar="DAYS",
              help="Days job records are kept (default: as set before, else 30).")
@replicas_option
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@pass_globals
def up(g: Globals, nats_host: str, nats_port: int, transports: str | None,
       transport_settings: tuple[str, ...], metrics_addr: str,
       check_interval: float, check_timeout: float, job_retention: float | None, replicas: int | None,
       verbose: int) -> None:
    """Start everything on this machine: NATS (unless --nats), the core and every transport."""
    from ..host import HostSettings  # the stack is heavy; `fleetbus run` never needs it
    from ..stack import StackOptions, ensure_local_server, start_stack, wait_for_signal

    _logging(verbose)
    home = g.home_dir()
    _secure(home)
    opts = StackOptions(home=home, nats_url=g.nats, nats_host=nats_host, nats_port=nats_port,
                        prefix=g.prefix, transports=_transports(transports), replicas=replicas,
                        nats_creds=g.nats_creds, nats_context=g.nats_context,
                        host_settings=HostSettings(transport_settings=_settings("up", transport_settings),
                                                   reply_prefixes=_reply_prefixes(g.prefix)),
                        metrics_addr=_metrics(metrics_addr), check_interval_s=check_interval,
                        check_timeout_s=check_timeout, job_retention_s=_days(job_retention))

    async def main() -> None:
        started = time.monotonic()
        async with AsyncExitStack() as stack:
            home.ensure()
            external = g.nats is not None or g.nats_context is not None
            running = await start_stack(opts, stack, embedded_nats=not external, core=True, worker=True)
            stack.callback(home.clear_run)
            added = await ensure_local_server(running.state, running.host)
            metrics_url = running.metrics_server.url if running.metrics_server else None
            served = ", ".join(running.host.transports) if running.host and running.host.transports else "none"
            _say(f"fleetbus {__version__} is up in {time.monotonic() - started:.2f} s")
            _say(f"  nats      {running.nats_shown}" + (" (embedded; user owner, its password the token)" if running.embedded
                                                     else f" (replicas {running.replicas})"))
            _say(f"  home      {home.path}")
            if running.embedded:
                _say(f"  data      {home.nats_data}")
                _say(f"  nats log  {running.embedded.log_path}")
            _say(f"  metrics   {metrics_url or 'off'}")
            _say(f"  serving   {served}")
            for transport in (running.host.transports.values() if running.host else ()):
                for label, text in transport.describe():
                    _say(f"  {label:<9} {text}")
            _say("  server 'local' registered" if added else "  server 'local' already registered")
            _say("try: fleetbus run local -- uname -a      (Ctrl-C stops fleetbus)")
            # Names and paths only: the CLI finds a token in its own environment or file.
            # Written last, so whoever waits for it (a script, a test) also has the lines above.
            home.write_run({"nats_url": running.nats_url, "prefix": running.names.prefix,
                            "embedded": running.embedded is not None, "version": __version__,
                            "metrics_url": metrics_url, "nats_context": g.nats_context,
                            "nats_creds": g.nats_creds, "replicas": running.replicas})
            await wait_for_signal(lambda name: _say(f"\nfleetbus: {name} received, shutting down"))
        _say("fleetbus stopped")

    run_async(main)


@click.command("core")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@replicas_option
@click.option("--metrics-addr", default="off", show_default=True, metavar="HOST:PORT",
              help="Serve Prometheus metrics here ('off' to disable).")
@click.option("--check-interval", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds between server checks (0 disables them).")
@click.option("--check-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds a server check waits for the server's answer.")
@click.option("--job-retention", type=click.FloatRange(min=0.01), metavar="DAYS",
              help="Days job records are kept (default: as set before, else 30).")
@click.option("--nats-users-file", type=click.Path(dir_okay=False), metavar="PATH",
              help="Keep this nats-server's users file (the one `fleetbus nats accounts` names) equal "
                   "to fleetbus's users and make the server re-read it (needs --nats-pid-file).")
@click.option("--nats-pid-file", type=click.Path(dir_okay=False), metavar="PATH",
              help="The pid_file of the nats-server that --nats-users-file is for (SIGHUP reloads it).")
@click.option("--nats-config", type=click.Path(dir_okay=False), metavar="PATH",
              help="That nats-server's config, checked with `nats-server -t` before each reload.")
@pass_globals
def core(g: Globals, verbose: int, replicas: int | None, metrics_addr: str, check_interval: float,
         check_timeout: float, job_retention: float | None, nats_users_file: str | None,
         nats_pid_file: str | None, nats_config: str | None) -> None:
    """Run the core alone (admin API, vault, registry) against a shared NATS."""
    from ..host import HostSettings
    from ..stack import StackOptions, start_stack, wait_for_signal

    _logging(verbose)
    _secure(g.home_dir())
    opts = StackOptions(home=g.home_dir(), nats_url=g.nats, prefix=g.prefix, replicas=replicas,
                        nats_creds=g.nats_creds, nats_context=g.nats_context,
                        host_settings=HostSettings(reply_prefixes=_reply_prefixes(g.prefix)),
                        metrics_addr=_metrics(metrics_addr), check_interval_s=check_interval,
                        check_timeout_s=check_timeout, job_retention_s=_days(job_retention),
                        shared_users=_shared_users(nats_users_file, nats_pid_file, nats_config))

    async def main() -> None:
        async with AsyncExitStack() as stack:
            running = await start_stack(opts, stack, embedded_nats=False, core=True, worker=False)
            _say(f"fleetbus core {__version__} on {running.nats_shown} (replicas {running.replicas})"
                 + (f", metrics {running.metrics_server.url}" if running.metrics_server else ""))
            await wait_for_signal()

    run_async(main)


@click.command("worker")
@click.option("--transports", help="Comma-separated transports to serve (default: all installed).")
@click.option("--threads", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Threads for blocking client libraries.")
@click.option("--transport-setting", "transport_settings", multiple=True, metavar="TRANSPORT.KEY=VALUE",
              help="A transport setting, e.g. NAME.idle_timeout_s=60 (repeatable); checked at start.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--metrics-addr", default="off", show_default=True, metavar="HOST:PORT",
              help="Serve Prometheus metrics here ('off' to disable).")
@replicas_option
@pass_globals
def worker(g: Globals, transports: str | None, threads: int,
           transport_settings: tuple[str, ...], metrics_addr: str,
           replicas: int | None, verbose: int) -> None:
    """Run a plugin host serving the given transports against a shared NATS."""
    from ..host import HostSettings  # the stack is heavy; `fleetbus run` never needs it
    from ..stack import StackOptions, start_stack, wait_for_signal

    _logging(verbose)
    _secure(g.home_dir())
    opts = StackOptions(home=g.home_dir(), nats_url=g.nats, prefix=g.prefix,
                        transports=_transports(transports), replicas=replicas,
                        nats_creds=g.nats_creds, nats_context=g.nats_context,
                        host_settings=HostSettings(blocking_threads=threads,
                                                   transport_settings=_settings("worker", transport_settings),
                                                   reply_prefixes=_reply_prefixes(g.prefix)),
                        metrics_addr=_metrics(metrics_addr))

    async def main() -> None:
        async with AsyncExitStack() as stack:
            running = await start_stack(opts, stack, embedded_nats=False, core=False, worker=True)
            served = ", ".join(running.host.transports) if running.host and running.host.transports else "none"
            _say(f"fleetbus worker {__version__} on {running.nats_shown} (replicas {running.replicas}) "
                 f"serving {served}"
                 + (f", metrics {running.metrics_server.url}" if running.metrics_server else ""))
            await wait_for_signal()

    run_async(main)


takes_plugin_flags("up")(up)
takes_plugin_flags("worker")(worker)
