"""Floors: the figures of issue 8 with fleetbus's own work taken out.

Each floor runs the same traffic as its figure through the layers the design fixes
(nats-py and nats-server, asyncio, TLS, paramiko) and nothing of fleetbus's host: a
relay process (``floor_relay.py``) stands where ``fleetbus up`` stands, bare TLS peers
(``floor_peers.py``) where the agents are. What a floor reaches is the most fleetbus
could reach on this machine with that design; the gap between a floor and its figure
is what fleetbus's own work costs. A floor that misses its target says the target
needs a different design or machine, not faster fleetbus code.

Also here: the ssh transport driven in this process with no bus at all, which says
how much of the SFTP rows is the transport and how much the bus.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from figures import (
    MS,
    Row,
    Sizes,
    _alternating_transfers,
    _children,
    _interleaved,
    _spawn_true,
    percentile,
    request_rate,
    source_file,
)
from floor_relay import write_chunk
from harness import Stack, stop_process

MiB = 1024 * 1024
HERE = Path(__file__).resolve().parent
NOTE = "no fleetbus host: bus and transport layers only"


def _tls_identity(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 (the relay's TLS listener)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "floor relay")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "floor-cert.pem", directory / "floor-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    os.close(fd)
    return cert_file, key_file


def _start(argv: list[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start a helper process and wait for its ``ready`` line (the rest of it is returned)."""
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})}, cwd=HERE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().split()
    if not line or line[0] != "ready":
        stop_process(proc)
        raise RuntimeError(f"floor helper {argv[0]} did not start")
    return proc, " ".join(line[1:])


class Floor:
    """The relay and its peers, next to a running stack's nats-server."""

    def __init__(self, stack: Stack, work: Path, ssh: dict[str, Any] | None = None) -> None:
        self.stack = stack
        self.work = work
        self.ssh = ssh
        self.relay: subprocess.Popen[bytes] | None = None
        self.peers: list[subprocess.Popen[bytes]] = []
        self.port = 0
        self.cafile = Path()

    async def start(self) -> Floor:
        self.work.mkdir(parents=True, exist_ok=True)
        self.cafile, key = _tls_identity(self.work)
        config = self.work / "relay.json"
        config.write_text(json.dumps({"nats_url": self.stack.fleet.nats_url, "cert": str(self.cafile),
                                      "key": str(key), "ssh": self.ssh}))
        self.relay, port = await asyncio.to_thread(
            _start, ["floor_relay.py", str(config)], {"FLOOR_NATS_TOKEN": self.stack.fleet.token or ""})
        self.port = int(port)
        return self

    async def add_peers(self, mode: str, *args: str) -> None:
        proc, _ = await asyncio.to_thread(_start, ["floor_peers.py", mode, str(self.port), str(self.cafile), *args])
        self.peers.append(proc)

    async def wait_peers(self, count: int, sink: bool, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            reply = await self.request("bench.floor.peers", b"")
            have, has_sink = (int(v) for v in reply.split())
            if have >= count and (has_sink or not sink):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"floor peers: {have} of {count} connected")
            await asyncio.sleep(0.05)

    async def request(self, subject: str, payload: bytes, timeout: float = 30) -> bytes:
        return (await self.stack.client.replies.request(subject, payload, timeout)).data

    def stop(self) -> None:
        for proc in [*self.peers, *([self.relay] if self.relay else [])]:
            stop_process(proc)


async def _send_file(floor: Floor, prefix: str, src: Path, dest: Path) -> None:
    """Stream ``src`` to ``prefix``.open/data/end with at most 4 chunks unanswered."""
    await floor.request(f"{prefix}.open", str(dest).encode())
    window = asyncio.Semaphore(4)
    pending: set[asyncio.Task[Any]] = set()

    async def one(chunk: bytes) -> None:
        try:
            await floor.request(f"{prefix}.data", chunk)
        finally:
            window.release()

    with open(src, "rb", buffering=0) as fh:  # noqa: ASYNC230  (page-cache reads; a floor)
        while chunk := fh.read(MiB):
            await window.acquire()
            task = asyncio.ensure_future(one(chunk))
            pending.add(task)
            task.add_done_callback(pending.discard)
    await asyncio.gather(*pending)
    await floor.request(f"{prefix}.end", b"", timeout=300)


async def _receive_file(floor: Floor, remote: Path, dest: Path) -> None:
    """Ask the relay to send ``remote`` over the bus; write it to ``dest`` as fleetbus's
    client does (drop-behind, fdatasync)."""
    from fleetbus.dispatch import subscribe_direct
    from fleetbus_base.pagecache import DropBehind

    nc = floor.stack.client.nc
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    dropper = DropBehind(fd)
    deliver = nc.new_inbox()
    tasks: set[asyncio.Task[Any]] = set()

    async def ack(reply: str) -> None:
        await nc.publish(reply, b"")

    def on_chunk(msg: Any) -> None:
        write_chunk(fd, msg.data, dropper)
        task = asyncio.ensure_future(ack(msg.reply))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    sub, _ = await subscribe_direct(nc, deliver, on_chunk)
    try:
        await floor.request("bench.floor.sshget", json.dumps({"path": str(remote), "deliver": deliver}).encode(),
                            timeout=300)
        dropper.finish(sync=True)
    finally:
        await sub.unsubscribe()
        os.close(fd)


async def exec_floor(stack: Stack, sizes: Sizes, work: Path) -> list[Row]:
    floor = await Floor(stack, work / "floor-exec").start()
    try:
        async def run() -> None:
            await floor.request("bench.floor.exec", b"{}")

        fl, base = await _interleaved(run, _spawn_true, sizes.exec_n)
    finally:
        floor.stop()
    f, b = percentile(fl, 50) * MS, percentile(base, 50) * MS
    return [Row("floor: exec true through the bus, p50", f, b, "ms", "p50 overhead < 1 ms", (f - b) < 1.0,
                note=f"overhead {f - b:.2f} ms; {NOTE}")]


async def ping_floor(stack: Stack, sizes: Sizes, work: Path) -> list[Row]:
    count = sizes.agents_ping_rate
    floor = await Floor(stack, work / "floor-ping").start()
    try:
        processes = max(1, min(2, count // 250))
        for i in range(processes):
            first = i * count // processes
            await floor.add_peers("echo", str(first), str((i + 1) * count // processes - first))
        await floor.wait_peers(count, sink=False)
        assert floor.relay is not None
        for i in range(count):  # warm every link once
            await floor.request(f"bench.floor.ping.{i}", b"{}")

        async def ping(i: int) -> None:
            await floor.request(f"bench.floor.ping.{i}", b"{}")

        rate, per = await request_rate(ping, count, sizes.ping_seconds,
                                       {"relay": [floor.relay.pid], "nats-server": _children(stack.pid),
                                        "peers": [p.pid for p in floor.peers]})
    finally:
        floor.stop()
    total = sum(per.values())
    spent = ", ".join(f"{k} {v * 1e6:.0f}" for k, v in per.items())
    return [Row(f"floor: ping/s over {count} TLS peers, one relay", rate, None, "cmd/s", ">= 5000/s on two cores",
                rate >= 5000, note=(f"relay CPU {per['relay'] * rate * 100:.0f}% of one core; CPU us per ping: "
                                    f"{spent}; all {total * 1e6:.0f} us; {NOTE}"))]


async def put_floor(stack: Stack, sizes: Sizes, work: Path, scp: Callable[[Path, Path], float] | None) -> list[Row]:
    if scp is None:
        return []
    src, _ = await source_file(work, sizes.put_mib)
    floor = await Floor(stack, work / "floor-put").start()
    try:
        await floor.add_peers("sink")
        await floor.wait_peers(0, sink=True)

        async def put(dest: Path) -> None:
            await _send_file(floor, "bench.floor.put", src, dest)

        fl_s, scp_s = await _alternating_transfers(put, lambda dest: scp(src, dest), work / "floor-put-dest.bin",
                                                   sizes.transfer_rounds)
    finally:
        floor.stop()
    mib = sizes.put_mib
    return [Row(f"floor: {mib} MiB put over the bus and TLS to a bare sink", mib / fl_s, mib / scp_s, "MiB/s",
                "ratio >= 2 vs scp", scp_s / fl_s >= 2,
                note=f"median of {sizes.transfer_rounds}, alternating with scp; no digests; {NOTE}")]


async def ssh_floors(stack: Stack, sizes: Sizes, work: Path) -> list[Row]:
    """SFTP put/get through the bus into the real ssh transport, and the transport alone."""
    try:
        from sshbench import _scp_get, _sshd, scp_baseline
    except ImportError:
        return []
    server, key = _sshd()
    ssh = {"host": server.host, "port": server.port, "host_key": server.host_key_line, "key_file": str(key)}
    mib, rounds = sizes.sftp_mib, sizes.transfer_rounds
    # One file to send and to fetch: it lives on the same machine as sshd.
    src, _ = await source_file(work, mib)
    remote = src
    note = f"median of {rounds}, alternating with scp"
    rows: list[Row] = []
    floor = await Floor(stack, work / "floor-ssh", ssh).start()
    try:
        async def put(dest: Path) -> None:
            await _send_file(floor, "bench.floor.sshput", src, dest)

        async def get(dest: Path) -> None:
            await _receive_file(floor, remote, dest)

        put_s, scp_put = await _alternating_transfers(put, lambda d: scp_baseline(src, d), work / "fp.bin", rounds)
        get_s, scp_get = await _alternating_transfers(get, lambda d: _scp_get(remote, d), work / "fg.bin", rounds)
    finally:
        floor.stop()
    for op, ours, theirs in (("put", put_s, scp_put), ("get", get_s, scp_get)):
        rows.append(Row(f"floor: {mib} MiB {op} on ssh through the bus", mib / ours, mib / theirs, "MiB/s",
                        "ratio >= 1.0 (vs scp)", theirs / ours >= 1.0, note=f"{note}; no digests; {NOTE}"))
    session = await _local_ssh_session(ssh)
    try:
        async def chunks() -> AsyncIterator[bytes]:
            with open(src, "rb", buffering=0) as fh:  # noqa: ASYNC230  (page-cache reads; a floor)
                while chunk := fh.read(MiB):
                    yield chunk

        async def put_direct(dest: Path) -> None:
            from fleetbus.transport import PutSpec

            await session.put(PutSpec(path=str(dest), make_parents=False), chunks())

        async def get_direct(dest: Path) -> None:
            from fleetbus_base.pagecache import DropBehind

            remote_file = await session.get(str(remote))
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                dropper = DropBehind(fd)
                async for chunk in remote_file.chunks:
                    write_chunk(fd, chunk, dropper)
                dropper.finish(sync=True)
            finally:
                os.close(fd)

        put_s, scp_put = await _alternating_transfers(put_direct, lambda d: scp_baseline(src, d), work / "dp.bin",
                                                      rounds)
        get_s, scp_get = await _alternating_transfers(get_direct, lambda d: _scp_get(remote, d), work / "dg.bin",
                                                      rounds)
    finally:
        await session.close()
    for op, ours, theirs in (("put", put_s, scp_put), ("get", get_s, scp_get)):
        rows.append(Row(f"ssh transport alone: {mib} MiB {op}, no bus", mib / ours, mib / theirs, "MiB/s",
                        "(what the transport itself does)", None, note=f"{note}; in the benchmark's process"))
    return rows


async def _local_ssh_session(ssh: dict[str, Any]) -> Any:
    from fleetbus.records import Server
    from fleetbus.transport import Credential
    from fleetbus_ssh.transport import SshTransport
    from floor_relay import _SshContext

    credential = Credential(name="k", type="ssh-key", user="root", secret=Path(ssh["key_file"]).read_bytes())
    server = Server(name="floor", transport="ssh", host=ssh["host"], port=ssh["port"], credential="k",
                    options={"host_key": ssh["host_key"]})
    return await SshTransport(_SshContext(server, credential)).open(server, credential)


async def floor_rows(stack: Stack, sizes: Sizes, work: Path, scp: Callable[[Path, Path], float] | None) -> list[Row]:
    """Every floor, on ``stack``'s nats-server (fleetbus up idles meanwhile)."""
    rows = await exec_floor(stack, sizes, work)
    rows += await ping_floor(stack, sizes, work)
    rows += await put_floor(stack, sizes, work, scp)
    rows += await ssh_floors(stack, sizes, work)
    return rows
