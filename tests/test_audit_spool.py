"""Audit records kept on the worker's disk until stored (core/fleetbus/auditspool.py).

The spool's own rules on files (a stored record marked in place and never sent again,
segments rotated and deleted, a live process's segments left alone, a torn line
skipped), then the promise with real processes: a worker killed with SIGKILL while the
audit stream could not store its records loses none; the next worker on the same home
sends them, and the stream holds each exactly once; and a worker killed after its
records were stored sends none of them again, with no help from the stream's duplicate
window.
"""

from __future__ import annotations

import json
import secrets
import signal
from pathlib import Path
from typing import NamedTuple

import pytest
from fleetbus.audit import encode_record
from fleetbus.auditspool import AuditSpool
from fleetbus.client import Client
from fleetbus.host import _audit_spool
from fleetbus.jetstream import open_state
from fleetbus.subjects import Names
from nats.aio.client import Client as NATS
from support.auditread import audit_records
from support.processes import Daemon, until
from test_audit import fields
from test_worker_crash import Deployment, add_server, conn, deployment  # noqa: F401 (fixtures)


def spooled(folder: Path) -> list[bytes]:
    return [line for path in sorted(folder.glob("*.spool")) for line in path.read_bytes().splitlines()]


def waiting(folder: Path) -> list[bytes]:
    """The message ids of the records in ``folder`` not marked stored."""
    return [line.split(b" ", 2)[1] for line in spooled(folder) if line.startswith(b"+ ")]


def record_of(line: bytes) -> dict[str, object]:
    return json.loads(line.split(b" ", 3)[3])


class OneWorker(NamedTuple):
    """A deployment's one worker serving server s1, a client of it, and its audit spool."""

    names: Names
    worker: Daemon
    fb: Client
    spool: Path


@pytest.fixture
async def one_worker(
        deployment: Deployment, conn: NATS) -> OneWorker:  # noqa: F811 (the fixtures imported above)
    names = Names(deployment.prefix)
    worker = deployment.add_worker()
    await add_server(conn, deployment.prefix, "s1")
    spool = Path(deployment.env["FLEETBUS_HOME"]) / "audit-spool"
    return OneWorker(names, worker, Client(conn, names), spool)


def test_a_stored_record_is_marked_and_a_full_segment_deleted_once_stored(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    line = len(b"+ m1 x.audit.web1.exec " + encode_record(fields("c1")) + b"\n")
    spool = AuditSpool(folder, segment_bytes=3 * line - 1)  # three records to a segment
    kept = [spool.append(f"m{n}", "x.audit.web1.exec", encode_record(fields(f"c{n}"))) for n in (1, 2, 3)]
    assert waiting(folder) == [b"m1", b"m2", b"m3"]
    spool.settle(kept[1])  # acknowledgements come in any order
    assert waiting(folder) == [b"m1", b"m3"]
    spool.settle(kept[0])
    spool.settle(kept[2])
    # Drained: every record marked stored, the file not rewritten.
    assert waiting(folder) == [] and len(spooled(folder)) == 3
    other = AuditSpool(folder)
    assert other.adopt() == []  # a live writer's file: left alone
    other.close(keep=False)
    # Past the segment size a new file starts; a stored one is deleted at once, one with
    # records waiting once they are stored.
    later = spool.append("m4", "x.audit.web1.exec", encode_record(fields("c4")))
    assert later is not None and later.segment is not kept[0].segment  # type: ignore[union-attr]
    assert [line.split(b" ", 2)[1] for line in spooled(folder)] == [b"m4"]
    more = [spool.append(f"m{n}", "x.audit.web1.exec", encode_record(fields(f"c{n}"))) for n in (5, 6)]
    newest = spool.append("m9", "x.audit.web1.exec", encode_record(fields("c9")))
    assert len(list(folder.glob("*.spool"))) == 2
    for entry in [later, *more]:
        spool.settle(entry)
    assert len(list(folder.glob("*.spool"))) == 1 and waiting(folder) == [b"m9"]
    spool.settle(newest)
    spool.close(keep=False)
    assert list(folder.glob("*.spool")) == []


def test_a_dead_process_stored_records_are_not_adopted(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    dead = AuditSpool(folder)
    kept = [dead.append(f"m{n}", "x.audit.web1.exec", encode_record(fields(f"c{n}"))) for n in range(4)]
    dead.settle(kept[0])
    dead.settle(kept[2])
    dead.close(keep=True)  # killed: two records stored, two waiting
    adopted = AuditSpool(folder).adopt()
    assert [r.command_id for r in adopted] == ["c1", "c3"]


def test_only_a_dead_process_segments_are_adopted_and_a_torn_line_is_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    alive = AuditSpool(folder)
    alive.append("live-1", "x.audit.web1.exec", encode_record(fields("live")))
    dead = AuditSpool(folder)
    dead.append("gone-1", "x.audit.web1.exec", encode_record(fields("gone")))
    dead.append("gone-2", "x.audit.web2.exec", encode_record(fields("gone2", server="web2")))
    dead.close(keep=True)  # what a killed process leaves: the file, no lock
    torn = next(p for p in folder.glob("*.spool") if b"gone-1" in p.read_bytes())
    with torn.open("ab") as f:
        # A line from before records were marked counts as waiting.
        f.write(b"gone-0 x.audit.web1.exec " + encode_record(fields("old")) + b"\n")
        f.write(b'+ gone-3 x.audit.web1.exec {"id": "half')  # its writer died mid-line

    heir = AuditSpool(folder)
    adopted = heir.adopt()
    assert [(r.msg_id, r.subject, r.command_id) for r in adopted] == [
        ("gone-1", "x.audit.web1.exec", "gone"), ("gone-2", "x.audit.web2.exec", "gone2"),
        ("gone-0", "x.audit.web1.exec", "old")]
    assert not torn.exists()
    # The living process's record is untouched; the adopted ones are in the heir's file.
    assert sorted(waiting(folder)) == [b"gone-0", b"gone-1", b"gone-2", b"live-1"]
    assert AuditSpool(folder).adopt() == []  # both writers are alive now
    for record in adopted:
        heir.settle(record.kept)
    assert waiting(folder) == [b"live-1"]


async def test_a_worker_killed_before_its_records_were_stored_loses_none(
        deployment: Deployment, conn: NATS,  # noqa: F811 (the fixtures imported above)
        one_worker: OneWorker) -> None:
    names, worker, fb, spool = one_worker
    await fb.exec("s1", ["true"], timeout_s=10)  # served: the worker's session is open
    # Without the stream every record is refused (503), kept and sent again.
    js = conn.jetstream()
    await js.delete_stream(names.audit_stream)
    ids = [f"spool-{secrets.token_hex(3)}-{n}" for n in range(5)]
    for command_id in ids:
        await fb.exec("s1", ["true"], timeout_s=10, command_id=command_id)
    held = {record_of(line)["id"] for line in spooled(spool) if line.startswith(b"+ ")}
    assert set(ids) <= held, held
    worker.stop(signal.SIGKILL)

    await open_state(conn, names)  # the stream is back, empty
    deployment.add_worker()  # the next worker on this home
    records = await audit_records(conn, names.audit_stream, names.audit("s1", "exec"), set(ids), timeout=30)
    assert {cid: len(records.get(cid, [])) for cid in ids} == {cid: 1 for cid in ids}
    assert all(r["outcome"] == "ok" and r["server"] == "s1" for cid in ids for r in records[cid])
    await until(lambda: not any(cid.encode() in line for cid in ids for line in spooled(spool)
                                if line.startswith(b"+ ")), 30,
                "the recovered records marked stored")


async def test_a_worker_killed_after_its_records_were_stored_sends_none_again(
        deployment: Deployment, conn: NATS,  # noqa: F811 (the fixtures imported above)
        one_worker: OneWorker) -> None:
    names, worker, fb, spool = one_worker
    ids = [f"drained-{secrets.token_hex(3)}-{n}" for n in range(5)]
    for command_id in ids:
        await fb.exec("s1", ["true"], timeout_s=10, command_id=command_id)
    # Every record stored and marked so: the spool is drained, its file not emptied.
    await until(lambda: {record_of(line)["id"] for line in spooled(spool) if line.startswith(b"- ")} >= set(ids)
                and not waiting(spool), 30, "the records marked stored")
    records = await audit_records(conn, names.audit_stream, names.audit("s1", "exec"), set(ids), timeout=30)
    assert {cid: len(records.get(cid, [])) for cid in ids} == {cid: 1 for cid in ids}
    worker.stop(signal.SIGKILL)  # right after: the segment still holds the stored records

    # A fresh stream stands for a restart after the duplicate window (2 min) has passed:
    # it remembers no message id, so a record sent again would be stored again.
    js = conn.jetstream()
    await js.delete_stream(names.audit_stream)
    await open_state(conn, names)
    deployment.add_worker()  # the next worker on this home
    marker = f"after-{secrets.token_hex(3)}"
    await fb.exec("s1", ["true"], timeout_s=30, command_id=marker)
    # The new worker sends what it recovered before it serves, on the same connection, so
    # the stream has stored any of it before the marker's record.
    again = await audit_records(conn, names.audit_stream, names.audit("s1", "exec"), {marker}, timeout=30)
    assert marker in again
    assert not set(ids) & set(again), again


def test_a_home_that_cannot_hold_a_spool_leaves_the_worker_without_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "audit-spool"
    blocked.write_text("not a folder")  # mkdir fails, as on a read-only home
    with caplog.at_level("ERROR"):
        assert _audit_spool(blocked) is None
    assert "cannot be kept on disk" in caplog.text and str(blocked) in caplog.text
