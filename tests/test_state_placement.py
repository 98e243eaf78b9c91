"""Creating state while a NATS cluster cannot place its replicas yet (a cluster still
forming, a node restarted a moment ago): JetStream answers "no suitable peers for
placement" for a few seconds, and a starting process waits for it instead of exiting;
any other refusal is one clear line at once (core/fleetbus/jetstream.py)."""

from __future__ import annotations

import pytest
from fleetbus import jetstream
from fleetbus.errors import ServerOffline
from nats.js.errors import APIError


def no_peers() -> APIError:
    return APIError(code=500, err_code=jetstream.NO_PEERS_ERR_CODE,
                    description="no suitable peers for placement, peer offline")


async def test_no_peers_for_placement_is_waited_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jetstream, "PLACEMENT_RETRY_S", 0.01)
    tries = 0

    async def create() -> str:
        nonlocal tries
        tries += 1
        if tries < 3:
            raise no_peers()
        return "bucket"

    assert await jetstream._create(create, "the KV bucket x", 3) == "bucket" and tries == 3


async def test_other_refusals_and_a_wait_past_its_bound_fail_with_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jetstream, "PLACEMENT_RETRY_S", 0.01)
    tries = 0

    async def refused() -> str:
        nonlocal tries
        tries += 1
        raise APIError(code=400, err_code=10058, description="stream name already in use")

    with pytest.raises(ServerOffline, match="cannot create the stream s with 3 replica"):
        await jetstream._create(refused, "the stream s", 3)
    assert tries == 1

    monkeypatch.setattr(jetstream, "PLACEMENT_WAIT_S", 0.05)

    async def never() -> str:
        raise no_peers()

    with pytest.raises(ServerOffline, match="no suitable peers"):
        await jetstream._create(never, "the KV bucket y", 3)
