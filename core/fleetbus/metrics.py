"""Prometheus metrics: one registry per process, served over HTTP by ``--metrics-addr``.

Conventions (https://prometheus.io/docs/practices/naming/): base units (seconds, bytes),
``_total`` for counters, and labels with small fixed value sets. The only label whose
values grow with the fleet is ``server`` (on the per-server check gauges), and ``user``
on ``fleetbus_denied_total`` grows with the users an operator made; nothing
that could hold a secret (arguments, paths, keys) is ever a label value.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from . import __version__
from .metrics_http import MetricsServer, parse_addr, serve_metrics

__all__ = ["Metrics", "MetricsServer", "TransportMetrics", "parse_addr", "serve_metrics"]

# Command latencies span a local `true` (~1 ms) to long deployments.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
CHECK_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10)
JOB_TARGET_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)

AUTH_FAILURE_REASONS = ("unknown_key", "wrong_transport", "locked_out", "bad_proof", "bad_pin", "credentials")


class Metrics:
    """Every metric fleetbus exports; tests may build their own instance (own registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.info = Info("fleetbus", "fleetbus build information", registry=r)
        self.info.info({"version": __version__})
        self.denied = Counter(
            "fleetbus_denied", "Requests fleetbus refused as forbidden, by the user NATS "
            "authenticated (owner for fleetbus's own account) and operation. NATS's own "
            "permission refusals never reach fleetbus and are not counted here.",
            ["user", "op"], registry=r)
        self.commands = Counter(
            "fleetbus_commands", "Commands handled by this process, by outcome (ok or an error code).",
            ["transport", "op", "outcome"], registry=r)
        self.command_seconds = Histogram(
            "fleetbus_command_duration_seconds", "Time from request to reply, seconds.",
            ["transport", "op"], buckets=LATENCY_BUCKETS, registry=r)
        self.bytes = Counter(
            "fleetbus_transferred_bytes", "Bytes moved: put (to servers), get (from servers), "
            "exec output.", ["transport", "op"], registry=r)
        self.inflight = Gauge(
            "fleetbus_commands_in_flight", "Commands running or waiting for a slot.",
            ["transport"], registry=r)
        self.queued = Gauge(
            "fleetbus_commands_queued", "Commands waiting for a per-server concurrency slot.",
            ["transport"], registry=r)
        self.served = Gauge(
            "fleetbus_servers_served", "Servers whose subjects this process answers.",
            ["transport"], registry=r)
        self.blocking_busy = Gauge(
            "fleetbus_blocking_threads_busy", "Threads of the blocking-call pool in use.", registry=r)
        self.blocking_max = Gauge(
            "fleetbus_blocking_threads_max", "Size of the blocking-call pool.", registry=r)
        self.agents = Gauge(
            "fleetbus_gateway_agents_connected", "Agents connected to this gateway.", registry=r)
        self.handshakes_waiting = Gauge(
            "fleetbus_gateway_handshakes_waiting",
            "Agent connections accepted and waiting for a handshake slot.", registry=r)
        self.unauthenticated = Gauge(
            "fleetbus_gateway_unauthenticated_connections",
            "Agent connections held that have not authenticated yet (waiting or in handshake).",
            registry=r)
        self.handshakes_dropped = Counter(
            "fleetbus_gateway_handshakes_dropped",
            "Agent connections dropped before their handshake finished, by reason.",
            ["reason"], registry=r)
        self.auth_failures = Counter(
            "fleetbus_auth_failures", "Failed authentications (agents, ssh and WinRM logins), by reason.",
            ["transport", "reason"], registry=r)
        self.agent_connects = Counter(
            "fleetbus_agent_connections", "Agent connections accepted or opened.",
            ["transport"], registry=r)
        self.server_up = Gauge(
            "fleetbus_server_up", "1 if the last check of the server succeeded, else 0.",
            ["server", "transport"], registry=r)
        self.check_seconds = Gauge(
            "fleetbus_server_check_duration_seconds", "Round trip of the last check, seconds.",
            ["server", "transport"], registry=r)
        self.checks = Counter(
            "fleetbus_server_checks", "Server checks run, by outcome.", ["transport", "outcome"],
            registry=r)
        self.jobs_started = Counter(
            "fleetbus_jobs_started", "Jobs this core started, by operation.", ["op"], registry=r)
        self.jobs_finished = Counter(
            "fleetbus_jobs_finished", "Jobs this core ran to their end, by final state and why "
            "they stopped (none, budget, canary, deadline, cancelled).", ["op", "state", "stop_reason"],
            registry=r)
        self.jobs_running = Gauge(
            "fleetbus_jobs_running", "Jobs running in this core.", registry=r)
        self.job_targets = Histogram(
            "fleetbus_job_targets", "Servers selected per job.", buckets=JOB_TARGET_BUCKETS, registry=r)
        self.job_seconds = Histogram(
            "fleetbus_job_duration_seconds", "Time from a job's start to its end, seconds.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.check_run_seconds = Histogram(
            "fleetbus_check_round_duration_seconds", "Time to check every server once.",
            buckets=CHECK_BUCKETS, registry=r)
        # Overload (admission.py): what a worker answered without reading, and what it holds.
        self.requests_shed = Counter(
            "fleetbus_requests_shed", "Server commands answered without being read, by reason "
            "(busy, too_large).", ["reason"], registry=r)
        self.requests_waiting = Gauge(
            "fleetbus_requests_waiting", "Server commands admitted and not yet running (being "
            "parsed, or waiting for a parse turn, their id claim or a concurrency slot).", registry=r)
        self.requests_waiting_bytes = Gauge(
            "fleetbus_requests_waiting_bytes", "Body bytes of fleetbus_requests_waiting.", registry=r)
        self.nats_slow_consumer = Counter(
            "fleetbus_nats_slow_consumer_errors", "Messages nats-py dropped on this process's NATS "
            "connection because a subscription had too much pending.", registry=r)
        self.object_read_bytes = Counter(
            "fleetbus_object_read_bytes", "Bytes this process read from the file object store "
            "for puts: each object version once, however many of its puts the worker runs.",
            registry=r)
        self._per_transport: dict[str, TransportMetrics] = {}

    def for_transport(self, transport: str) -> TransportMetrics:
        """The command metrics of one transport, with their label lookups cached."""
        found = self._per_transport.get(transport)
        if found is None:
            found = self._per_transport[transport] = TransportMetrics(self, transport)
        return found

    def forget_server(self, server: str, transport: str) -> None:
        for gauge in (self.server_up, self.check_seconds):
            try:
                gauge.remove(server, transport)
            except KeyError:
                pass


class TransportMetrics:
    """What the plugin host records per command, for one transport.

    prometheus-client's ``labels()`` takes a lock and builds a tuple on every call; at
    five calls per command that was ~7% of a gateway's CPU while it answered pings, so
    each labelled child is looked up once. Outcomes and ops are small fixed sets.
    """

    def __init__(self, metrics: Metrics, transport: str) -> None:
        self._metrics = metrics
        self.transport = transport
        self.inflight = metrics.inflight.labels(transport)
        self.queued = metrics.queued.labels(transport)
        # (op, outcome) -> the command counter and the op's latency histogram: one lookup
        # per command.
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._bytes: dict[str, Any] = {}  # made on the first bytes, so no op shows a 0

    def finished(self, op: str, outcome: str, seconds: float, nbytes: int | None) -> None:
        """Count one command that ended with ``outcome`` after ``seconds``."""
        children = self._children.get((op, outcome))
        if children is None:
            m = self._metrics
            children = self._children[(op, outcome)] = (
                m.commands.labels(self.transport, op, outcome), m.command_seconds.labels(self.transport, op))
        counter, histogram = children
        counter.inc()
        histogram.observe(seconds)
        if nbytes:
            moved = self._bytes.get(op)
            if moved is None:
                moved = self._bytes[op] = self._metrics.bytes.labels(self.transport, op)
            moved.inc(nbytes)
