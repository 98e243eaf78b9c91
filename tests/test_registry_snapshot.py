"""A registry snapshot holds every key, also while many are taken at once.

nats-py's watcher may announce "nothing more" before the values it already has in
flight (its consumer-info check races the deliveries); a snapshot that believed it came
back short, and a job started a moment after a listing found "no server named local".
"""

from __future__ import annotations

import asyncio
import secrets

from fleetbus.registry import kv_snapshot
from nats.aio.client import Client as NATS

KEYS = 30


async def test_concurrent_snapshots_are_all_whole(nc: NATS) -> None:
    js = nc.jetstream()
    bucket = "snap" + secrets.token_hex(4)
    kv = await js.create_key_value(bucket=bucket, history=1)
    try:
        for i in range(KEYS):
            await kv.put(f"k{i}", b"x" * 200)
        sizes: list[int] = []
        for _ in range(20):
            snapshots = await asyncio.gather(*(kv_snapshot(kv) for _ in range(15)))
            sizes.extend(len(s) for s in snapshots)
        assert sizes.count(KEYS) == len(sizes), f"short snapshots: {sorted(set(sizes))}"
    finally:
        await js.delete_key_value(bucket)


async def test_a_snapshot_of_an_empty_bucket_is_empty(nc: NATS) -> None:
    js = nc.jetstream()
    bucket = "snap" + secrets.token_hex(4)
    kv = await js.create_key_value(bucket=bucket, history=1)
    try:
        assert await asyncio.wait_for(kv_snapshot(kv), 5) == {}
    finally:
        await js.delete_key_value(bucket)
