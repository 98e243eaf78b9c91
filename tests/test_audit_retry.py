"""The audit writer through a stream leader election: a record the stream refuses for a
moment (503) or does not answer is sent again with the same Nats-Msg-Id until stored,
and a real stream stores a record sent twice with that id once."""

from __future__ import annotations

import asyncio
import json

from fleetbus.audit import Auditor
from fleetbus.jetstream import open_state
from fleetbus.subjects import Names
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from support.ops_helpers import wait_until
from test_audit import fields


async def test_a_refused_then_accepted_record_is_sent_again_with_one_message_id(
        nc: NATS, prefix: str) -> None:
    names = Names(prefix)
    sends: list[tuple[str, str]] = []  # (msg id, command id)

    async def flaky_stream(msg: Msg) -> None:
        # Two 503s, as during a leader election, then one send left unanswered, then stored.
        sends.append((msg.headers["Nats-Msg-Id"] if msg.headers else "", json.loads(msg.data)["id"]))
        if len(sends) <= 2:
            await nc.publish(msg.reply, b"", headers={"Status": "503", "Description": "No Responders"})
        elif len(sends) == 3:
            return
        else:
            await nc.publish(msg.reply, json.dumps({"stream": "X", "seq": 1}).encode())

    sub = await nc.subscribe(names.audit("web1", ">"), cb=flaky_stream)
    auditor = Auditor(nc, names, ack_timeout_s=10)
    auditor.resend_after_s = 0.3
    await auditor.record(fields("flaky-1"))
    await wait_until(lambda: auditor.pending == 0, timeout=10)
    assert len(sends) == 4, sends
    assert {cid for _, cid in sends} == {"flaky-1"}
    assert len({mid for mid, _ in sends}) == 1 and sends[0][0]
    await sub.unsubscribe()
    await auditor.close()


async def test_the_audit_stream_stores_a_record_sent_twice_once(nc: NATS, prefix: str) -> None:
    names = Names(prefix)
    state = await open_state(nc, names)
    seen: asyncio.Queue[Msg] = asyncio.Queue()
    spy = await nc.subscribe(names.audit("web1", ">"), cb=seen.put)  # beside the stream
    auditor = Auditor(nc, names)
    await auditor.record(fields("twice-1"))
    await wait_until(lambda: auditor.pending == 0)
    sent = await asyncio.wait_for(seen.get(), 5)
    # What a re-send after a lost acknowledgement is to the stream: the same subject,
    # body and Nats-Msg-Id again.
    again = await nc.request(sent.subject, sent.data, headers=sent.headers, timeout=5)
    assert json.loads(again.data).get("duplicate") is True
    info = await state.js.stream_info(names.audit_stream)
    assert info.state.messages == 1
    await spy.unsubscribe()
    await auditor.close()
