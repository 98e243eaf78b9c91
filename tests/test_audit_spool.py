"""Audit records kept on the worker's disk until stored (core/fleetbus/auditspool.py).

The spool's own rules on files (emptied when drained, segments rotated and deleted,
a live process's segments left alone, a torn line skipped), then the promise with real
processes: a worker killed with SIGKILL while the audit stream could not store its
records loses none; the next worker on the same home sends them, and the stream holds
each exactly once.
"""

from __future__ import annotations

import json
import secrets
import signal
from pathlib import Path

import pytest
from fleetbus.audit import encode_record
from fleetbus.auditspool import AuditSpool
from fleetbus.client import Client
from fleetbus.host import _audit_spool
from fleetbus.jetstream import open_state
from fleetbus.subjects import Names
from nats.aio.client import Client as NATS
from support.auditread import audit_records
from support.processes import until
from test_audit import fields
from test_worker_crash import Deployment, add_server, conn, deployment  # noqa: F401 (fixtures)


def spooled(folder: Path) -> list[bytes]:
    return [line for path in sorted(folder.glob("*.spool")) for line in path.read_bytes().splitlines()]


def test_a_drained_spool_is_emptied_and_a_full_segment_deleted_once_stored(tmp_path: Path) -> None:
    spool = AuditSpool(tmp_path / "spool", segment_bytes=600)
    first = spool.append("m1", "x.audit.web1.exec", encode_record(fields("c1")))
    second = spool.append("m2", "x.audit.web1.exec", encode_record(fields("c2")))
    assert [line.split(b" ", 1)[0] for line in spooled(tmp_path / "spool")] == [b"m1", b"m2"]
    spool.settle(first)
    assert len(spooled(tmp_path / "spool")) == 2  # c2 is still outstanding
    spool.settle(second)
    assert spooled(tmp_path / "spool") == []  # drained: emptied
    # Past the segment size a new file starts; the old one goes once all of it is stored.
    old = [spool.append(f"m{n}", "x.audit.web1.exec", encode_record(fields(f"c{n}"))) for n in range(3)]
    new = spool.append("m9", "x.audit.web1.exec", encode_record(fields("c9")))
    assert new is not old[0] and len(list((tmp_path / "spool").glob("*.spool"))) == 2
    for segment in old:
        spool.settle(segment)
    assert [line.split(b" ", 1)[0] for line in spooled(tmp_path / "spool")] == [b"m9"]
    spool.close(keep=False)
    assert list((tmp_path / "spool").glob("*.spool")) == []


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
        f.write(b'gone-3 x.audit.web1.exec {"id": "half')  # its writer died mid-line

    heir = AuditSpool(folder)
    adopted = heir.adopt()
    assert [(r.msg_id, r.subject, r.command_id) for r in adopted] == [
        ("gone-1", "x.audit.web1.exec", "gone"), ("gone-2", "x.audit.web2.exec", "gone2")]
    assert not torn.exists()
    # The living process's record is untouched; the adopted ones are in the heir's file.
    ids = sorted(line.split(b" ", 1)[0] for line in spooled(folder))
    assert ids == [b"gone-1", b"gone-2", b"live-1"]
    assert AuditSpool(folder).adopt() == []  # both writers are alive now
    for record in adopted:
        heir.settle(record.segment)
    assert sorted(line.split(b" ", 1)[0] for line in spooled(folder)) == [b"live-1"]


async def test_a_worker_killed_before_its_records_were_stored_loses_none(
        deployment: Deployment, conn: NATS) -> None:  # noqa: F811 (the fixtures imported above)
    names = Names(deployment.prefix)
    worker = deployment.add_worker()
    await add_server(conn, deployment.prefix, "s1")
    fb = Client(conn, names)
    await fb.exec("s1", ["true"], timeout_s=10)  # served: the worker's session is open
    # Without the stream every record is refused (503), kept and sent again.
    js = conn.jetstream()
    await js.delete_stream(names.audit_stream)
    ids = [f"spool-{secrets.token_hex(3)}-{n}" for n in range(5)]
    for command_id in ids:
        await fb.exec("s1", ["true"], timeout_s=10, command_id=command_id)
    spool = Path(deployment.env["FLEETBUS_HOME"]) / "audit-spool"
    held = {json.loads(line.split(b" ", 2)[2])["id"] for line in spooled(spool)}
    assert set(ids) <= held, held
    worker.stop(signal.SIGKILL)

    await open_state(conn, names)  # the stream is back, empty
    deployment.add_worker()  # the next worker on this home
    records = await audit_records(conn, names.audit_stream, names.audit("s1", "exec"), set(ids), timeout=30)
    assert {cid: len(records.get(cid, [])) for cid in ids} == {cid: 1 for cid in ids}
    assert all(r["outcome"] == "ok" and r["server"] == "s1" for cid in ids for r in records[cid])
    await until(lambda: not any(cid.encode() in line for cid in ids for line in spooled(spool)), 30,
                "the recovered records leaving the spool once stored")


def test_a_home_that_cannot_hold_a_spool_leaves_the_worker_without_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "audit-spool"
    blocked.write_text("not a folder")  # mkdir fails, as on a read-only home
    with caplog.at_level("ERROR"):
        assert _audit_spool(blocked) is None
    assert "cannot be kept on disk" in caplog.text and str(blocked) in caplog.text
