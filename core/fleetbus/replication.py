"""How many copies JetStream keeps of fleetbus's state, and moving it to another number.

Replication is a property of the deployment, not of whichever process started first:
every process that may create state (``up``, ``core``, ``worker``) takes the same
setting (``--replicas`` / ``FLEETBUS_REPLICAS``), and without one reads it from the NATS
it is connected to (:func:`choose_replicas`). State that already exists with fewer
copies than asked is never changed behind the operator's back: the process logs one
warning naming it, and ``fleetbus admin migrate --replicas N`` changes it in place
(:func:`migrate`; JetStream updates a stream's ``num_replicas`` on a running cluster
and copies the data to the new peers).

The JetStream API is spoken raw here (``$JS.API.STREAM.INFO``/``UPDATE``) rather than
through nats-py's ``StreamConfig``, so an update sends back the stream's configuration
exactly as the server gave it, including fields this nats-py does not know.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS

from .errors import FleetbusError, InvalidRequest, ServerOffline
from .subjects import Names

log = logging.getLogger("fleetbus.replication")

ENV_REPLICAS = "FLEETBUS_REPLICAS"
MAX_REPLICAS = 5  # JetStream's own limit
JS_API = "$JS.API"
API_TIMEOUT_S = 10.0


def state_streams(names: Names) -> dict[str, str]:
    """Every JetStream stream fleetbus keeps its state in, as {stream: what it is}.

    KV buckets are the streams ``KV_<bucket>`` and the object store ``OBJ_<bucket>``.
    """
    out = {f"KV_{bucket}": f"KV {bucket}" for bucket in (
        names.servers_bucket, names.status_bucket, names.credentials_bucket,
        names.commands_bucket, names.agent_keys_bucket, names.gateways_bucket,
        names.job_cores_bucket, names.jobs_live_bucket, names.workers_bucket,
        names.gateway_state_bucket, names.users_bucket)}
    out[f"OBJ_{names.files_bucket}"] = f"object store {names.files_bucket}"
    out[names.audit_stream] = "stream"
    out[names.jobs_stream] = "stream"
    return out


def choose_replicas(nc: NATS, asked: int | None) -> tuple[int, str]:
    """The replicas to create state with, and why: ``asked`` when given (InvalidRequest
    when more than 1 on a single server); else 3 when the NATS server says it is in a
    cluster of 3 or more servers, else 1.

    The cluster's size is what the server's INFO tells clients: the cluster name and the
    client URLs of its members (``connect_urls``, which includes the server itself).
    It is counted when the process connects: a cluster that does not advertise its
    members, or has a node down at that moment, counts fewer, so a deployment on a
    cluster should say ``--replicas`` (the shipped units do).
    """
    info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
    members = {str(u) for u in info.get("connect_urls") or []}
    if asked is not None:
        if asked > 1 and info and not info.get("cluster"):
            # JetStream would refuse every bucket with a message naming none of this.
            raise InvalidRequest(f"--replicas {asked} (or {ENV_REPLICAS}) needs a NATS cluster; "
                                 f"the NATS connected to is a single server")
        return asked, "asked"
    if not info.get("cluster"):
        return 1, "a single NATS server"
    if len(members) >= 3:
        return 3, f"NATS cluster {info['cluster']} of {len(members)} servers"
    return 1, f"NATS cluster {info['cluster']} advertises {len(members)} server(s) now, fewer than 3"


@dataclass
class StreamReplicas:
    """One fleetbus stream's replication as found, and what a migration did to it."""

    stream: str
    what: str
    found: int | None  # None: the stream does not exist
    replicas: int | None = None  # after a change
    changed: bool = False
    current: bool | None = None  # every replica caught up (None: not waited for)

    def as_dict(self) -> dict[str, Any]:
        return {"stream": self.stream, "what": self.what, "found": self.found,
                "replicas": self.replicas if self.replicas is not None else self.found,
                "changed": self.changed, "current": self.current}


async def _api(nc: NATS, subject: str, body: dict[str, Any] | None = None,
               timeout: float = API_TIMEOUT_S) -> dict[str, Any]:
    payload = json.dumps(body).encode() if body is not None else b""
    try:
        msg = await nc.request(f"{JS_API}.{subject}", payload, timeout=timeout)
    except Exception as exc:
        raise ServerOffline(f"JetStream did not answer {subject.split('.')[0].lower()} "
                            f"({type(exc).__name__}); is JetStream enabled and has it a leader?") from None
    try:
        reply = json.loads(msg.data)
    except ValueError:
        raise FleetbusError(f"unreadable JetStream reply to {subject}") from None
    return reply if isinstance(reply, dict) else {}


def _error(reply: dict[str, Any]) -> dict[str, Any] | None:
    err = reply.get("error")
    return err if isinstance(err, dict) else None


async def stream_config(nc: NATS, stream: str) -> dict[str, Any] | None:
    """The stream's configuration as the server gave it; None when it does not exist."""
    reply = await _api(nc, f"STREAM.INFO.{stream}")
    err = _error(reply)
    if err is not None:
        if err.get("err_code") == 10059 or err.get("code") == 404:  # stream not found
            return None
        raise FleetbusError(f"JetStream refused stream info for {stream}: {err.get('description', err)}")
    config = reply.get("config")
    return config if isinstance(config, dict) else None


async def survey(nc: NATS, names: Names) -> list[StreamReplicas]:
    """The replicas of every fleetbus stream under ``names``, asked all at once."""
    streams = state_streams(names)
    configs = await asyncio.gather(*(stream_config(nc, s) for s in streams))
    return [StreamReplicas(stream=s, what=what, found=int(c.get("num_replicas") or 1) if c else None)
            for (s, what), c in zip(streams.items(), configs, strict=True)]


async def warn_if_under_replicated(nc: NATS, names: Names, replicas: int) -> list[str]:
    """Log one warning naming every fleetbus stream kept with fewer than ``replicas``
    copies; returns their names. Nothing is asked of NATS when ``replicas`` is 1."""
    if replicas <= 1:
        return []
    try:
        found = await survey(nc, names)
    except FleetbusError as exc:  # a process still starts; the warning is advice
        log.warning("could not check the replicas of fleetbus's JetStream state: %s", exc.message)
        return []
    short = [s for s in found if s.found is not None and s.found < replicas]
    if short:
        log.warning(
            "JetStream state kept with fewer replicas than the %d asked: %s; "
            "run `fleetbus admin migrate --replicas %d` to change it",
            replicas, ", ".join(f"{s.stream} (R{s.found})" for s in short), replicas)
    return [s.stream for s in short]


async def migrate(nc: NATS, names: Names, replicas: int, *, wait_s: float = 60.0,
                  dry_run: bool = False) -> list[StreamReplicas]:
    """Set every existing fleetbus stream to ``replicas`` copies with a stream update,
    then wait up to ``wait_s`` for the new replicas to catch up.

    Streams are changed one at a time, so a refusal (say, more replicas than the cluster
    has servers) stops before the rest and says which stream it was.
    """
    if not 1 <= replicas <= MAX_REPLICAS:
        raise InvalidRequest(f"replicas must be 1 to {MAX_REPLICAS}, not {replicas}")
    results = await survey(nc, names)
    if all(r.found is None for r in results):
        raise InvalidRequest(f"no fleetbus state on this NATS under the prefix {names.prefix!r}")
    for result in results:
        if result.found is None or result.found == replicas or dry_run:
            continue
        config = await stream_config(nc, result.stream)
        if config is None:
            continue
        config["num_replicas"] = replicas
        reply = await _api(nc, f"STREAM.UPDATE.{result.stream}", config)
        err = _error(reply)
        if err is not None:
            raise InvalidRequest(f"JetStream refused {replicas} replicas for {result.stream}: "
                                 f"{err.get('description', err)}")
        result.replicas, result.changed = replicas, True
        log.info("%s: %d -> %d replicas", result.stream, result.found, replicas)
    changed = [r for r in results if r.changed]
    if changed and wait_s > 0:
        deadline = time.monotonic() + wait_s
        for result in changed:
            result.current = await wait_current(nc, result.stream, replicas, deadline)
    return results


async def wait_current(nc: NATS, stream: str, replicas: int, deadline: float) -> bool:
    """Wait until ``stream`` has a leader and ``replicas - 1`` current followers (True),
    or until ``deadline`` (``time.monotonic()``; False)."""
    while True:
        try:  # a stream electing a leader does not answer: ask again until the deadline
            reply = await _api(nc, f"STREAM.INFO.{stream}",
                               timeout=max(0.5, min(2.0, deadline - time.monotonic())))
        except ServerOffline:
            reply = {}
        cluster = reply.get("cluster") if reply and _error(reply) is None else None
        peers = cluster.get("replicas") or [] if isinstance(cluster, dict) else []
        if (isinstance(cluster, dict) and cluster.get("leader") and len(peers) == replicas - 1
                and all(p.get("current") for p in peers)):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.2)  # polling JetStream's view; it sends no event for this
