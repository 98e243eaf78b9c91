"""Assembling processes: the core, a worker (the plugin host), and ``up`` (all of it).

``fleetbus up`` = embedded NATS + core + worker with every installed transport, in one
process tree. ``fleetbus core`` and ``fleetbus worker`` run the same parts separately
against a shared NATS, which is how fleetbus scales out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from typing import Any

from fleetbus_base.fdbudget import raise_nofile_limit
from fleetbus_base.ownenv import secret, take_secrets
from nats.aio.client import Client as NATS

from .admin import AdminService
from .checks import ServerChecker
from .connection import ENV_TOKEN, NatsSettings, connect
from .discovery import start_worker_service
from .embedded import EmbeddedNats, nats_server_binary
from .home import Home
from .host import HostSettings, PluginHost
from .jetstream import State, open_state
from .jobs import JobService
from .keys import AgentKeys
from .leases import CHECKS_LEADER_KEY, LeaderLease
from .metrics import Metrics, MetricsServer, serve_metrics
from .natsaccounts import SharedUsers
from .plugins import load_plugins
from .records import Server
from .registry import Registry
from .replication import choose_replicas
from .subjects import Names
from .userperms import UserSync
from .users import UserStore, open_users
from .vault import MasterKey, Vault

log = logging.getLogger("fleetbus.stack")

#: Seconds a stopping ``up``, ``core`` or ``worker`` may take from the first step of its
#: stop (SIGTERM, SIGINT, or a failed start) to exiting. A stop normally ends well
#: within it; past it the process exits with status 1 all the same. It covers the
#: running commands' cancellation grace (``host.CANCEL_GRACE_S``, 15 s) and stays
#: under the 30 s that the shipped units and the tests give a stop before SIGKILL.
STOP_BOUND_S = 25.0


@dataclass
class StackOptions:
    home: Home
    nats_url: str | None = None
    nats_host: str = "127.0.0.1"
    nats_port: int = 4222
    prefix: str | None = None
    transports: list[str] | None = None
    replicas: int | None = None  # None: from the NATS connected to (replication.choose_replicas)
    nats_creds: str | None = None
    nats_context: str | None = None
    host_settings: HostSettings = field(default_factory=HostSettings)
    metrics_addr: str | None = None
    check_interval_s: float = 30.0
    check_timeout_s: float = 10.0
    job_retention_s: float | None = None  # None: the jobs stream's default or current setting
    #: A core beside a shared nats-server keeps its USERS account (docs/operations.md).
    shared_users: SharedUsers | None = None


@dataclass
class Running:
    nats_url: str  # as given (may hold a secret in a URL's user part): print nats_shown
    nats_shown: str
    names: Names
    nc: NATS
    state: State
    host: PluginHost | None = None
    admin: AdminService | None = None
    jobs: JobService | None = None
    embedded: EmbeddedNats | None = None
    metrics: Metrics | None = None
    metrics_server: MetricsServer | None = None
    checker: ServerChecker | None = None
    worker_service: Any = None
    user_sync: UserSync | None = None
    extra: dict[str, str] = field(default_factory=dict)
    replicas: int = 1


async def _connect(opts: StackOptions, embedded: EmbeddedNats | None, name: str) -> tuple[NATS, NatsSettings]:
    if embedded is not None:
        settings = NatsSettings(url=embedded.url, token=embedded.token, prefix=opts.prefix or "fleetbus")
    else:
        settings = NatsSettings.resolve(url=opts.nats_url, home=opts.home, prefix=opts.prefix,
                                        creds_file=opts.nats_creds, context=opts.nats_context)
        # The CLI took FLEETBUS_NATS_TOKEN out of the environment at start (see
        # secure_process_start); it still beats the token file, as it did there.
        token = secret(ENV_TOKEN)
        if token:
            settings = replace(settings, token=token)
    return await connect(settings, name=name), settings


def secure_process_start(home: Home) -> None:
    """What every long-running fleetbus process does first, before any thread or child.

    Takes fleetbus's secret variables (master key, NATS token) out of the environment
    and of ``/proc/<pid>/environ`` (:mod:`fleetbus_base.ownenv`), so no process we
    start and no ``local`` command can read them there; and closes an existing home
    folder to everyone else (0700), since it holds ``master.key`` and ``nats.token``;
    and raises the soft descriptor limit to the hard one.
    """
    taken = take_secrets()
    if taken:
        log.debug("took %s out of the process environment", ", ".join(taken))
    home.protect()
    # A fleetbus process holds a descriptor per agent, NATS connection, session and
    # transfer; systemd's default soft limit of 1,024 is for select(), which we never use.
    raise_nofile_limit()


async def start_stack(opts: StackOptions, stack: AsyncExitStack, *, embedded_nats: bool,
                      core: bool, worker: bool) -> Running:
    """Start the requested parts; ``stack`` stops them in reverse order."""
    embedded = None
    if embedded_nats:
        embedded = EmbeddedNats(opts.home, opts.nats_host, opts.nats_port, prefix=opts.prefix or "fleetbus")
        await embedded.start()
        stack.push_async_callback(embedded.stop)
    nc, settings = await _connect(opts, embedded, "fleetbus-" + ("up" if embedded else "core" if core else "worker"))
    stack.push_async_callback(_close_nats, nc)
    names = Names(settings.prefix)
    replicas, why = choose_replicas(nc, opts.replicas)
    log.info("JetStream state with %d replica(s) (%s)", replicas, why)
    state = await open_state(nc, names, replicas=replicas,
                             jobs_max_age_s=opts.job_retention_s if core else None)
    plugins = load_plugins()
    # Only a process that must open or seal secrets needs the master key.
    master = MasterKey.load(opts.home, create=core) if (core or worker) else None
    vault = Vault(state.credentials, master)
    metrics = Metrics()
    running = Running(nats_url=settings.url, nats_shown=settings.shown, names=names, nc=nc, state=state,
                      embedded=embedded, metrics=metrics, replicas=replicas)
    if opts.metrics_addr:
        running.metrics_server = serve_metrics(metrics, opts.metrics_addr)
        stack.callback(running.metrics_server.stop)
    if core:
        users = await open_users(nc.jetstream(timeout=10), names.users_bucket, replicas)
        # Where this process runs the NATS server, or sits beside a shared one whose users
        # file it was given, it keeps the USERS account equal to the bucket.
        users_file = (embedded.users_file if embedded is not None else
                      opts.shared_users.open(nats_server_binary()) if opts.shared_users else None)
        if users_file is not None:
            running.user_sync = UserSync(users, names, users_file.apply)
            await running.user_sync.start()
            stack.push_async_callback(running.user_sync.stop)
        running.admin = AdminService(nc, names, Registry(state.servers, state.status), vault,
                                     AgentKeys(state.agent_keys), state.gateways,
                                     plugins.transports,
                                     names.reply_subjects(opts.host_settings.reply_prefixes),
                                     users=UserStore(users), user_sync=running.user_sync)
        await running.admin.start()
        stack.push_async_callback(running.admin.stop)
        if opts.check_interval_s > 0:
            running.checker = ServerChecker(nc, names, Registry(state.servers, state.status), metrics,
                                            interval_s=opts.check_interval_s,
                                            timeout_s=opts.check_timeout_s)
            # With several cores only the lease's leader checks (leases.py); stopped
            # first, so a clean stop hands the checks over at once.
            leader = LeaderLease(state.workers, CHECKS_LEADER_KEY, running.checker.checker_id,
                                 on_elected=running.checker.start, on_deposed=running.checker.stop)
            leader.start()
            stack.push_async_callback(running.checker.stop)
            stack.push_async_callback(leader.stop)
    if worker:
        transports = plugins.select(opts.transports)
        opts.host_settings.home = opts.home
        running.host = PluginHost(nc, state, transports, vault, opts.host_settings, metrics)
        await running.host.start()
        stack.push_async_callback(running.host.stop)
        running.worker_service = await start_worker_service(nc, running.host)
        stack.push_async_callback(running.worker_service.stop)
    if core:
        # Started last, so stopped first: running jobs cancel their commands and record
        # how they ended while this process's worker still serves them.
        running.jobs = JobService(nc, state, Registry(state.servers, state.status), metrics,
                                  names.reply_subjects(opts.host_settings.reply_prefixes))
        await running.jobs.start()
        stack.push_async_callback(running.jobs.stop)
    # Pushed last, so run first when the stack unwinds: from here the stop is bounded.
    stack.callback(_bound_stop, STOP_BOUND_S)
    return running


def _bound_stop(bound_s: float) -> None:
    """Exit the process ``bound_s`` s from now if it has not exited by then.

    A stop awaits NATS in many places (unsubscribing, a lease's and a gateway record's
    delete, each served server's status, draining): with every NATS server gone, each
    waits for its own timeout, and a worker serving hundreds of servers waited for
    minutes. A thread, because the loop may be what is stuck.
    """
    def exit_now() -> None:
        sys.stderr.write(f"fleetbus: stopping took longer than {bound_s:g} s; exiting without finishing it\n")
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(bound_s, exit_now)
    timer.daemon = True  # a stop that ends in time exits without waiting for it
    timer.start()


async def _close_nats(nc: NATS) -> None:
    """Drain the connection (up to 5 s), else close it; never raises: with the NATS
    server gone, closing fails writing to a dead socket, which is no reason to exit
    with an error."""
    try:
        await asyncio.wait_for(nc.drain(), timeout=5)
    except Exception:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), timeout=5)


async def ensure_local_server(state: State, host: PluginHost | None = None, timeout: float = 10) -> bool:
    """Register ``local`` (this host) on first start; True if it was added now.

    With ``host``, returns only once that host answers ``local`` (or after ``timeout``
    s, with a warning), so that whoever is told "up" next can use it at once.
    """
    registry = Registry(state.servers, state.status)
    if await registry.find("local") is not None:
        return False
    try:
        await registry.add(Server(name="local", transport="local",
                                  description="the host fleetbus runs on"))
    except Exception:
        return False  # another process registered it first
    if host is not None and "local" in host.transports and not await host.wait_served("local", timeout):
        log.warning("the local server is registered but not served after %.0f s", timeout)
    return True


async def wait_for_signal(on_signal: Callable[[str], None] | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: (on_signal and on_signal(s.name), stop.set()))
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
