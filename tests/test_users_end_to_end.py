"""Issue 21 end to end on `fleetbus up`'s own NATS: a user made with `fleetbus users add`
runs a command on a server its grant selects, through a real worker, with its output on
its own inbox and its identity in the audit trail; a server outside the grant is
unreachable for it. (test_users.py and test_identity.py test the parts alone.)"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import nats.errors
from fleetbus.subjects import Names
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from support.auditread import audit_records
from support.processes import Fleet, until
from test_users import UserClient, add_user

NAMES = Names("fleetbus")


async def test_a_user_runs_where_its_grant_reaches_and_is_audited_as_itself(
        fleet: Fleet, fleet_nc: NATS, tmp_path: Path) -> None:
    for name, role in (("web7", "web"), ("db7", "db")):
        added = fleet.cli("servers", "add", name, "--transport", "local", "--role", role)
        assert added.returncode == 0, added.stderr
    seed, made = add_user(fleet, tmp_path, "deployer", "--allow", "exec:role=web")
    grant = made["user"]["grants"][0]["id"]
    user = await UserClient().connect(fleet.nats_url, seed, "deployer")
    try:
        assert user.nc is not None
        output = f"{user.inbox}out.{uuid.uuid4().hex}"
        chunks: list[bytes] = []

        async def keep(msg: Msg) -> None:
            chunks.append(msg.data)

        sub = await user.nc.subscribe(output, cb=keep)
        await user.nc.flush()
        command_id = f"deploy-{uuid.uuid4().hex[:12]}"
        body = json.dumps({"id": command_id, "argv": ["echo", "from deployer"], "output_subject": output,
                           "timeout_s": 30}).encode()

        async def ran() -> dict | None:
            # The worker subscribes the grant's subject once the users bucket reaches it.
            try:
                msg = await user.nc.request(NAMES.grant(grant, "web7", "exec"), body, timeout=10)  # type: ignore[union-attr]
            except nats.errors.NoRespondersError:
                return None
            return json.loads(msg.data)

        deadline = time.monotonic() + 15
        while (reply := await ran()) is None:
            assert time.monotonic() < deadline, "web7 never reachable through the deployer's grant"
            await asyncio.sleep(0.05)
        assert reply["ok"] is True and reply["exit_code"] == 0, reply
        await until(lambda: b"from deployer" in b"".join(chunks), what="live output on the user's inbox")
        await sub.unsubscribe()

        # db7 is not in the grant's role: no worker serves it on the grant, and the
        # server's own subject is refused by NATS.
        try:
            await user.nc.request(NAMES.grant(grant, "db7", "exec"), body, timeout=5)
            raise AssertionError("db7 answered on a grant that does not select it")
        except nats.errors.NoRespondersError:
            pass
        assert await user.refused(NAMES.server("db7", "exec"))

        records = await audit_records(fleet_nc, NAMES.audit_stream, NAMES.audit_all, {command_id})
        (record,) = records[command_id]
        assert record["server"] == "web7" and record["outcome"] == "ok"
        assert record["identity"]["name"] == "deployer", record
        assert record["identity"]["user"] == made["user"]["public_key"], record
    finally:
        await user.close()
