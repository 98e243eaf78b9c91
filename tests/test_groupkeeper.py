"""fleetbus_base.ops.groupkeeper on its own: a process that runs commands through
ChildProcess with the keeper enabled is SIGKILLed, and no process of its commands'
groups survives it, also after its keeper was killed and started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.processes import group_members, stop_process, wait_for

# The parent: enables the keeper, starts commands that each leave a grandchild in their
# group, prints their pgids and the keeper's pid, then waits for orders on stdin.
PARENT = r"""
import asyncio, sys
from fleetbus_base.ops import groupkeeper
from fleetbus_base.ops.child import ChildProcess

async def main():
    groupkeeper.enable()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).strip():
        if line == b"start":
            child = ChildProcess.start(["sh", "-c", "sleep 300 & sleep 300"], cwd=None, env=None,
                                       stdin=None, on_output=lambda fd, data: None,
                                       on_eof=lambda fd: None, on_exit=lambda: None)
            print("group", child.pid, flush=True)
        elif line == b"keeper":
            print("keeper", groupkeeper.keeper_pid(), flush=True)

asyncio.run(main())
"""


def ask(parent: subprocess.Popen[str], order: str) -> int:
    assert parent.stdin is not None and parent.stdout is not None
    parent.stdin.write(order + "\n")
    parent.stdin.flush()
    return int(parent.stdout.readline().split()[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_groups_of_a_killed_parent_are_killed_even_after_its_keeper_was_replaced() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        first = ask(parent, "start")
        wait_for(lambda: len(group_members(first)) == 3, what="sh and its two sleeps")
        keeper = ask(parent, "keeper")
        os.kill(keeper, signal.SIGKILL)
        wait_for(lambda: not Path(f"/proc/{keeper}").exists() or
                 Path(f"/proc/{keeper}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                 what="the keeper to die")
        second = ask(parent, "start")  # starts a new keeper, told of both groups
        assert ask(parent, "keeper") != keeper
        wait_for(lambda: len(group_members(second)) == 3, what="the second command")
        assert len(group_members(first)) == 3  # the keeper's death alone killed nothing

        parent.kill()
        parent.wait()
        killed = time.monotonic()
        wait_for(lambda: not group_members(first) and not group_members(second), timeout=10,
                 what="every process of both commands to be killed")
        print(f"\nboth commands' groups were gone {time.monotonic() - killed:.3f} s after SIGKILL of their parent")
    finally:
        stop_process(parent, signal.SIGKILL)
