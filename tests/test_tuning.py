"""fleetbus.tuning and fleetbus_base.tuning: one switch turns every patch off, and on,
each patch is applied on the library versions this project installs.

Each case runs in a fresh interpreter, because patches are process-wide and once
applied stay applied; the switch is set there explicitly, whatever this run's is.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nats
import pytest
from fleetbus import tuning
from fleetbus.connection import publish_soon, send_now
from fleetbus.tuning import natspy
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from support.ops_helpers import wait_until
from support.processes import Fleet, NatsServer

AGENT = Path(__file__).resolve().parents[1] / "agent"

# What each patch changes, read back from the process it ran in.
OBSERVE = """
import asyncio, gc, json, sys
from asyncio import sslproto
import nats.aio.client
from fleetbus import tuning
from fleetbus.tuning import natspy
from fleetbus_base import heap

def observe(applied):
    watcher = None
    if sys.version_info < (3, 12):
        watcher = type(asyncio.get_event_loop_policy().get_child_watcher()).__name__
    return {
        "applied": sorted(applied),
        "nats_read_buffer": nats.aio.client.DEFAULT_BUFFER_SIZE,
        "nats_direct_writes": natspy._direct,
        "nats_direct_dispatch": natspy.dispatches_directly(),
        "gc_young_threshold": gc.get_threshold()[0],
        "large_buffers": heap._kept,
        "tls_read_buffer": getattr(sslproto.SSLProtocol, "_fleetbus_shared_buffer", False),
        "pidfd_child_watcher": watcher,
        "trim": heap.trim_heap(),
    }
"""


def run_fresh(code: str, switch: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != tuning.ENV}
    if switch is not None:
        env[tuning.ENV] = switch
    done = subprocess.run([sys.executable, "-c", OBSERVE + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_off_applies_no_patch_at_all() -> None:
    for switch in ("off", "OFF", "0", "false"):
        seen = run_fresh("""
            import nats.aio.client
            before = nats.aio.client.DEFAULT_BUFFER_SIZE, gc.get_threshold()[0]
            applied = tuning.apply(tuning.SERVER)
            seen = observe(applied)
            seen["before"] = before
            print(json.dumps(seen))
        """, switch)
        assert seen["applied"] == []
        assert seen["nats_read_buffer"] == seen["before"][0] < natspy.NATS_READ_BUFFER
        assert seen["gc_young_threshold"] == seen["before"][1] < tuning.collector.YOUNG_THRESHOLD
        assert not seen["nats_direct_writes"]
        assert not seen["nats_direct_dispatch"]
        assert not seen["large_buffers"]
        assert not seen["tls_read_buffer"]
        assert seen["pidfd_child_watcher"] in (None, "ThreadedChildWatcher")
        assert not seen["trim"]  # the heap policy is off too


def test_on_applies_every_patch_on_the_versions_installed_here() -> None:
    seen = run_fresh("print(json.dumps(observe(tuning.apply(tuning.SERVER))))", None)
    expected = set(tuning.SERVER)
    if sys.version_info >= (3, 12) or not sys.platform.startswith("linux"):
        expected.discard("pidfd_child_watcher")  # 3.12+ uses pidfds by itself
    if not sys.platform.startswith("linux"):
        expected.discard("large_buffers")
    assert set(seen["applied"]) == expected
    assert seen["nats_read_buffer"] == natspy.NATS_READ_BUFFER
    assert seen["nats_direct_writes"]
    assert seen["nats_direct_dispatch"]
    assert seen["gc_young_threshold"] == tuning.collector.YOUNG_THRESHOLD
    assert seen["tls_read_buffer"]
    if "large_buffers" in expected:
        assert seen["large_buffers"]
    if "pidfd_child_watcher" in expected:
        assert seen["pidfd_child_watcher"] == "PidfdChildWatcher"


def test_each_entry_point_role_applies_only_its_patches() -> None:
    seen = run_fresh("print(json.dumps(observe(tuning.apply(tuning.CLIENT))))", "on")
    assert seen["applied"] == sorted(tuning.CLIENT)
    assert not seen["tls_read_buffer"] and not seen["large_buffers"]
    with pytest.raises(ValueError, match="no_such_patch"):
        tuning.apply(("no_such_patch",))  # a typo at an entry point is a bug, not "not applied"


def test_a_library_that_changed_leaves_its_patch_not_applied_and_says_so() -> None:
    seen = run_fresh("""
        import logging
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
        from asyncio import sslproto
        del nats.aio.client.DEFAULT_BUFFER_SIZE  # as if nats-py had renamed it
        class Plain(asyncio.Protocol):  # as if asyncio's TLS protocol had no buffer to share
            pass
        sslproto.SSLProtocol = Plain
        nats.aio.client.Client.__init__ = lambda self: None  # a Client without the parts used
        import nats.aio.subscription
        nats.aio.subscription.Subscription.__init__ = lambda self, *a: None
        print(json.dumps({"applied": sorted(tuning.apply(tuning.SERVER))}))
    """, None)
    assert not {"nats_read_buffer", "nats_direct_writes", "nats_direct_dispatch",
                "tls_read_buffer"} & set(seen["applied"])
    assert "gc_young_threshold" in seen["applied"]  # the others still apply


def test_the_agent_applies_its_own_patches_with_the_standard_library_alone() -> None:
    code = f"""
        import json, sys
        sys.path.insert(0, {str(AGENT)!r})
        from fleetbus_base import tuning
        print(json.dumps(sorted(tuning.apply())))
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("fleetbus", "nats"))))
    """
    for switch, expected in (("off", set()), ("on", {"tls_read_buffer"})):
        env = {k: v for k, v in os.environ.items() if k != tuning.ENV}
        env[tuning.ENV] = switch
        done = subprocess.run([sys.executable, "-I", "-c", textwrap.dedent(code)], env=env,
                              capture_output=True, text=True, timeout=60, check=True)
        applied, foreign = (json.loads(line) for line in done.stdout.splitlines())
        assert foreign == []
        assert expected <= set(applied)
        if switch == "off":
            assert applied == []


def test_the_agent_tuning_module_parses_as_python_3_9() -> None:
    # It ships in the agent's zipapp, which runs on 3.9.
    source = (AGENT / "fleetbus_base" / "tuning.py").read_text()
    ast.parse(source, filename="tuning.py", feature_version=(3, 9))


async def test_without_direct_writes_every_message_still_goes_out_in_order(
        nats_server: NatsServer, nc: NATS, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What FLEETBUS_TUNING=off leaves: nats-py's own publishing, from a callback too."""
    monkeypatch.setattr(natspy, "_direct", False)
    got: list[bytes] = []

    async def collect(msg: Msg) -> None:
        got.append(msg.data)

    await nc.subscribe(f"{prefix}.plain", cb=collect)
    await nc.flush()
    sender = await nats.connect(nats_server.url)
    try:
        def burst() -> None:  # as from a dispatch callback: no await possible
            for i in range(200):
                assert publish_soon(sender, f"{prefix}.plain", b"%d" % i)
            assert not publish_soon(sender, "has space", b"x")

        asyncio.get_running_loop().call_soon(burst)
        await wait_until(lambda: len(got) == 200)
        assert got == [b"%d" % i for i in range(200)]
        await sender.publish(f"{prefix}.plain", b"last")
        send_now(sender)
        assert sender._pending  # left for nats-py's flusher
        await wait_until(lambda: len(got) == 201)
    finally:
        await sender.close()


def test_fleetbus_up_applies_the_server_patches_at_start(fleet: Fleet) -> None:
    line = next((ln for ln in fleet.output().splitlines() if "fleetbus: tuning: " in ln), None)
    assert line is not None, fleet.output()[-2000:]
    shown = line.split("fleetbus: tuning: ", 1)[1].strip()
    if not tuning.enabled():
        assert shown == f"none ({tuning.ENV}=off)"
        return
    expected = set(tuning.SERVER)
    if sys.version_info >= (3, 12):
        expected.discard("pidfd_child_watcher")
    assert set(shown.split(", ")) == expected
