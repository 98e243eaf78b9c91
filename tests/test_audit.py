"""The audit writer against a real nats-server: records stored and acknowledged, and
every way a record can fail to be stored logged with its command id."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime

import pytest
from fleetbus.audit import MAX_SUMMARY_CHARS, Auditor, AuditRecord, encode_record, summarize
from fleetbus.jetstream import open_state
from fleetbus.subjects import Names
from fleetbus_base.text import shorten
from nats.aio.client import Client as NATS
from support.ops_helpers import wait_until


def fields(command_id: str, **changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "ts": datetime(2026, 11, 27, 6, 30, 1, 250000, tzinfo=UTC), "id": command_id,
        "server": "web1", "transport": "local", "op": "exec", "requester": "alice",
        "outcome": "ok", "exit_code": 0, "duration_s": 0.001234, "worker": "w1",
        "summary": '["true"]', "bytes": None, "replayed": False,
    }
    base.update(changes)
    return base


RECORD_CASES = [
    {},
    {"ts": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "exit_code": None, "summary": None,
     "bytes": 1 << 40, "replayed": True, "duration_s": 1e-05, "requester": "zoë \"quoted\""},
    {"identity": {"account": "AUSERS", "user": "UKEY", "name_tag": "bob", "name": "bob", "via": None},
     "outcome": "forbidden", "exit_code": -9, "duration_s": 12.5, "summary": "a\nb\u2028{\"x\": [1]}",
     "ts": datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "server": "web-2.example", "op": "get"},
    {"identity": {"account": None, "user": "fleetbus", "name_tag": None, "name": None, "via": "jobs"},
     "duration_s": 0.0, "bytes": 0, "transport": "agent-outbound", "op": "ping"},
]


def as_the_model_reads_it(encoded: bytes) -> tuple[AuditRecord, str]:
    """What a reader of the trail gets from a record: the model, and its JSON again."""
    record = AuditRecord.model_validate_json(encoded)
    return record, record.model_dump_json()


@pytest.mark.parametrize("changes", RECORD_CASES)
def test_encoded_record_reads_back_as_the_model_writes_it(changes: dict[str, object]) -> None:
    data = fields("c1", **changes)
    encoded = encode_record(data)
    model = AuditRecord(**data)  # type: ignore[arg-type]
    assert as_the_model_reads_it(encoded) == (model, model.model_dump_json())
    # Same text for the timestamp, so readers that compare strings see no change.
    assert json.loads(encoded)["ts"] == json.loads(model.model_dump_json())["ts"]


@pytest.mark.parametrize("argv", [
    ["true"], ["echo", "zoë \"q\"\n\u2028 \U0001f600"], ["x" * 80] * 2, ["x" * 84] * 2, ["y" * 2000],
    ["a"] * 300, ["a", 1, None], [],
])
def test_an_exec_summary_is_its_argv_as_json_cut_at_the_limit(argv: list[object]) -> None:
    # A short argv is encoded in one call, a long one piece by piece: the same text.
    assert summarize("exec", {"argv": argv}) == shorten(json.dumps(argv, default=str), MAX_SUMMARY_CHARS)


@pytest.mark.parametrize("changes", RECORD_CASES)
async def test_a_prepared_record_is_the_record_encode_record_writes(nc: NATS, prefix: str,
                                                                   changes: dict[str, object]) -> None:
    # The worker encodes a command's fixed fields while it runs and the rest after it:
    # the joined record must be the same bytes, on the same subject.
    given = fields("c1", **{"identity": {"account": None, "user": "fleetbus"}, **changes})
    data = {key: given[key] for key in AuditRecord.model_fields}  # in the order the worker writes
    auditor = Auditor(nc, Names(prefix))
    whole = auditor.stage(data)
    prepared = auditor.prepare(*(data[key] for key in (  # type: ignore[arg-type]
        "id", "server", "transport", "op", "requester", "identity", "worker", "summary")))
    joined = auditor.stage_prepared(prepared, data["ts"], data["outcome"], data["exit_code"],  # type: ignore[arg-type]
                                    data["duration_s"], data["bytes"], data["replayed"])  # type: ignore[arg-type]
    assert whole is not None
    assert (joined.command_id, joined.subject, joined.data) == (whole.command_id, whole.subject, whole.data)
    model = AuditRecord(**data)  # type: ignore[arg-type]
    assert as_the_model_reads_it(joined.data) == (model, model.model_dump_json())
    await auditor.close()


async def test_records_are_stored_and_acknowledged(nc: NATS, prefix: str) -> None:
    names = Names(prefix)
    state = await open_state(nc, names)
    auditor = Auditor(nc, names)
    for i in range(50):
        await auditor.record(fields(f"cmd-{i}"))
    await auditor.record(AuditRecord(**fields("admin-1", server="web1", op="servers.add")),  # type: ignore[arg-type]
                         admin=True)
    await wait_until(lambda: auditor.pending == 0)
    info = await state.js.stream_info(names.audit_stream)
    assert info.state.messages == 51
    last = await state.js.get_last_msg(names.audit_stream, names.audit("web1", "exec"))
    assert AuditRecord.model_validate_json(last.data).id == "cmd-49"
    admin = await state.js.get_last_msg(names.audit_stream, names.audit("_admin", "servers.add"))
    assert AuditRecord.model_validate_json(admin.data).id == "admin-1"
    await auditor.close()


async def test_a_record_no_stream_takes_is_logged(nc: NATS, prefix: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    # No audit stream for this prefix: no responders, a 503 sent again until the window ends.
    auditor = Auditor(nc, Names(prefix), ack_timeout_s=0.5)
    with caplog.at_level(logging.ERROR, logger="fleetbus.audit"):
        await auditor.record(fields("lost-1"))
        await wait_until(lambda: auditor.pending == 0)
    assert any("lost-1" in r.getMessage() and "not stored" in r.getMessage() and "503" in r.getMessage()
               for r in caplog.records), caplog.text
    await auditor.close()


async def test_a_stream_that_stops_answering_is_bounded_and_reported(
        nc: NATS, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    names = Names(prefix)
    # Something that takes the records but never acknowledges them, like a stalled stream.
    silent = await nc.subscribe(names.audit("web1", ">"))
    auditor = Auditor(nc, names, max_pending=3, ack_timeout_s=1.0, stall_limit_s=0.2)
    with caplog.at_level(logging.ERROR, logger="fleetbus.audit"):
        for i in range(4):
            await auditor.record(fields(f"slow-{i}"))
        # The fourth waited for room, found none, and was dropped rather than queued.
        assert auditor.pending == 3
        assert any("slow-3" in r.getMessage() and "not keeping up" in r.getMessage()
                   for r in caplog.records), caplog.text
        await wait_until(lambda: auditor.pending == 0)
        await wait_until(lambda: sum("not confirmed" in r.getMessage() for r in caplog.records) == 3)
    assert {f"slow-{i}" for i in range(3)} <= {
        word for r in caplog.records if "not confirmed" in r.getMessage() for word in r.getMessage().split()}
    # Room again: the next record goes out.
    await auditor.record(fields("slow-4"))
    assert auditor.pending == 1
    await silent.unsubscribe()
    await auditor.close(wait_s=0.1)
    assert auditor.pending == 0


async def test_a_late_acknowledgement_after_the_timeout_is_ignored(nc: NATS, prefix: str,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    names = Names(prefix)
    held: list[str] = []

    async def hold(msg):  # answers only when told to, like a stream that was stalled
        held.append(msg.reply)

    sub = await nc.subscribe(names.audit("web1", ">"), cb=hold)
    auditor = Auditor(nc, names, ack_timeout_s=0.2)
    with caplog.at_level(logging.ERROR, logger="fleetbus.audit"):
        await auditor.record(fields("late-1"))
        await wait_until(lambda: auditor.pending == 0 and bool(held))
        await nc.publish(held[0], b'{"error":{"code":500,"description":"late"}}')
        await nc.flush()  # the answer comes back to this connection before the flush's PONG
    errors = [r.getMessage() for r in caplog.records]
    assert sum("late-1" in e for e in errors) == 1, errors  # reported once, as not confirmed
    await sub.unsubscribe()
    await auditor.close(wait_s=0.1)


async def test_close_waits_for_outstanding_acknowledgements(nc: NATS, prefix: str) -> None:
    names = Names(prefix)
    await open_state(nc, names)
    auditor = Auditor(nc, names)
    for i in range(200):
        await auditor.record(fields(f"c-{i}"))
    assert auditor.pending > 0
    await asyncio.wait_for(auditor.close(wait_s=10), 15)
    assert auditor.pending == 0
