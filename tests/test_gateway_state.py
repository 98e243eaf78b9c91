"""What gateways share through the core's services (core/fleetbus/gatewaystate.py), on a
real NATS: the compare-and-set rules the gateway cluster relies on (a stale release or
removal loses), what the watches yield, one deployment CA for gateways starting at once,
and the revoked-key watch."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

from fleetbus.certs import GatewayFiles, issued_by
from fleetbus.gatewaystate import GatewayState
from fleetbus.home import Home
from fleetbus.jetstream import State, open_state
from fleetbus.keys import AgentKeys
from fleetbus.services import GatewayRecord, LinkClaim
from fleetbus.subjects import Names
from fleetbus.vault import MasterKey
from nats.aio.client import Client as NATS

T = TypeVar("T")


def _gateway(state: State, home: Path, worker: str, master: MasterKey | None = None) -> GatewayState:
    return GatewayState(state.gateway_state, state.gateways, Home(home), master, worker)


async def _next(items: AsyncIterator[T]) -> T:
    return await asyncio.wait_for(items.__anext__(), 10)


async def test_a_stale_claim_release_loses_and_the_watch_follows_the_owner(
        nc: NATS, prefix: str, tmp_path: Path) -> None:
    state = await open_state(nc, Names(prefix))
    a = _gateway(state, tmp_path / "a", "worker:a")
    b = _gateway(state, tmp_path / "b", "worker:b")
    claims = b.watch_link_claims()
    first = await a.claim_link("web1", {"remote": "10.0.0.1:5000"})
    assert await _next(claims) == LinkClaim("web1", "worker:a", first)
    second = await b.claim_link("web1", {"remote": "10.0.0.2:5000"})
    assert second > first
    assert await _next(claims) == LinkClaim("web1", "worker:b", second)
    # A's agent left after B took the server over: A's release must not drop B's claim.
    assert await a.release_link("web1", first) is False
    assert await b.release_link("web1", second) is True
    gone = await _next(claims)
    assert gone.server == "web1" and gone.gateway is None
    await claims.aclose()


async def test_records_a_stale_removal_loses_and_a_gateway_knows_its_own(
        nc: NATS, prefix: str, tmp_path: Path) -> None:
    state = await open_state(nc, Names(prefix))
    a = _gateway(state, tmp_path / "a", "worker:a")
    b = _gateway(state, tmp_path / "b", "worker:b")
    await a.publish_record({"address": "a:7443"})
    await b.publish_record({"address": "b:7443"})
    records = b.watch_records()
    seen = {r.worker: r for r in [await _next(records), await _next(records)]}
    assert seen["worker:a"].mine is False and seen["worker:b"].mine is True
    stale = seen["worker:a"]
    await a.publish_record({"address": "a:7443"})  # alive after all: it wrote again
    fresh = await _next(records)
    assert fresh.worker == "worker:a" and fresh.revision > stale.revision
    # B took A for dead on the old revision: too late, A is alive.
    assert await b.remove_record(stale.key, stale.revision) is False
    assert await b.remove_record(fresh.key, fresh.revision) is True
    assert await _next(records) == GatewayRecord(fresh.key, None, fresh.revision + 1, False)
    await b.withdraw_record()
    mine = await _next(records)
    assert mine.mine is True and mine.worker is None
    await records.aclose()


async def test_gateways_starting_at_once_share_one_deployment_ca(
        nc: NATS, prefix: str, tmp_path: Path) -> None:
    state = await open_state(nc, Names(prefix))
    master = MasterKey(os.urandom(32), "test")
    gateways = [_gateway(state, tmp_path / f"g{i}", f"worker:{i}", master) for i in range(3)]
    identities = await asyncio.gather(*(g.identity(True, ["localhost"], None) for g in gateways))
    assert len({i.ca_fingerprint for i in identities}) == 1 and identities[0].ca_fingerprint
    assert len({i.fingerprint for i in identities}) == 3
    # Started again, a gateway keeps its certificate, still issued by the one CA.
    again = await gateways[0].identity(True, ["localhost"], None)
    assert again.fingerprint == identities[0].fingerprint
    ca = await gateways[1]._deployment_ca(master, offer=None)
    assert all(issued_by(GatewayFiles.of(Home(tmp_path / f"g{i}")), ca) for i in range(3))


async def test_the_revoked_key_watch_names_each_rotated_or_revoked_key(nc: NATS, prefix: str) -> None:
    keys = AgentKeys((await open_state(nc, Names(prefix))).agent_keys)
    first = await keys.issue("web1")
    revoked = keys.watch_revoked()
    second = await keys.issue("web1")  # rotating deletes the first key
    assert await _next(revoked) == first.key_id
    await keys.revoke("web1")
    assert await _next(revoked) == second.key_id
    await revoked.aclose()
