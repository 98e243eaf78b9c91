"""Several gateways on one NATS: one identity, one gateway per server, dead peers noticed.

Three things gateways of one deployment agree on through JetStream, reached through
``ctx.services`` (the core's ``gatewaystate.py`` keeps the buckets; this module decides):

- **The CA** (``services.gateway_identity``, kept by the core). The deployment's gateway
  CA, sealed under the master key. The first gateway to start makes it (of two starting at
  once, the loser reads the winner's); a gateway that already had a CA of its own from
  before CAs were shared offers that one instead, so agents that trust it keep working
  and accept every new gateway. A gateway with no certificate gets one signed by the CA,
  with its own names.
- **Who serves a server** (``services.claim_link``). A claim names the gateway holding
  the server's agent; its revision is the link's epoch. A gateway claims it when an
  agent connects; every gateway watches the claims and closes its own link for a server
  another gateway claimed later. The link that lost stops serving the server's subjects.
- **Who is alive** (``services.publish_gateway_record``). Each gateway rewrites its
  record every ``RECORD_EVERY_S``. A gateway that has not seen a peer's record change for
  ``PEER_DEAD_S`` removes it (only if unchanged, so one survivor does it) and then, for
  each server that gateway still claimed, releases the claim (only if unchanged) and
  marks the server offline unless its status was written by someone else since. So a
  dead gateway's servers read offline within about ``PEER_DEAD_S`` + ``RECORD_EVERY_S``
  unless their agents came back elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetbus.transport import TransportContext

from .links import Link, Links

# A gateway's record is rewritten this often; a peer whose record has not changed for
# PEER_DEAD_S is taken for dead. Four missed refreshes: one late write of a busy gateway
# (thousands of agents reconnecting) must not get it declared dead. A record put costs
# one JetStream request, so the short interval is cheap.
RECORD_EVERY_S = 2.0
PEER_DEAD_S = 8.0
CHECK_PEERS_S = 1.0
RESTART_WATCH_S = 1.0
# Claims of a dead gateway are cleared this many at a time (each is a delete and a status
# read and write): enough to clear 1,000 in a few seconds without flooding JetStream.
CLEAR_AT_ONCE = 32
# After taking a server over from another gateway, its status is checked once this long
# after (see Cluster.confirm_status).
CONFIRM_STATUS_S = 2.0


@dataclass
class _Peer:
    worker: str
    revision: int
    seen: float


class Cluster:
    """This gateway's part in the agreement above; ``start`` returns its background tasks."""

    def __init__(self, ctx: TransportContext, links: Links) -> None:
        self.ctx = ctx
        self.services = ctx.services
        self.links = links
        self.me: str = ctx.services.worker_id
        self.owners: dict[str, tuple[str, int]] = {}
        """Server -> (gateway worker id, claim revision), as the claims watch last showed."""
        self.peers: dict[str, _Peer] = {}
        self._record: Callable[[], dict[str, Any]] = dict
        self._tasks: set[asyncio.Task[Any]] = set()

    # lifecycle --------------------------------------------------------------------------
    def start(self, record: Callable[[], dict[str, Any]]) -> list[asyncio.Task[Any]]:
        """Start watching claims and peers; ``record`` gives this gateway's record."""
        self._record = record
        return [asyncio.create_task(self._forever("claims", self._watch_claims)),
                asyncio.create_task(self._forever("gateway records", self._watch_peers)),
                asyncio.create_task(self._check_peers())]

    async def _forever(self, what: str, watch: Callable[[], Any]) -> None:
        """Run ``watch`` again whenever it ends or fails (NATS reconnects, a JetStream
        leader moves): a gateway that stopped watching would keep a link another gateway
        took over. A new watch delivers every current record again."""
        while True:
            try:
                await watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.ctx.logger.warning("watching the %s failed (%s); watching again", what, type(exc).__name__)
            await asyncio.sleep(RESTART_WATCH_S)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # claims -----------------------------------------------------------------------------
    async def claim(self, link: Link) -> bool:
        """Record that this gateway serves ``link.server`` from now on (the link's epoch);
        True when another gateway held it until now."""
        before = self.owners.get(link.server)
        try:
            link.epoch = await self.services.claim_link(link.server, {"remote": link.remote, "since": link.since})
        except Exception as exc:
            # Served anyway (the agent is here); the queue group still delivers each
            # request once, and the next claim or the status refresh corrects the record.
            self.ctx.logger.warning("could not claim %s for this gateway: %s", link.server, type(exc).__name__)
            return False
        newer = self.owners.get(link.server)
        if newer is not None and newer[0] != self.me and newer[1] > link.epoch:
            await self._taken_over(link, newer[0])
        return before is not None and before[0] != self.me

    def confirm_status(self, link: Link, write: Callable[[Link], Any]) -> None:
        """Write ``link``'s status again shortly unless it still reads online here.

        After taking a server from another gateway, that gateway's "offline" (written
        as it lets go, or by a survivor for a dead one) can land just after our
        "online"; one check a moment later puts it right.
        """
        async def check() -> None:
            await asyncio.sleep(CONFIRM_STATUS_S)
            if self.links.get(link.server) is not link:
                return
            status = await self.services.server_status(link.server)
            if status is None or status.state != "online" or status.served_by != self.me:
                await write(link)

        self._spawn(check())

    async def release(self, link: Link) -> None:
        """Drop this gateway's claim after its agent left (unless someone claimed since)."""
        if link.epoch is None:
            return
        # False when claimed again since, or JetStream is unavailable: the next claim overwrites it.
        await self.services.release_link(link.server, link.epoch)

    async def _taken_over(self, link: Link, gateway: str) -> None:
        if link.conn.closed or link.taken_over:
            return
        link.taken_over = True
        self.ctx.logger.info("agent %s is now served by gateway %s; closing its connection here",
                             link.server, gateway)
        await link.conn.close(f"the server is now served by gateway {gateway}",
                              code="server_offline", goaway=True)

    async def _watch_claims(self) -> None:
        async for claim in self.services.watch_link_claims():
            server, owner = claim.server, claim.gateway
            link = self.links.get(server)
            if owner is None:
                self.owners.pop(server, None)
                if link is not None and link.epoch is not None and not link.taken_over:
                    # A survivor took this gateway for dead and cleared its claim: claim again.
                    self._spawn(self._reclaim(link))
                continue
            self.owners[server] = (owner, claim.revision)
            if owner != self.me and link is not None and link.epoch is not None and link.epoch < claim.revision:
                self._spawn(self._taken_over(link, owner))

    async def _reclaim(self, link: Link) -> None:
        await self.claim(link)
        if not link.conn.closed:
            await self.services.report_status(link.server, "online", agent_version=link.agent,
                                              remote_address=link.remote)

    # peers ------------------------------------------------------------------------------
    async def _watch_peers(self) -> None:
        async for record in self.services.watch_gateway_records():
            if record.mine:
                if record.worker is None:  # taken for dead (a long stall): say otherwise at once
                    self._spawn(self.services.publish_gateway_record(self._record()))
                continue
            if record.worker is None:
                self.peers.pop(record.key, None)
                continue
            # Our own clock, not the record's timestamp: gateways' clocks may differ.
            self.peers[record.key] = _Peer(record.worker, record.revision, time.monotonic())

    async def _check_peers(self) -> None:
        while True:
            await asyncio.sleep(CHECK_PEERS_S)
            try:
                await self._remove_dead_peers()
            except Exception as exc:
                self.ctx.logger.warning("checking the other gateways failed: %s", type(exc).__name__)

    async def _remove_dead_peers(self) -> None:
        """Remove the records of gateways not seen to change for PEER_DEAD_S, and their claims."""
        now = time.monotonic()
        for key, peer in list(self.peers.items()):
            if now - peer.seen < PEER_DEAD_S:
                continue
            self.peers.pop(key, None)
            try:
                removed = await self.services.remove_gateway_record(key, peer.revision)
            except Exception as exc:
                self.ctx.logger.warning("could not remove gateway %s's record: %s", peer.worker,
                                        type(exc).__name__)
                continue
            if not removed:
                continue  # it wrote again meanwhile, or another survivor removed it
            self.ctx.logger.warning("gateway %s stopped refreshing its record for %.0f s; "
                                    "taking it for gone", peer.worker, now - peer.seen)
            await self.clear_gateway(peer.worker)

    async def clear_gateway(self, worker: str) -> int:
        """Drop the claims of gateway ``worker`` (gone) and mark their servers offline; how many."""
        claimed = [(server, rev) for server, (owner, rev) in self.owners.items() if owner == worker]
        detail = f"its gateway {worker} stopped"
        cleared = 0

        async def clear(server: str, revision: int) -> None:
            nonlocal cleared
            if not await self.services.release_link(server, revision):
                return  # claimed by another gateway since: its agent came back
            if await self.services.report_lost(server, worker, detail):
                cleared += 1

        for at in range(0, len(claimed), CLEAR_AT_ONCE):
            await asyncio.gather(*(clear(s, r) for s, r in claimed[at:at + CLEAR_AT_ONCE]))
        if cleared:
            self.ctx.logger.warning("marked %s servers of gateway %s offline", cleared, worker)
        return cleared
