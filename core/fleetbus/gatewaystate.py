"""What the gateways of one deployment share through JetStream, as domain operations.

Two buckets (made with the rest of the state, jetstream.open_state, so the deployment's
replicas reach them too):

- the gateway-state bucket: key ``ca`` holds the deployment's gateway CA sealed under
  the master key; ``link.<server>`` names the gateway holding the server's agent, and
  its revision is the link's epoch;
- the gateways bucket: one record per running gateway (``fleetbus gateway info``),
  rewritten while it lives, keyed by its worker id.

The agent-outbound plugin (``fleetbus_agents.outbound.cluster``) decides what to do
with these; this module is the only place that reads or writes them. Compare-and-set
writes (``create``, ``delete(last=...)``) keep the plugin's election rules intact: of two
gateways that race, exactly one wins and the other learns it.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any

from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from .certs import GatewayCA, GatewayFiles, fingerprint_pem, issued_by, server_context
from .errors import InternalError
from .home import Home
from .services import GatewayIdentity, GatewayRecord, LinkClaim
from .vault import MasterKey

log = logging.getLogger("fleetbus.gateways")

CA_KEY = "ca"
LINK_PREFIX = "link."
# JetStream's answer to a write whose expected last revision is no longer the last.
WRONG_LAST_SEQUENCE = 10071


def _deleted(entry: Any) -> bool:
    return entry.operation in (KV_DEL, KV_PURGE)


class GatewayState:
    """The deployment CA, link claims and gateway records of one process (``worker_id``)."""

    def __init__(self, state: KeyValue, gateways: KeyValue, home: Home, master: MasterKey | None,
                 worker_id: str) -> None:
        self.state = state
        self.gateways = gateways
        self.home = home
        self.master = master
        self.worker_id = worker_id
        self.record_key = worker_id.replace(":", "-")

    # identity ---------------------------------------------------------------------------
    async def identity(self, create: bool, hosts: list[str], ca_probe_name: str | None) -> GatewayIdentity:
        """This gateway's certificate (the one in the home, or, with ``create``, a new one
        signed by the deployment's CA for ``hosts``) and a server TLS context for it."""
        master = self.master
        if master is None:
            raise InternalError("the gateway needs the master key to open its certificate")
        files = GatewayFiles.of(self.home)
        if files.exists():
            own = GatewayCA.from_files(files, master)
            ca = await self._deployment_ca(master, offer=own)
            if not issued_by(files, ca):
                log.warning(
                    "this gateway's certificate in %s is not signed by the deployment's gateway CA "
                    "(%s): agents that trust that CA will not accept this gateway. Move its files "
                    "away and restart it to get a certificate from the CA", files.folder, ca.fingerprint)
        elif create:
            ca = await self._deployment_ca(master, offer=None)
            ca.write(self.home, master, hosts)
            log.info("made this gateway's certificate for %s, signed by the deployment's "
                     "gateway CA %s", ", ".join(hosts), ca.fingerprint)
        tls = server_context(files, master, ca_probe_name=ca_probe_name)
        ca_fingerprint = fingerprint_pem(files.ca_cert.read_bytes()) if files.ca_cert.exists() else None
        return GatewayIdentity(tls=tls, fingerprint=fingerprint_pem(files.cert.read_bytes()),
                               ca_fingerprint=ca_fingerprint)

    async def _deployment_ca(self, master: MasterKey, offer: GatewayCA | None) -> GatewayCA:
        """The deployment's CA: the stored one, else ``offer`` or a new one, stored race-safely."""
        try:
            entry = await self.state.get(CA_KEY)
            if entry.value:
                return GatewayCA.unseal(entry.value, master)
        except KeyNotFoundError:
            pass
        ca = offer or GatewayCA.create(f"fleetbus gateways CA {secrets.token_hex(4)}")
        try:
            await self.state.create(CA_KEY, ca.seal(master))
            log.info("stored the deployment's gateway CA %s", ca.fingerprint)
            return ca
        except KeyWrongLastSequenceError:
            # Another gateway stored one first: that one is the deployment's.
            entry = await self.state.get(CA_KEY)
            return GatewayCA.unseal(entry.value or b"", master)

    # link claims ------------------------------------------------------------------------
    async def claim_link(self, server: str, details: Mapping[str, Any]) -> int:
        """Record that this process serves ``server`` from now on; the claim's revision."""
        value = json.dumps({"gateway": self.worker_id, **details}).encode()
        return await self.state.put(LINK_PREFIX + server, value)

    async def release_link(self, server: str, revision: int) -> bool:
        """Delete ``server``'s claim only if it is still at ``revision``; whether it was."""
        try:
            await self.state.delete(LINK_PREFIX + server, last=revision)
        except Exception:
            return False  # claimed again since, or JetStream unavailable
        return True

    async def watch_link_claims(self) -> AsyncIterator[LinkClaim]:
        """Every current claim, then every change, until the watch fails (then it raises)."""
        watcher = await self.state.watch(LINK_PREFIX + ">")
        async for entry in watcher:
            if entry is None:
                continue  # the end of the records there were when the watch began
            server = entry.key[len(LINK_PREFIX):]
            if _deleted(entry):
                yield LinkClaim(server, None, entry.revision)
                continue
            try:
                gateway = str(json.loads(entry.value or b"{}")["gateway"])
            except (ValueError, KeyError, TypeError):
                continue
            yield LinkClaim(server, gateway, entry.revision)

    # gateway records --------------------------------------------------------------------
    async def publish_record(self, record: Mapping[str, Any]) -> None:
        """Write this gateway's record (``worker`` is added)."""
        await self.gateways.put(self.record_key, json.dumps({"worker": self.worker_id, **record}).encode())

    async def withdraw_record(self) -> None:
        """Delete this gateway's record (it is stopping)."""
        await self.gateways.delete(self.record_key)

    async def remove_record(self, key: str, revision: int) -> bool:
        """Delete another gateway's record if it is still at ``revision``: False when it
        changed since (it wrote again, or another survivor removed it)."""
        try:
            await self.gateways.delete(key, last=revision)
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return False
            raise
        return True

    async def watch_records(self) -> AsyncIterator[GatewayRecord]:
        """Every gateway's record, then every change, until the watch fails (then it raises)."""
        watcher = await self.gateways.watch(">")
        async for entry in watcher:
            if entry is None:
                continue
            mine = entry.key == self.record_key
            if _deleted(entry):
                yield GatewayRecord(entry.key, None, entry.revision, mine)
                continue
            try:
                worker = str(json.loads(entry.value or b"{}")["worker"])
            except (ValueError, KeyError, TypeError):
                continue
            yield GatewayRecord(entry.key, worker, entry.revision, mine)
