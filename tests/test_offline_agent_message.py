"""What a command to a server nobody serves says: an away agent is named as such, with
when it was last seen; a transport no worker runs keeps the general message."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from support.agents import Agent, add_agent_server, gateway_of, wait_online
from support.processes import Fleet, wait_for

LAST_SEEN = re.compile(r"last seen (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC")


def test_command_to_a_stopped_agent_says_it_is_not_connected_and_when_it_was_seen(
        fleet: Fleet, tmp_path: Path) -> None:
    key = add_agent_server(fleet, "away1")
    gw = gateway_of(fleet)
    agent = Agent(tmp_path / "agent", gw["address"], gw["fingerprint"], key).start()
    try:
        wait_online(fleet, "away1")
        connected_at = datetime.now(UTC).replace(microsecond=0)
    finally:
        agent.stop()
    # Until the gateway sees the connection close, a ping may fail otherwise (the link
    # going down): wait for the answer of a server nobody serves.
    proc = wait_for(lambda: (p := fleet.cli("ping", "away1")).returncode != 0
                    and "nobody serves away1" in p.stderr and p or None,
                    what="away1 unserved after its agent stopped")
    assert "nobody serves away1 right now: its agent is not connected" in proc.stderr, proc.stderr
    assert "'agent-outbound' transport" not in proc.stderr
    seen = LAST_SEEN.search(proc.stderr)
    assert seen is not None, proc.stderr
    seen_at = datetime.strptime(seen.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    # The time the gateway last saw the agent: after it connected, not some other date.
    assert connected_at.timestamp() - 1 <= seen_at.timestamp() <= datetime.now(UTC).timestamp()


def test_an_agent_that_never_connected_is_never_seen(fleet: Fleet) -> None:
    add_agent_server(fleet, "away2")
    proc = fleet.cli("ping", "away2")
    assert proc.returncode != 0
    assert "its agent is not connected (never seen)" in proc.stderr, proc.stderr


def test_a_transport_no_worker_runs_keeps_the_general_message(fleet: Fleet) -> None:
    assert fleet.cli("servers", "add", "nowhere1", "--transport", "no-such-transport").returncode == 0
    proc = fleet.cli("ping", "nowhere1")
    assert proc.returncode != 0
    assert "no running worker has the 'no-such-transport' transport for it" in proc.stderr, proc.stderr


def test_a_job_says_when_a_server_it_found_unserved_was_last_seen(fleet: Fleet, tmp_path: Path) -> None:
    """A job's ``offline`` result carries the same explanation as a single command:
    the server's last state and when it was last seen."""
    key = add_agent_server(fleet, "away3")
    gw = gateway_of(fleet)
    agent = Agent(tmp_path / "agent", gw["address"], gw["fingerprint"], key).start()
    try:
        wait_online(fleet, "away3")
    finally:
        agent.stop()
    wait_for(lambda: (p := fleet.cli("ping", "away3")).returncode != 0 and "nobody serves away3" in p.stderr,
             what="away3 unserved after its agent stopped")
    proc = fleet.cli("run", "--servers", "away3", "--json", "--", "true")
    assert proc.returncode != 0
    assert re.search(r"nobody serves away3 right now: offline \(last seen \d{4}-\d\d-\d\d [\d:]+ UTC, \d+ s ago\)",
                     proc.stdout + proc.stderr), proc.stdout + proc.stderr
