"""A worker whose NATS server is gone or hung still stops on SIGTERM, within its stop bound.

Seen in the field: a worker serving many servers, its only NATS server killed, ignored
SIGTERM until SIGKILL. Its stop waited, server by server, for status reads that could
not be answered, and for lease and record deletes, each for the KV's own timeout.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fleetbus.stack import STOP_BOUND_S
from support.processes import FLEETBUS, Daemon, NatsServer, own_user, stop_process, wait_for

SERVERS = 20


@pytest.mark.parametrize("nats_fate", ["killed", "hung"])
def test_a_worker_without_its_nats_server_stops_on_sigterm(tmp_path: Path, nats_fate: str) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETBUS_") or k == "FLEETBUS_TUNING"}
    env.update(FLEETBUS_NATS_URL=nats.url, FLEETBUS_PREFIX="s" + secrets.token_hex(4),
               FLEETBUS_HOME=str(tmp_path / "home"),
               FLEETBUS_MASTER_KEY=base64.b64encode(secrets.token_bytes(32)).decode())
    core = Daemon(["core"], env, tmp_path / "core.log", "fleetbus core").start()
    worker: Daemon | None = None
    try:
        names = [f"st{i}" for i in range(SERVERS)]
        for name in names:
            subprocess.run([FLEETBUS, "servers", "add", name, "--transport", "local"], env=env,
                           capture_output=True, timeout=60, check=True)
        worker = Daemon(["worker", "--transports", "local,agent-outbound", "--local-user", own_user(),
                         "--gateway-listen", "127.0.0.1:0"], env, tmp_path / "worker.log", "serving local").start()
        # Every server served (and so one status read each on the way out).
        for name in names:
            wait_for(lambda name=name: subprocess.run([FLEETBUS, "ping", name], env=env, capture_output=True, check=False,
                                                      timeout=60).returncode == 0, timeout=30, what=f"{name}")
        core.stop()
        assert nats.proc is not None
        if nats_fate == "killed":
            stop_process(nats.proc, signal.SIGKILL)
        else:
            # Hung (SIGSTOP, a paused VM): the connection looks alive, every request
            # waits for its timeout, and only the bound ends the stop.
            nats.proc.send_signal(signal.SIGSTOP)
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        # The documented bound, and a margin for a loaded machine; then SIGKILL, which
        # is what the bug needed.
        try:
            code = worker.proc.wait(STOP_BOUND_S + 10)
        except subprocess.TimeoutExpired:
            code = None
        print(f"\nNATS server {nats_fate}: the worker exited with {code} {time.monotonic() - sent:.1f} s after SIGTERM")
        log = worker.log_path.read_text(errors="replace")
        assert code is not None, f"the worker ignored SIGTERM; its log:\n{log[-3000:]}"
        if nats_fate == "killed":
            # Stopped by its own stop path, not by the bound's last resort, and without an error.
            assert code == 0, log[-3000:]
            assert "stopping took longer" not in log
        else:
            # Its own stop path or the bound's last resort, whichever ends first.
            assert code == 0 or (code == 1 and "stopping took longer than" in log), log[-3000:]
    finally:
        if worker is not None:
            worker.stop(signal.SIGKILL)
        core.stop()
        if nats.proc is not None and nats.proc.poll() is None:
            nats.proc.send_signal(signal.SIGCONT)
        nats.stop()
