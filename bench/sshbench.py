"""Benchmarks against a real OpenSSH sshd: the ssh transport vs OpenSSH's own client.

Baselines: `ssh` with ControlMaster (one connection reused, like fleetbus) for
`exec true`, and `scp` to the same sshd for file transfer.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

from harness import ROOT, Stack, percentile  # noqa: F401
from support.sshd import Sshd, generate_key, require_sshd

MS = 1000.0
MiB = 1024 * 1024
_lab: dict[str, object] = {}


def _sshd() -> tuple[Sshd, Path]:
    if "sshd" not in _lab:
        require_sshd()
        base = Path(tempfile.mkdtemp(prefix="fleetbus-bench-ssh-"))
        key = generate_key(base, "id_bench")
        server = Sshd(base / "sshd")
        server.authorize(key.public)
        server.start()
        key_file = base / "id_bench"
        os.chmod(key_file, 0o600)
        _lab.update(sshd=server, key=key_file, base=base)
    return _lab["sshd"], _lab["key"]  # type: ignore[return-value]


def _ssh_opts(key: Path) -> list[str]:
    return ["-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "BatchMode=yes"]


def scp_baseline(src: Path, dest: Path) -> float:
    server, key = _sshd()
    t0 = time.perf_counter()
    subprocess.run(["scp", "-q", *_ssh_opts(key), "-P", str(server.port), str(src),
                    f"root@{server.host}:{dest}"], check=True)
    return time.perf_counter() - t0


def _scp_get(remote: Path, dest: Path) -> float:
    server, key = _sshd()
    t0 = time.perf_counter()
    subprocess.run(["scp", "-q", *_ssh_opts(key), "-P", str(server.port),
                    f"root@{server.host}:{remote}", str(dest)], check=True)
    return time.perf_counter() - t0


class _ControlMaster:
    """OpenSSH `ssh` with a ControlMaster to the same sshd: the baseline for exec."""

    def __init__(self) -> None:
        server, key = _sshd()
        self.control = Path(_lab["base"]) / "cm.sock"  # type: ignore[arg-type]
        self.host = f"root@{server.host}"
        self.base = ["ssh", *_ssh_opts(key), "-p", str(server.port), "-o", "ControlMaster=auto",
                     "-o", f"ControlPath={self.control}", "-o", "ControlPersist=60", self.host]

    async def run_true(self) -> None:
        proc = await asyncio.create_subprocess_exec(*self.base, "true")
        if await proc.wait() != 0:
            raise RuntimeError("ssh with ControlMaster failed")

    def close(self) -> None:
        subprocess.run(["ssh", "-o", f"ControlPath={self.control}", "-O", "exit", self.host],
                       capture_output=True, check=False)


async def ssh_rows(work: Path, sizes) -> list:
    from figures import Row, _alternating_transfers, _exec_true, _interleaved, source_file

    server, key = _sshd()
    stack = await Stack.start(work / "sshstack")
    try:
        await stack.client.add_credential("bench-key", "ssh-key", key.read_bytes(), user="root")
        await stack.client.add_server({"name": "bench-ssh", "transport": "ssh", "host": server.host,
                                       "port": server.port, "credential": "bench-key",
                                       "options": {"host_key": server.host_key_line}})
        n = sizes.ssh_exec_n
        master = _ControlMaster()
        try:
            fb, cm = await _interleaved(_exec_true(stack, "bench-ssh"), master.run_true, n)
        finally:
            master.close()
        f, b = percentile(fb, 50) * MS, percentile(cm, 50) * MS
        rows = [Row("exec true on ssh, p50", f, b, "ms", "ratio <= 1.1 (vs ssh ControlMaster)", f / b <= 1.1)]
        src, _ = await source_file(work, sizes.sftp_mib)
        remote = work / "sftp-remote.bin"

        async def put(dest: Path) -> None:
            await stack.client.put("bench-ssh", src, str(dest))

        async def get(dest: Path) -> None:
            await stack.client.get("bench-ssh", str(remote), dest)

        rounds = sizes.transfer_rounds
        put_s, scp_put = await _alternating_transfers(put, lambda dest: scp_baseline(src, dest),
                                                      work / "put-dest.bin", rounds)
        await put(remote)
        get_s, scp_get = await _alternating_transfers(get, lambda dest: _scp_get(remote, dest),
                                                      work / "get-dest.bin", rounds)
        mib = sizes.sftp_mib
        note = f"median of {rounds}, alternating with scp"
        rows.append(Row(f"{mib} MiB put on ssh (SFTP)", mib / put_s, mib / scp_put, "MiB/s",
                        "ratio >= 1.0 (vs scp)", scp_put / put_s >= 1.0, note=note))
        rows.append(Row(f"{mib} MiB get on ssh (SFTP)", mib / get_s, mib / scp_get, "MiB/s",
                        "ratio >= 1.0 (vs scp)", scp_get / get_s >= 1.0, note=note))
        return rows
    finally:
        await stack.stop()


def stop() -> None:
    server = _lab.get("sshd")
    if server is not None:
        server.stop()  # type: ignore[attr-defined]
