"""Creating and opening the JetStream buckets and streams fleetbus keeps its state in.

Every process calls :func:`open_state` at start; creation is idempotent, so whichever
process starts first creates them and the others find them. ``replicas`` > 1 is for a
NATS cluster (see docs/operations.md): what is created gets that many copies, and what
exists with fewer is named in one warning (:mod:`fleetbus.replication`), never changed
here: ``fleetbus admin migrate`` does that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from .errors import ServerOffline
from .jobleases import CORE_LEASE_TTL_S
from .leases import WORKER_LEASE_TTL_S
from .replication import warn_if_under_replicated
from .subjects import Names

log = logging.getLogger("fleetbus.jetstream")
T = TypeVar("T")

COMMAND_MEMORY_S = 3600.0
# A gateway refreshes its record well within this; a dead one drops out by itself.
GATEWAY_RECORD_TTL_S = 60.0
FILE_TTL_S = 3600.0
AUDIT_MAX_AGE_S = 90 * 24 * 3600.0
JOBS_MAX_AGE_S = 30 * 24 * 3600.0


@dataclass
class State:
    js: JetStreamContext
    names: Names
    servers: KeyValue
    status: KeyValue
    credentials: KeyValue
    commands: KeyValue
    agent_keys: KeyValue
    gateways: KeyValue
    files: ObjectStore
    job_cores: KeyValue
    jobs_live: KeyValue
    workers: KeyValue
    # What gateways share: the deployment CA and which gateway holds each server's agent.
    gateway_state: KeyValue
    # Users and their grants (users.py writes, grants.py follows): history 5, who had which grants lately.
    users: KeyValue


# JetStream's "no suitable peers for placement": too few servers it counts as online to
# hold the replicas asked. A cluster still forming, or one whose node restarted a moment
# ago, says this for a few seconds before its servers' reports reach each other; a
# process starting then waits up to PLACEMENT_WAIT_S instead of exiting.
NO_PEERS_ERR_CODE = 10005
PLACEMENT_WAIT_S = 30.0
PLACEMENT_RETRY_S = 1.0


def _refused(name: str, replicas: int, exc: APIError) -> ServerOffline:
    """JetStream refusing to create state (no peers to place R3 on while a node is down,
    no JetStream at all) as one line naming what could not be created."""
    reason = exc.description or type(exc).__name__
    return ServerOffline(f"JetStream cannot create {name} with {replicas} replica(s): {reason}")


async def _create(create: Callable[[], Awaitable[T]], name: str, replicas: int) -> T:
    """``create()``, tried again while JetStream has no peers to place it on (for up to
    :data:`PLACEMENT_WAIT_S`); any other refusal, or one that outlasts it, is
    :func:`_refused`."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + PLACEMENT_WAIT_S
    waiting = False
    while True:
        try:
            return await create()
        except APIError as exc:
            if getattr(exc, "err_code", None) != NO_PEERS_ERR_CODE or loop.time() >= give_up:
                raise _refused(name, replicas, exc) from None
            if not waiting:
                waiting = True
                log.warning("JetStream has no peers to place %s with %d replica(s) on yet (%s); "
                            "waiting up to %g s for the cluster", name, replicas,
                            exc.description or "no suitable peers", PLACEMENT_WAIT_S)
            await asyncio.sleep(PLACEMENT_RETRY_S)


async def _kv(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    try:
        return await js.key_value(config.bucket)
    except (NotFoundError, BadRequestError):
        return await _create(lambda: js.create_key_value(config), f"the KV bucket {config.bucket}",
                             config.replicas)


async def open_state(nc: NATS, names: Names, replicas: int = 1,
                     jobs_max_age_s: float | None = None) -> State:
    """Open (creating if missing) every bucket and stream.

    ``jobs_max_age_s`` is the core's setting for how long job records are kept: given,
    it is applied to an existing stream too; None (workers, or no setting) creates the
    stream with the default and leaves an existing one as the operator set it.
    """
    js = nc.jetstream(timeout=10)
    servers = await _kv(
        js, KeyValueConfig(bucket=names.servers_bucket, history=5, replicas=replicas,
                           storage=StorageType.FILE)
    )
    status = await _kv(
        js, KeyValueConfig(bucket=names.status_bucket, history=1, replicas=replicas,
                           storage=StorageType.FILE)
    )
    credentials = await _kv(
        js, KeyValueConfig(bucket=names.credentials_bucket, history=3, replicas=replicas,
                           storage=StorageType.FILE)
    )
    commands = await _kv(
        js,
        KeyValueConfig(bucket=names.commands_bucket, history=1, ttl=COMMAND_MEMORY_S,
                       replicas=replicas, storage=StorageType.FILE),
    )
    agent_keys = await _kv(
        js, KeyValueConfig(bucket=names.agent_keys_bucket, history=1, replicas=replicas,
                           storage=StorageType.FILE)
    )
    gateways = await _kv(
        js, KeyValueConfig(bucket=names.gateways_bucket, history=1, ttl=GATEWAY_RECORD_TTL_S,
                           replicas=replicas, storage=StorageType.FILE)
    )
    try:
        files = await js.object_store(names.files_bucket)
    except (NotFoundError, BadRequestError):
        files = await _create(lambda: js.create_object_store(
            bucket=names.files_bucket,
            config=ObjectStoreConfig(bucket=names.files_bucket, ttl=FILE_TTL_S,
                                     replicas=replicas, storage=StorageType.FILE)
        ), f"the object store {names.files_bucket}", replicas)
    try:
        await js.stream_info(names.audit_stream)
    except NotFoundError:
        await _add_stream(js, StreamConfig(
            name=names.audit_stream,
            subjects=[names.audit_all],
            retention=RetentionPolicy.LIMITS,
            max_age=AUDIT_MAX_AGE_S,
            storage=StorageType.FILE,
            num_replicas=replicas,
        ))
    await _jobs_stream(js, names, replicas, jobs_max_age_s)
    job_cores = await _kv(
        js, KeyValueConfig(bucket=names.job_cores_bucket, history=1, ttl=CORE_LEASE_TTL_S,
                           replicas=replicas, storage=StorageType.FILE)
    )
    jobs_live = await _kv(
        js, KeyValueConfig(bucket=names.jobs_live_bucket, history=1, replicas=replicas,
                           storage=StorageType.FILE)
    )
    workers = await _kv(
        js, KeyValueConfig(bucket=names.workers_bucket, history=1, ttl=WORKER_LEASE_TTL_S,
                           replicas=replicas, storage=StorageType.FILE)
    )
    gateway_state = await _kv(
        js, KeyValueConfig(bucket=names.gateway_state_bucket, history=1, replicas=replicas,
                           storage=StorageType.FILE)
    )
    users = await _kv(
        js, KeyValueConfig(bucket=names.users_bucket, history=5, replicas=replicas, storage=StorageType.FILE)
    )
    await warn_if_under_replicated(nc, names, replicas)
    return State(js=js, names=names, servers=servers, status=status, credentials=credentials,
                 commands=commands, agent_keys=agent_keys, gateways=gateways, files=files,
                 job_cores=job_cores, jobs_live=jobs_live, workers=workers, gateway_state=gateway_state,
                 users=users)


async def _add_stream(js: JetStreamContext, config: StreamConfig) -> None:
    await _create(lambda: js.add_stream(config), f"the stream {config.name}", config.num_replicas or 1)


async def _jobs_stream(js: JetStreamContext, names: Names, replicas: int, max_age_s: float | None) -> None:
    try:
        info = await js.stream_info(names.jobs_stream)
    except NotFoundError:
        await _add_stream(js, StreamConfig(
            name=names.jobs_stream, subjects=names.job_records, retention=RetentionPolicy.LIMITS,
            max_age=JOBS_MAX_AGE_S if max_age_s is None else max_age_s,
            storage=StorageType.FILE, num_replicas=replicas,
        ))
        return
    if max_age_s is not None and abs((info.config.max_age or 0) - max_age_s) > 0.001:
        info.config.max_age = max_age_s
        await js.update_stream(info.config)
