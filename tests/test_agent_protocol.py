"""The agent wire protocol (fleetbus_base.wire) over real TLS on 127.0.0.1.

Both ends run in this process: the controller (the gateway's side) behind
``asyncio.start_server(ssl=...)`` and the agent dialling it, as in outbound mode; the
inbound handshake tests swap who dials (the agent listens, the controller dials with a
pinning context, as fleetbus does). The certificates are throwaway self-signed ones made
here. Waits are on conditions with deadlines, never sleeps for readiness.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import datetime
import glob
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import random
import shutil
import ssl
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fleetbus_base import tuning
from fleetbus_base import wire as protocol
from fleetbus_base.wire import (
    DEFAULT_WINDOW,
    MAX_HEADER,
    PROTOCOL_VERSION,
    Accepted,
    AgentStream,
    AuthError,
    Connection,
    ControllerStream,
    Event,
    FrameParser,
    HandshakeError,
    ProtocolError,
    StreamError,
    Welcome,
    agent_accept_handshake,
    agent_handshake,
    certificate_fingerprint,
    controller_connect_handshake,
    controller_handshake,
    encode_frame,
    inbound_proof,
    peer_certificate_fingerprint,
    read_frame,
)
from fleetbus_base.wire.peer import LINGER_S
from support.ops_helpers import wait_until

REPO = Path(__file__).resolve().parent.parent
KEY = "fbk_" + "k" * 40
DEADLINE_S = 5.0
MIB = 1024 * 1024


# --------------------------------------------------------------------------- TLS


@dataclass
class Tls:
    server: ssl.SSLContext
    client: ssl.SSLContext
    cert_file: Path
    key_file: Path
    der: bytes
    fingerprint: str
    """``sha256:<hex>`` of the DER certificate, computed here without the module."""


def make_tls(folder: Path) -> Tls:
    """A throwaway self-signed certificate for localhost/127.0.0.1 and contexts for it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert_file))
    der = cert.public_bytes(serialization.Encoding.DER)
    return Tls(
        server=server,
        client=client,
        cert_file=cert_file,
        key_file=key_file,
        der=der,
        fingerprint="sha256:" + cert.fingerprint(hashes.SHA256()).hex(),
    )


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    """A second certificate: the one a man in the middle presents."""
    return make_tls(tmp_path_factory.mktemp("tls-other"))


# ----------------------------------------------------------------- agent operations


class OpFailed(Exception):
    """Shaped like the agent's OpError: code and message attributes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def make_block(i: int) -> bytes:
    """1 MiB of reproducible pseudo-random bytes, different for every i."""
    return random.Random(i).randbytes(MIB)


@dataclass
class Flow:
    """Measures how far a producer gets ahead of its consumer."""

    produced: int = 0
    consumed: int = 0
    max_ahead: int = 0

    def note_consumed(self, n: int) -> None:
        self.consumed += n
        self.max_ahead = max(self.max_ahead, self.produced - self.consumed)


@dataclass
class Ops:
    """The agent's on_open callback for these tests, with hooks to observe it."""

    started: dict[int, asyncio.Event] = field(default_factory=dict)
    cancelled: dict[int, asyncio.Event] = field(default_factory=dict)
    flow: Flow = field(default_factory=Flow)
    slow_s: float = 0.0

    def _event(self, table: dict[int, asyncio.Event], stream_id: int) -> asyncio.Event:
        return table.setdefault(stream_id, asyncio.Event())

    async def wait_started(self, stream_id: int) -> None:
        await asyncio.wait_for(self._event(self.started, stream_id).wait(), DEADLINE_S)

    async def wait_cancelled(self, stream_id: int) -> None:
        await asyncio.wait_for(self._event(self.cancelled, stream_id).wait(), DEADLINE_S)

    async def __call__(self, stream: AgentStream) -> dict[str, Any] | None:
        self._event(self.started, stream.id).set()
        args = stream.args
        if stream.op == "exec":  # an echo: argv joined, repeated, on stdout
            text = " ".join(args["argv"]).encode() * int(args.get("repeat", 1))
            await stream.send_out("stdout", text)
            await stream.send_out("stderr", b"warn")
            return {"exit_code": 0}
        if stream.op == "put":
            digest, size = hashlib.sha256(), 0
            async for chunk in stream.data():
                digest.update(chunk)
                size += len(chunk)
                self.flow.note_consumed(len(chunk))
                if self.slow_s:
                    await asyncio.sleep(self.slow_s)
            await stream.done({"sha256": digest.hexdigest(), "size": size})
            return None
        if stream.op == "get":
            blocks = int(args["mib"])
            await stream.send_meta(blocks * MIB, 0o640)
            for i in range(blocks):
                await stream.send_data(make_block(i))
                self.flow.produced += MIB
            return {"sent": blocks * MIB}
        if stream.op == "block":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self._event(self.cancelled, stream.id).set()
                if args.get("late_output"):
                    # Lands after the controller forgot the stream: must be ignored there.
                    await stream.send_out("stdout", b"late output after cancel")
                raise
        if stream.op == "refuse":
            raise OpFailed("not_found", "no such file: /nope")
        if stream.op == "crash":
            raise RuntimeError("secret detail that must not leave the agent")
        if stream.op == "ping":
            return {"pong": True}
        raise OpFailed("invalid_request", f"unknown op {stream.op}")


async def authenticate(hello: dict[str, Any]) -> str:
    key = hello["auth"].get("key", "")
    if not isinstance(key, str) or not hmac.compare_digest(key.encode(), KEY.encode()):
        raise AuthError("auth_failed", "unknown or revoked key")
    return "web-1"


async def collect(stream: ControllerStream) -> tuple[dict[str, bytes], Event]:
    """Drain a stream: output per name (out and data), and the final event."""
    out: dict[str, bytes] = {}
    async for event in stream.events():
        if event.kind in ("out", "data"):
            name = event.stream or "data"
            out[name] = out.get(name, b"") + event.body
        elif event.kind in ("done", "fail"):
            return out, event
    raise AssertionError("events() ended without done or fail")


async def final_event(stream: ControllerStream) -> Event:
    return (await asyncio.wait_for(collect(stream), DEADLINE_S))[1]


# ------------------------------------------------------------------ connected pairs


@dataclass
class Pair:
    controller: Connection
    agent: Connection
    ops: Ops


@asynccontextmanager
async def connected(
    tls: Tls,
    *,
    ops: Ops | None = None,
    heartbeat_s: float = 5.0,
    inbound: bool = False,
    controller_versions: tuple[int, ...] = protocol.SUPPORTED_VERSIONS,
    agent_versions: tuple[int, ...] = protocol.SUPPORTED_VERSIONS,
    **limits: int,
) -> AsyncIterator[Pair]:
    """A controller and an agent Connection over real TLS, started; closed afterwards.

    Outbound (default): the controller listens and the agent dials, as with the
    gateway. ``inbound=True``: the agent listens and the controller dials.
    ``*_versions``: what each side offers (an older peer speaks fewer).
    """
    ops = ops or Ops()
    accepted: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()

    async def controller_side(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Connection:
        acc = await controller_handshake(
            reader, writer, authenticate, heartbeat_s=heartbeat_s, versions=controller_versions, **limits
        )
        conn = Connection.from_accepted(reader, writer, acc)
        conn.start()
        return conn

    async def agent_side(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Connection:
        welcome = await agent_handshake(
            reader, writer, {"method": "key", "key": KEY}, {"hostname": "web-1"}, versions=agent_versions,
            **limits
        )
        conn = Connection.from_welcome(reader, writer, welcome, ops)
        conn.start()
        return conn

    listening_side, dialling_side = (
        (agent_side, controller_side) if inbound else (controller_side, agent_side)
    )

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            accepted.set_result(await listening_side(reader, writer))
        except Exception as exc:  # surfaces in the test instead of vanishing in a callback
            accepted.set_exception(exc)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=tls.server)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls.client, server_hostname="localhost"
    )
    dialled = await asyncio.wait_for(dialling_side(reader, writer), DEADLINE_S)
    listened = await asyncio.wait_for(accepted, DEADLINE_S)
    controller, agent = (dialled, listened) if inbound else (listened, dialled)
    try:
        yield Pair(controller, agent, ops)
    finally:
        await controller.close("test over")
        await agent.close("test over")
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def listener(
    tls: Tls, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1 with ``tls``'s certificate running ``handler``; yields its port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls.server)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def dial(tls: Tls, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls.client, server_hostname="localhost"
    )


def started_controllers(conns: asyncio.Queue[Connection], heartbeat_s: float,
                        versions: tuple[int, ...] = protocol.SUPPORTED_VERSIONS,
                        ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """A listener handler: handshake each agent as the controller, start the connection
    and hand it to ``conns``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = await controller_handshake(reader, writer, authenticate, heartbeat_s=heartbeat_s,
                                              versions=versions)
        conn = Connection.from_accepted(reader, writer, accepted)
        conn.start()
        await conns.put(conn)

    return handler


async def read_until_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), DEADLINE_S)


# ---------------------------------------------------------------------- framing


async def test_frame_roundtrip_and_limits() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(encode_frame({"t": "data", "s": 7}, b"\x00\xffbody"))
    reader.feed_data(encode_frame({"t": "ping", "n": 1}))
    reader.feed_eof()
    frame = await read_frame(reader)
    assert (frame.type, frame.stream, frame.body) == ("data", 7, b"\x00\xffbody")
    assert "body" not in repr(frame.header)  # sanity: the header is what we sent
    ping = await read_frame(reader)
    assert (ping.type, ping.stream, ping.body) == ("ping", None, b"")
    with pytest.raises(EOFError):
        await read_frame(reader)
    with pytest.raises(ValueError, match="limit"):
        encode_frame({"t": "open", "args": {"x": "y" * MAX_HEADER}})
    with pytest.raises(ValueError):
        encode_frame({"no": "type"})
    # A hello frame's repr never shows the key.
    assert KEY not in repr(protocol.Frame({"t": "hello", "auth": {"key": KEY}}))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (struct.pack(">IH", 0xFFFFFFFF, 0xFFFF), "exceeds the limit"),
        (struct.pack(">IH", 2 + MAX_HEADER + 64 * 1024 + 1, 100), "exceeds the limit"),
        (struct.pack(">IH", 10, 20), "header length"),
        (struct.pack(">IH", 7, 5) + b"[1,2]", "not a JSON object"),
        (struct.pack(">IH", 7, 5) + b"{nope", "not valid UTF-8 JSON"),
        (struct.pack(">IH", 10, 8) + b'{"s":1} ', 'lacks a string "t"'),
        (struct.pack(">IH", 19, 17) + b'{"t":"x","s":-1} ', "positive integer"),
    ],
)
async def test_read_frame_rejects_bad_frames_without_allocating(raw: bytes, match: str) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)  # no eof: an implementation that waited for the body would hang
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=match) as info:
            await asyncio.wait_for(read_frame(reader, max_body=64 * 1024), DEADLINE_S)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == "invalid_request"
    assert peak < 256 * 1024, f"reading a rejected frame allocated {peak} bytes"


BAD_FRAMES = [
    (struct.pack(">IH", 0xFFFFFFFF, 0xFFFF), "exceeds the limit"),
    (struct.pack(">IH", 2 + MAX_HEADER + 64 * 1024 + 1, 100), "exceeds the limit"),
    (struct.pack(">IH", 10, 20), "header length"),
    (struct.pack(">IH", 2, 0), "no header"),
    (struct.pack(">IH", 7, 5) + b"[1,2]", "not a JSON object"),
    (struct.pack(">IH", 7, 5) + b"{nope", "not valid UTF-8 JSON"),
    (struct.pack(">IH", 10, 8) + b'{"s":1} ', 'lacks a string "t"'),
    (struct.pack(">IH", 19, 17) + b'{"t":"x","s":-1} ', "positive integer"),
    (struct.pack(">IH", 14, 12) + b'{"t":"x"} {}', "not valid UTF-8 JSON"),  # trailing data
]


def parse_all(parser: FrameParser, data: bytes, chunk: int) -> list[protocol.Frame]:
    frames = []
    for start in range(0, len(data), chunk):
        parser.feed(data[start : start + chunk])
        while (frame := parser.next()) is not None:
            frames.append(frame)
    return frames


@pytest.mark.parametrize(
    "header",
    [
        {"t": "open", "s": 1, "op": "exec", "args": {"argv": ["true"], "env": {}, "cwd": None}},
        {"t": "x", "a": [1, -2.5, 1e300, None, True, False, "\u00e9\u4e2d\U0001f600\n\"\\\x00"], "b": {"c": {}}},
        {"t": "y", 1: "an int key", "n": 2**70},
    ],
)
def test_encode_frame_writes_what_json_dumps_writes(header: dict[str, Any]) -> None:
    # encode_frame uses a prebuilt encoder for speed; the bytes must not change.
    expected = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    assert encode_frame(header)[6:] == expected.encode("utf-8")


def test_encode_frame_refuses_what_is_not_json() -> None:
    with pytest.raises(ValueError):
        encode_frame({"t": "x", "v": float("nan")})
    with pytest.raises(TypeError):
        encode_frame({"t": "x", "v": object()})


@pytest.mark.parametrize("chunk", [1, 5, 6, 7, 100, 4096, 1 << 30])
def test_frame_parser_cuts_frames_at_any_boundary(chunk: int) -> None:
    # The connection parses frames from whatever pieces TLS hands over: a frame split
    # anywhere, or many in one piece, must come out the same.
    sent = [
        ({"t": "data", "s": 7}, b"\x00\xffbody" * 300),
        ({"t": "ping", "n": 1}, b""),
        ({"t": "open", "s": 8, "op": "exec", "args": {"argv": ["\u00e9"]}}, b""),
        ({"t": "out", "s": 8, "stream": "stdout"}, b"x"),
        ({"t": "done", "s": 8, "result": {"exit_code": 0}}, b""),
    ]
    data = b"".join(encode_frame(h, b) for h, b in sent)
    parser = FrameParser(max_body=64 * 1024)
    frames = parse_all(parser, data, chunk)
    assert [(f.header, f.body) for f in frames] == sent
    assert sum(f.size for f in frames) == len(data)
    assert parser.pending == 0


def test_frame_parser_accepts_whitespace_around_the_header() -> None:
    # Valid JSON from another implementation; the fast path must not reject it.
    header = b' {"t":"ping","n":2} '
    parser = FrameParser()
    parser.feed(struct.pack(">IH", 2 + len(header), len(header)) + header)
    frame = parser.next()
    assert frame is not None and frame.header == {"t": "ping", "n": 2}


@pytest.mark.parametrize(("raw", "match"), BAD_FRAMES)
def test_frame_parser_rejects_bad_frames_after_the_good_ones(raw: bytes, match: str) -> None:
    parser = FrameParser(max_body=64 * 1024)
    # The bad frame's prefix alone must be enough: nothing waits for a body it claims.
    parser.feed(encode_frame({"t": "ping", "n": 1}) + raw)
    first = parser.next()
    assert first is not None and first.header == {"t": "ping", "n": 1}
    with pytest.raises(ProtocolError, match=match) as info:
        parser.next()
    assert info.value.code == "invalid_request"


def test_module_is_standard_library_only() -> None:
    # -I: no user site, no PYTHON* env; -S: no site-packages at all, so any
    # third-party import fails outright. Then every loaded module must be stdlib.
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO / "agent")!r})
        import fleetbus_base.wire
        roots = {{name.split(".")[0] for name in sys.modules}}
        ours = ("__main__", "fleetbus_base")
        extra = sorted(r for r in roots if r not in sys.stdlib_module_names and r not in ours)
        assert not extra, extra
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_module_parses_as_python_3_9() -> None:
    for path in sorted((REPO / "agent" / "fleetbus_base" / "wire").glob("*.py")):
        ast.parse(path.read_text(), filename=path.name, feature_version=(3, 9))


# --------------------------------------------------------------------- handshake


def test_one_negotiation_serves_every_handshake_variant() -> None:
    """The rules every variant shares: the highest common version, limits in range,
    ``bool`` never taken for an integer, and refusals that name what this side speaks."""
    from fleetbus_base.wire.negotiation import Negotiation

    ours = Negotiation("controller", [1, 2], max_body=65536, window=1 << 20)
    assert ours.offer() == {"versions": [1, 2], "max_body": 65536, "window": 1 << 20}
    assert ours.choose_version({"versions": [2, 3, 1]}, "hello") == 2
    with pytest.raises(ProtocolError) as refused:
        ours.choose_version({"versions": [7]}, "hello")
    assert refused.value.code == "unsupported_version" and "controller speaks [1, 2]" in str(refused.value)
    for bad in ([], [True], "1", list(range(100))):
        with pytest.raises(ProtocolError) as malformed:
            ours.choose_version({"versions": bad}, "hello")
        assert malformed.value.code == "invalid_request"
    assert ours.chosen_version({"version": 1}, "welcome") == 1
    with pytest.raises(ProtocolError) as other:
        ours.chosen_version({"version": 3}, "welcome")
    assert other.value.code == "unsupported_version"
    assert Negotiation.peer_limits({}) == (protocol.DEFAULT_MAX_BODY, DEFAULT_WINDOW)
    for bad_limit in ({"max_body": True}, {"window": 1}, {"max_body": 1 << 40}):
        with pytest.raises(ProtocolError):
            Negotiation.peer_limits(bad_limit)
    for bad_heartbeat in (0, -1, True, "5", 3601):
        with pytest.raises(ProtocolError):
            Negotiation.heartbeat({"heartbeat_s": bad_heartbeat}, "welcome")
    terms = ours.terms(2, 5, (4096, 8192))
    assert terms.fields() == {"version": 2, "heartbeat_s": 5.0, "peer_max_body": 4096, "peer_window": 8192,
                              "max_body": 65536, "window": 1 << 20}
    with pytest.raises(ValueError, match="max_body"):
        Negotiation("agent", [1], max_body=1, window=1 << 20)


async def test_handshake_ok(tls: Tls) -> None:
    results: asyncio.Queue[Accepted] = asyncio.Queue()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = await controller_handshake(reader, writer, authenticate, heartbeat_s=2.5)
        await results.put(accepted)
        writer.close()

    async with listener(tls, handler) as port:
        reader, writer = await dial(tls, port)
        welcome = await agent_handshake(
            reader, writer, {"method": "key", "key": KEY}, {"hostname": "web-1"}, window=2 * MIB
        )
        accepted = await asyncio.wait_for(results.get(), DEADLINE_S)
        writer.close()
    assert (welcome.version, welcome.server, welcome.heartbeat_s) == (PROTOCOL_VERSION, "web-1", 2.5)
    assert welcome.peer_max_body == protocol.DEFAULT_MAX_BODY
    assert welcome.window == 2 * MIB
    server, hello = accepted  # unpacks as (server_name, hello_header)
    assert server == "web-1"
    assert accepted.peer_window == 2 * MIB
    assert hello["facts"] == {"hostname": "web-1"}
    assert hello["agent"].startswith("fleetbus-agent/")
    assert hello["auth"] == {"method": "key"}  # the key is not handed on
    assert KEY not in repr(accepted) + repr(welcome)


async def run_refused_handshake(
    tls: Tls, **agent_kwargs: Any
) -> tuple[HandshakeError, HandshakeError]:
    """An agent handshake the controller refuses: (agent's error, controller's error)."""
    results: asyncio.Queue[HandshakeError] = asyncio.Queue()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await controller_handshake(reader, writer, authenticate)
        except HandshakeError as exc:
            await results.put(exc)

    async with listener(tls, handler) as port:
        reader, writer = await dial(tls, port)
        auth = agent_kwargs.pop("auth", {"method": "key", "key": KEY})
        with pytest.raises(HandshakeError) as info:
            await agent_handshake(reader, writer, auth, {}, **agent_kwargs)
        assert writer.transport.is_closing()
        return info.value, await asyncio.wait_for(results.get(), DEADLINE_S)


async def test_wrong_key_is_refused(tls: Tls) -> None:
    agent_err, controller_err = await run_refused_handshake(
        tls, auth={"method": "key", "key": "fbk_wrong"}
    )
    assert isinstance(agent_err, AuthError)
    assert (agent_err.code, agent_err.message) == ("auth_failed", "unknown or revoked key")
    assert isinstance(controller_err, AuthError)
    assert "fbk_wrong" not in str(agent_err) + str(controller_err)


async def test_unsupported_version_is_refused(tls: Tls) -> None:
    agent_err, controller_err = await run_refused_handshake(tls, versions=[7, 8])
    assert agent_err.code == controller_err.code == "unsupported_version"
    assert not isinstance(agent_err, AuthError)


async def test_authenticate_crash_is_internal_and_generic(tls: Tls) -> None:
    async def broken(hello: dict[str, Any]) -> str:
        raise RuntimeError(f"db down while checking {hello['auth']['key']}")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with pytest.raises(HandshakeError):
            await controller_handshake(reader, writer, broken)

    async with listener(tls, handler) as port:
        reader, writer = await dial(tls, port)
        with pytest.raises(HandshakeError) as info:
            await agent_handshake(reader, writer, {"method": "key", "key": KEY})
    assert info.value.code == "internal"
    assert KEY not in info.value.message


@pytest.mark.parametrize(
    "partial", [b"", encode_frame({"t": "hello"})[:9]], ids=["silent", "half-frame"]
)
async def test_stalled_agent_is_dropped_at_the_deadline(tls: Tls, partial: bytes) -> None:
    results: asyncio.Queue[HandshakeError] = asyncio.Queue()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await controller_handshake(reader, writer, authenticate, timeout=0.3)
        except HandshakeError as exc:
            await results.put(exc)

    async with listener(tls, handler) as port:
        reader, writer = await dial(tls, port)
        started = time.monotonic()
        writer.write(partial)
        assert await read_until_eof(reader) == b""  # nothing, then the connection closes
        elapsed = time.monotonic() - started
        err = await asyncio.wait_for(results.get(), DEADLINE_S)
        writer.close()
    assert err.code == "timeout"
    assert 0.25 <= elapsed < 2.0


async def test_stalled_controller_times_out_the_agent(tls: Tls) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the hello, never answers

    async with listener(tls, handler) as port:
        reader, writer = await dial(tls, port)
        started = time.monotonic()
        with pytest.raises(HandshakeError) as info:
            await agent_handshake(reader, writer, {"method": "key", "key": KEY}, timeout=0.3)
        assert time.monotonic() - started < 2.0
    assert info.value.code == "timeout"


async def expect_error_then_eof(tls: Tls, raw: bytes) -> tuple[protocol.Frame, float]:
    """Send ``raw`` instead of a hello: the controller answers an error frame, then closes."""
    results: asyncio.Queue[HandshakeError] = asyncio.Queue()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await controller_handshake(reader, writer, authenticate, timeout=DEADLINE_S)
        except HandshakeError as exc:
            await results.put(exc)

    async with listener(tls, handler) as port:
        reader, writer = await dial(tls, port)
        started = time.monotonic()
        writer.write(raw)
        frame = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
        assert await read_until_eof(reader) == b""
        elapsed = time.monotonic() - started
        err = await asyncio.wait_for(results.get(), DEADLINE_S)
        writer.close()
    assert err.code == "invalid_request"
    return frame, elapsed


async def test_garbage_is_dropped(tls: Tls) -> None:
    frame, elapsed = await expect_error_then_eof(tls, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (frame.type, frame.header["code"]) == ("error", "invalid_request")
    assert elapsed < DEADLINE_S / 2  # dropped at once, not at the handshake deadline


async def test_non_object_header_is_dropped(tls: Tls) -> None:
    frame, _ = await expect_error_then_eof(tls, struct.pack(">IH", 9, 7) + b'"hello"')
    assert frame.header["code"] == "invalid_request"


@pytest.mark.parametrize(
    "prefix",
    [
        struct.pack(">IH", 0xFFFFFFFF, 0xFFFF),
        struct.pack(">IH", 2 + MAX_HEADER + protocol.DEFAULT_MAX_BODY + 1, 100),
    ],
    ids=["4GiB", "one-byte-over"],
)
async def test_oversized_frame_is_dropped_without_reading_it(tls: Tls, prefix: bytes) -> None:
    # Only the 6-byte prefix is sent. Had the controller tried to read the claimed
    # bytes, it would wait for them until the handshake deadline.
    frame, elapsed = await expect_error_then_eof(tls, prefix)
    assert frame.header["code"] == "invalid_request"
    assert "exceeds the limit" in frame.header["message"]
    assert elapsed < DEADLINE_S / 2


async def test_inbound_mode_controller_dials_the_agent(tls: Tls) -> None:
    async with connected(tls, inbound=True) as pair:
        assert pair.controller.role == "controller" and pair.agent.role == "agent"
        out, final = await final_event_and_output(
            pair.controller.open_stream("exec", {"argv": ["hi"]})
        )
        assert (out["stdout"], final.kind, final.result) == (b"hi", "done", {"exit_code": 0})


async def final_event_and_output(stream: ControllerStream) -> tuple[dict[str, bytes], Event]:
    return await asyncio.wait_for(collect(stream), DEADLINE_S)


# ------------------------------------------------------------- inbound handshake

PROOF_VECTOR = "62cd3011876e82918eb620bba015c8d96e5ec64de0117e9223694c6aebac143a"
"""inbound_proof("fbk_test", bytes(range(32)), "ab" * 32), as docs/agent-protocol.md says."""


def independent_proof(key: str, nonce: bytes, fingerprint_hex: str) -> str:
    """The proof formula written out with hmac, not with the module."""
    message = b"fleetbus-inbound-v1" + b"\0" + nonce + b"\0" + fingerprint_hex.encode("ascii")
    return hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest()


def bare(fingerprint: str) -> str:
    return fingerprint.split(":", 1)[1]


def pinning_client() -> ssl.SSLContext:
    """How fleetbus dials an inbound agent: no CA; identity is the pinned fingerprint."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def dial_pinned(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=pinning_client(), server_hostname="localhost"
    )


# What a listening agent's handler ended with: its result and its end of the connection.
AgentOutcome = tuple[Welcome | HandshakeError, asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def listening_agent(
    tls: Tls, **kwargs: Any
) -> AsyncIterator[tuple[int, asyncio.Queue[AgentOutcome]]]:
    """A real agent on 127.0.0.1 running agent_accept_handshake per connection.

    Yields ``(port, outcomes)``; each connection puts one :data:`AgentOutcome`.
    """
    outcomes: asyncio.Queue[AgentOutcome] = asyncio.Queue()
    kwargs.setdefault("facts", {"hostname": "web-1"})

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            result: Welcome | HandshakeError = await agent_accept_handshake(
                reader, writer, key=KEY, certificate_fingerprint=tls.fingerprint, **kwargs
            )
        except HandshakeError as exc:
            result = exc
        await outcomes.put((result, reader, writer))

    async with listener(tls, handler) as port:
        yield port, outcomes


@dataclass
class InboundRun:
    """Both ends of one inbound handshake: results (or errors) and connections."""

    agent: Welcome | HandshakeError
    controller: Accepted | HandshakeError
    agent_io: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    controller_io: tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def inbound(
    tls: Tls,
    agent_kwargs: dict[str, Any] | None = None,
    **controller_kwargs: Any,
) -> AsyncIterator[InboundRun]:
    """The agent listens (agent_accept_handshake); the controller dials and pins it."""
    async with listening_agent(tls, **(agent_kwargs or {})) as (port, outcomes):
        reader, writer = await dial_pinned(port)
        controller_kwargs.setdefault("key", KEY)
        controller_kwargs.setdefault("agent_fingerprint", tls.fingerprint)
        controller_kwargs.setdefault("server", "web-1")
        try:
            accepted: Accepted | HandshakeError = await asyncio.wait_for(
                controller_connect_handshake(reader, writer, **controller_kwargs), DEADLINE_S
            )
        except HandshakeError as exc:
            accepted = exc
        welcome, agent_reader, agent_writer = await asyncio.wait_for(outcomes.get(), DEADLINE_S)
        try:
            yield InboundRun(welcome, accepted, (agent_reader, agent_writer), (reader, writer))
        finally:
            writer.close()
            agent_writer.close()


def test_inbound_proof_test_vector() -> None:
    nonce, fingerprint = bytes(range(32)), "ab" * 32
    expected = independent_proof("fbk_test", nonce, fingerprint)
    assert expected == PROOF_VECTOR  # also checked against `openssl dgst -sha256 -hmac`
    assert inbound_proof("fbk_test", nonce, fingerprint) == expected
    # Every input counts.
    assert inbound_proof("fbk_test2", nonce, fingerprint) != expected
    assert inbound_proof("fbk_test", bytes(32), fingerprint) != expected
    assert inbound_proof("fbk_test", nonce, "ac" * 32) != expected
    # The key is used as UTF-8.
    assert inbound_proof("ключ-ü", nonce, fingerprint) == independent_proof(
        "ключ-ü", nonce, fingerprint
    )


@pytest.mark.parametrize(
    "form",
    [
        "ab" * 32,
        "AB" * 32,
        "sha256:" + "ab" * 32,
        "SHA256:" + "AB" * 32,
        "Sha256:" + "aB" * 32,
    ],
)
def test_fingerprint_forms_are_normalised(form: str) -> None:
    assert inbound_proof("fbk_test", bytes(range(32)), form) == PROOF_VECTOR


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "sha256:",
        "ab" * 31,  # 62 digits
        "ab" * 32 + "a",  # 65 digits
        "sha256:" + "ab" * 32 + "\n",
        " " + "ab" * 32,
        "sha1:" + "ab" * 32,
        "sha256:" + "zz" * 32,
        ":".join(["AB"] * 32),  # the openssl x509 -fingerprint layout is not accepted
        "sha256:sha256:" + "ab" * 32,
        b"ab" * 32,
        None,
    ],
)
def test_malformed_fingerprints_are_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        inbound_proof(KEY, bytes(32), bad)


def test_certificate_fingerprints(tls: Tls, other_tls: Tls) -> None:
    assert certificate_fingerprint(tls.der) == tls.fingerprint
    assert certificate_fingerprint(tls.der) == "sha256:" + hashlib.sha256(tls.der).hexdigest()
    assert certificate_fingerprint(other_tls.der) != tls.fingerprint
    with pytest.raises(ValueError, match="PEM"):
        certificate_fingerprint(tls.cert_file.read_bytes())
    with pytest.raises(TypeError):
        certificate_fingerprint(tls.cert_file.read_text())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="key"):
        inbound_proof("", bytes(32), tls.fingerprint)


async def test_peer_certificate_fingerprint_needs_tls() -> None:
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(writer)

    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # plain TCP
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1]
        )
        with pytest.raises(HandshakeError) as info:
            peer_certificate_fingerprint(writer)
        assert info.value.code == "transport_error"
        with pytest.raises(HandshakeError) as info:
            await controller_connect_handshake(
                reader, writer, key=KEY, agent_fingerprint="ab" * 32, server="web-1"
            )
        assert info.value.code == "transport_error"
        assert writer.transport.is_closing()
        (await asyncio.wait_for(accepted.get(), DEADLINE_S)).close()
    finally:
        server.close()
        await server.wait_closed()


async def test_inbound_handshake_then_streams_work(
    tls: Tls, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with inbound(
        tls,
        agent_kwargs={"window": 2 * MIB, "max_body": 64 * 1024},
        heartbeat_s=2.5,
        max_body=32 * 1024,
    ) as run:
        welcome, accepted = run.agent, run.controller
        assert isinstance(welcome, Welcome) and isinstance(accepted, Accepted)
        assert (welcome.version, welcome.server, welcome.heartbeat_s) == (PROTOCOL_VERSION, "web-1", 2.5)
        assert (welcome.peer_max_body, welcome.peer_window) == (32 * 1024, protocol.DEFAULT_WINDOW)
        assert (welcome.max_body, welcome.window) == (64 * 1024, 2 * MIB)
        assert welcome.header["t"] == "hello" and "proof" not in welcome.header
        assert (accepted.server, accepted.version, accepted.heartbeat_s) == ("web-1", PROTOCOL_VERSION, 2.5)
        assert (accepted.peer_max_body, accepted.peer_window) == (64 * 1024, 2 * MIB)
        assert (accepted.max_body, accepted.window) == (32 * 1024, protocol.DEFAULT_WINDOW)
        assert accepted.hello["facts"] == {"hostname": "web-1"}
        assert accepted.hello["agent"].startswith("fleetbus-agent/")
        assert "nonce" not in accepted.hello
        assert peer_certificate_fingerprint(run.controller_io[1]) == tls.fingerprint

        ops = Ops()
        agent = Connection.from_welcome(*run.agent_io, welcome, ops)
        controller = Connection.from_accepted(*run.controller_io, accepted)
        agent.start()
        controller.start()
        try:
            out, final = await final_event_and_output(
                controller.open_stream("exec", {"argv": ["hi"], "repeat": 50_000})
            )
            assert out["stdout"] == b"hi" * 50_000  # many frames of at most 32 KiB
            assert (final.kind, final.result) == ("done", {"exit_code": 0})
            stream = controller.open_stream("put", {"path": "/tmp/x"})
            block = make_block(1)
            await stream.send(block)
            await stream.send_eof()
            assert (await final_event(stream)).result == {
                "sha256": hashlib.sha256(block).hexdigest(),
                "size": MIB,
            }
            assert controller.peer_address[0] == "127.0.0.1"
        finally:
            await controller.close("test over")
            await agent.close("test over")
    assert KEY not in caplog.text and KEY not in repr(welcome) + repr(accepted)


async def test_inbound_wrong_key_is_refused_on_both_sides(tls: Tls) -> None:
    async with inbound(tls, key="fbk_wrong") as run:
        agent_err, controller_err = run.agent, run.controller
        assert isinstance(agent_err, AuthError) and isinstance(controller_err, AuthError)
        assert (agent_err.code, agent_err.message) == (
            "auth_failed",
            "proof of the server key failed",
        )
        assert (controller_err.code, controller_err.message) == (
            "auth_failed",
            "proof of the server key failed",
        )
        assert run.agent_io[1].transport.is_closing()
        assert run.controller_io[1].transport.is_closing()
    assert "fbk_wrong" not in str(agent_err) + str(controller_err)


async def test_inbound_man_in_the_middle_gets_nothing_it_can_use(
    tls: Tls, other_tls: Tls
) -> None:
    # 1. The controller pins the agent's certificate A; an attacker presents B. The
    #    controller stops before sending a single byte, so no proof leaves it.
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            encode_frame(
                {"t": "challenge", "versions": [1], "nonce": base64.b64encode(bytes(32)).decode()}
            )
        )
        await writer.drain()
        await received.put(await read_until_eof(reader))
        writer.close()

    async with listener(other_tls, impostor) as port:
        reader, writer = await dial_pinned(port)
        assert peer_certificate_fingerprint(writer) == other_tls.fingerprint
        with pytest.raises(HandshakeError) as info:
            await controller_connect_handshake(
                reader, writer, key=KEY, agent_fingerprint=tls.fingerprint, server="web-1"
            )
        assert info.value.code == "transport_error" and not isinstance(info.value, AuthError)
        assert writer.transport.is_closing()
        assert await asyncio.wait_for(received.get(), DEADLINE_S) == b""

    # 2. A relay: the attacker (certificate B) passes every byte between a controller
    #    that accepted B and the real agent (certificate A). The controller computes its
    #    proof for the certificate it saw, B, so the real agent refuses it.
    upstream, downstream = bytearray(), bytearray()

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bytearray) -> None:
        try:
            while data := await src.read(65536):
                record.extend(data)
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async with listening_agent(tls) as (agent_port, outcomes):

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            agent_reader, agent_writer = await dial_pinned(agent_port)
            await asyncio.gather(
                pipe(agent_reader, writer, downstream), pipe(reader, agent_writer, upstream)
            )

        async with listener(other_tls, relay) as relay_port:
            reader, writer = await dial_pinned(relay_port)
            with pytest.raises(AuthError) as info:
                await controller_connect_handshake(
                    reader, writer, key=KEY, agent_fingerprint=other_tls.fingerprint, server="web-1"
                )
            assert info.value.code == "auth_failed"
            agent_result, _, agent_writer = await asyncio.wait_for(outcomes.get(), DEADLINE_S)
            assert isinstance(agent_result, AuthError)
            assert agent_writer.transport.is_closing()

    # What the attacker relayed: a proof for its own certificate, useless for A's.
    challenge = await read_frame(feed(bytes(downstream)))
    hello = await read_frame(feed(bytes(upstream)))
    nonce = base64.b64decode(challenge.header["nonce"])
    assert hello.header["proof"] == independent_proof(KEY, nonce, bare(other_tls.fingerprint))
    assert hello.header["proof"] != independent_proof(KEY, nonce, bare(tls.fingerprint))


def feed(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def read_challenge(reader: asyncio.StreamReader) -> tuple[protocol.Frame, bytes]:
    frame = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
    assert frame.type == "challenge"
    return frame, base64.b64decode(frame.header["nonce"], validate=True)


def ascii_frame(header: dict[str, Any]) -> bytes:
    """A frame whose JSON escapes non-ASCII, so it can carry lone surrogates ("\\ud800")."""
    data = json.dumps(header).encode("ascii")
    return struct.pack(">IH", 2 + len(data), len(data)) + data


def good_hello(nonce: bytes, tls: Tls, **fields: Any) -> dict[str, Any]:
    hello = {
        "t": "hello",
        "version": 1,
        "proof": independent_proof(KEY, nonce, bare(tls.fingerprint)),
        "server": "web-1",
        "heartbeat_s": 5,
        "max_body": 4096,
        "window": 8192,
    }
    hello.update(fields)
    return {k: v for k, v in hello.items() if v is not None}


async def test_inbound_wire_format_and_replayed_proof(tls: Tls) -> None:
    """A hand-written controller: exact frames both ways; a proof works for one nonce only."""
    async with listening_agent(tls, max_body=8192, window=16384) as (port, outcomes):
        reader, writer = await dial_pinned(port)
        challenge, nonce = await read_challenge(reader)
        header = dict(challenge.header)
        assert len(nonce) == 32 and len(header.pop("nonce")) == 44
        assert header.pop("agent").startswith("fleetbus-agent/")
        assert header == {
            "t": "challenge",
            "versions": [1, 2, 3],
            "facts": {"hostname": "web-1"},
            "max_body": 8192,
            "window": 16384,
        }
        hello = good_hello(nonce, tls, proof=inbound_proof(KEY, nonce, tls.fingerprint).upper())
        writer.write(encode_frame(hello))
        welcome = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
        assert welcome.header == {
            "t": "welcome",
            "version": 1,
            "server": "web-1",
            "heartbeat_s": 5,
            "max_body": 8192,
            "window": 16384,
        }
        result, _, agent_writer = await asyncio.wait_for(outcomes.get(), DEADLINE_S)
        assert isinstance(result, Welcome)
        assert (result.peer_max_body, result.peer_window) == (4096, 8192)
        agent_writer.close()
        writer.close()

        # Replaying that good proof on a new connection fails: the nonce is new.
        reader, writer = await dial_pinned(port)
        _, second_nonce = await read_challenge(reader)
        assert second_nonce != nonce
        writer.write(encode_frame(hello))
        error = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
        assert error.header == {
            "t": "error",
            "code": "auth_failed",
            "message": "proof of the server key failed",
        }
        assert await read_until_eof(reader) == b""
        result, _, _ = await asyncio.wait_for(outcomes.get(), DEADLINE_S)
        assert isinstance(result, AuthError)
        writer.close()


@pytest.mark.parametrize(
    ("hello", "code"),
    [
        (lambda nonce, tls: {"t": "welcome"}, "invalid_request"),
        (lambda nonce, tls: good_hello(nonce, tls, proof=None), "invalid_request"),
        (lambda nonce, tls: good_hello(nonce, tls, proof=12), "invalid_request"),
        (lambda nonce, tls: good_hello(nonce, tls, proof="é" * 64), "auth_failed"),
        (
            lambda nonce, tls: ascii_frame(good_hello(nonce, tls, proof="\ud800" * 64)),
            "auth_failed",
        ),
        (lambda nonce, tls: good_hello(nonce, tls, proof="ab"), "auth_failed"),
        # Checked before anything else: a bad proof never gets as far as the version.
        (lambda nonce, tls: good_hello(nonce, tls, proof="0" * 64, version=7), "auth_failed"),
        (lambda nonce, tls: good_hello(nonce, tls, version=7), "unsupported_version"),
        (lambda nonce, tls: good_hello(nonce, tls, version="1"), "invalid_request"),
        (lambda nonce, tls: good_hello(nonce, tls, version=True), "invalid_request"),
        (lambda nonce, tls: good_hello(nonce, tls, server=None), "invalid_request"),
        (lambda nonce, tls: good_hello(nonce, tls, server="x" * 5000), "invalid_request"),
        (lambda nonce, tls: good_hello(nonce, tls, heartbeat_s=0), "invalid_request"),
        (lambda nonce, tls: good_hello(nonce, tls, heartbeat_s="5"), "invalid_request"),
        (lambda nonce, tls: good_hello(nonce, tls, max_body=10), "invalid_request"),
        (lambda nonce, tls: good_hello(nonce, tls, window=2**40), "invalid_request"),
    ],
    ids=[
        "not-hello",
        "no-proof",
        "proof-not-string",
        "proof-not-ascii",
        "proof-lone-surrogates",
        "proof-short",
        "bad-proof-first",
        "version-not-offered",
        "version-string",
        "version-bool",
        "no-server",
        "server-too-long",
        "heartbeat-zero",
        "heartbeat-string",
        "max-body-too-small",
        "window-too-large",
    ],
)
async def test_agent_refuses_bad_hellos(
    tls: Tls, hello: Callable[[bytes, Tls], dict[str, Any] | bytes], code: str
) -> None:
    async with listening_agent(tls) as (port, outcomes):
        reader, writer = await dial_pinned(port)
        _, nonce = await read_challenge(reader)
        started = time.monotonic()
        frame = hello(nonce, tls)
        writer.write(frame if isinstance(frame, bytes) else encode_frame(frame))
        error = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
        assert await read_until_eof(reader) == b""
        assert time.monotonic() - started < DEADLINE_S / 2  # at once, not at the deadline
        result, _, _ = await asyncio.wait_for(outcomes.get(), DEADLINE_S)
        writer.close()
    assert (error.type, error.header["code"]) == ("error", code)
    assert isinstance(result, HandshakeError) and result.code == code
    assert isinstance(result, AuthError) == (code == "auth_failed")


@pytest.mark.parametrize(
    "partial", [b"", encode_frame({"t": "hello"})[:9]], ids=["silent", "half-frame"]
)
async def test_inbound_stalled_controller_is_dropped_at_the_deadline(
    tls: Tls, partial: bytes
) -> None:
    async with listening_agent(tls, timeout=0.3) as (port, outcomes):
        reader, writer = await dial_pinned(port)
        started = time.monotonic()
        await read_challenge(reader)
        writer.write(partial)
        assert await read_until_eof(reader) == b""  # no answer, just closed
        elapsed = time.monotonic() - started
        result, _, _ = await asyncio.wait_for(outcomes.get(), DEADLINE_S)
        writer.close()
    assert isinstance(result, HandshakeError) and not isinstance(result, AuthError)
    assert (result.code, result.message) == ("timeout", "no hello from the controller within 0.3 s")
    assert 0.25 <= elapsed < 2.0


@pytest.mark.parametrize("stall", ["challenge", "welcome"])
async def test_inbound_stalled_agent_times_out_the_controller(tls: Tls, stall: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if stall == "welcome":  # a challenge, then nothing after the hello
            writer.write(encode_frame(challenge_with(nonce=base64.b64encode(bytes(32)).decode())))
        await reader.read()  # until the controller gives up
        writer.close()

    async with listener(tls, handler) as port:
        reader, writer = await dial_pinned(port)
        started = time.monotonic()
        with pytest.raises(HandshakeError) as info:
            await controller_connect_handshake(
                reader,
                writer,
                key=KEY,
                agent_fingerprint=tls.fingerprint,
                server="web-1",
                timeout=0.3,
            )
        elapsed = time.monotonic() - started
        assert writer.transport.is_closing()
    assert (info.value.code, info.value.message) == (
        "timeout",
        f"no {stall} from the agent within 0.3 s",
    )
    assert 0.25 <= elapsed < 2.0


async def test_inbound_unsupported_version(tls: Tls) -> None:
    async with inbound(tls, agent_kwargs={"versions": [7, 8]}) as run:
        agent_err, controller_err = run.agent, run.controller
        assert isinstance(agent_err, HandshakeError) and isinstance(controller_err, HandshakeError)
        assert agent_err.code == controller_err.code == "unsupported_version"
        assert not isinstance(agent_err, AuthError) and not isinstance(controller_err, AuthError)
        assert "[1, 2, 3]" in agent_err.message  # what the controller speaks
        assert run.agent_io[1].transport.is_closing()
        assert run.controller_io[1].transport.is_closing()


def challenge_with(**fields: Any) -> dict[str, Any]:
    challenge = {
        "t": "challenge",
        "versions": [1],
        "nonce": base64.b64encode(bytes(range(32))).decode(),
        "agent": "fleetbus-agent/test",
        "facts": {},
        "max_body": 4096,
        "window": 8192,
    }
    challenge.update(fields)
    return {k: v for k, v in challenge.items() if v is not None}


@pytest.mark.parametrize(
    "challenge",
    [
        {"t": "hello", "versions": [1]},
        challenge_with(nonce=None),
        challenge_with(nonce="not base64!"),
        challenge_with(nonce=base64.b64encode(bytes(16)).decode()),
        challenge_with(nonce=base64.b64encode(bytes(33)).decode()),
        challenge_with(nonce=12),
        challenge_with(nonce="é" * 44),
        challenge_with(versions=None),
        challenge_with(versions=[]),
        challenge_with(versions=["1"]),
        challenge_with(facts=["a"]),
        challenge_with(agent=5),
        challenge_with(max_body=10),
        challenge_with(window=True),
    ],
    ids=[
        "not-challenge",
        "no-nonce",
        "nonce-not-base64",
        "nonce-16-bytes",
        "nonce-33-bytes",
        "nonce-int",
        "nonce-not-ascii",
        "no-versions",
        "empty-versions",
        "string-versions",
        "facts-list",
        "agent-int",
        "max-body-too-small",
        "window-bool",
    ],
)
async def test_controller_refuses_bad_challenges(tls: Tls, challenge: dict[str, Any]) -> None:
    replies: asyncio.Queue[bytes] = asyncio.Queue()

    async def fake_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(encode_frame(challenge))
        await replies.put(await read_until_eof(reader))
        writer.close()

    async with listener(tls, fake_agent) as port:
        reader, writer = await dial_pinned(port)
        with pytest.raises(HandshakeError) as info:
            await controller_connect_handshake(
                reader, writer, key=KEY, agent_fingerprint=tls.fingerprint, server="web-1"
            )
        reply = await asyncio.wait_for(replies.get(), DEADLINE_S)
    assert info.value.code == "invalid_request"
    error = await read_frame(feed(reply))  # the error frame, and nothing else (no hello)
    assert (error.type, error.header["code"]) == ("error", "invalid_request")
    assert error.size == len(reply)


async def test_inbound_secrets_never_reach_errors_or_logs(
    tls: Tls, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    secrets_seen: list[str] = [KEY]

    def note(nonce: bytes, *proofs: str) -> None:
        secrets_seen.extend([base64.b64encode(nonce).decode(), nonce.hex(), *proofs])

    # The agent refusing a wrong proof.
    async with listening_agent(tls) as (port, outcomes):
        reader, writer = await dial_pinned(port)
        _, nonce = await read_challenge(reader)
        wrong = independent_proof("fbk_wrong", nonce, bare(tls.fingerprint))
        note(nonce, wrong, independent_proof(KEY, nonce, bare(tls.fingerprint)))
        writer.write(encode_frame(good_hello(nonce, tls, proof=wrong)))
        error = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
        texts.append(repr(error.header))
        result, _, _ = await asyncio.wait_for(outcomes.get(), DEADLINE_S)
        assert isinstance(result, AuthError)
        texts += [str(result), repr(result), repr(result.args)]
        writer.close()

    # The controller refused by an agent that chose the nonce; its hello is checked on
    # the wire against the formula.
    nonce = bytes(range(100, 132))
    hellos: asyncio.Queue[protocol.Frame] = asyncio.Queue()

    async def fake_agent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(encode_frame(challenge_with(nonce=base64.b64encode(nonce).decode())))
        hello = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
        writer.write(
            encode_frame(
                {"t": "error", "code": "auth_failed", "message": "proof of the server key failed"}
            )
        )
        await writer.drain()
        await hellos.put(hello)
        writer.close()

    async with listener(tls, fake_agent) as port:
        reader, writer = await dial_pinned(port)
        with pytest.raises(AuthError) as info:
            await controller_connect_handshake(
                reader,
                writer,
                key=KEY,
                agent_fingerprint=tls.fingerprint.upper(),
                server="web-1",
                heartbeat_s=3,
                max_body=2048,
                window=4096,
            )
        texts += [str(info.value), repr(info.value), repr(info.value.args)]
        hello = await asyncio.wait_for(hellos.get(), DEADLINE_S)
    proof = independent_proof(KEY, nonce, bare(tls.fingerprint))
    note(nonce, proof)
    assert hello.header == {
        "t": "hello",
        "version": 1,
        "proof": proof,
        "server": "web-1",
        "heartbeat_s": 3,
        "max_body": 2048,
        "window": 4096,
    }

    # A successful run: the results handed on carry neither.
    async with inbound(tls) as run:
        assert isinstance(run.agent, Welcome) and isinstance(run.controller, Accepted)
        texts += [repr(run.agent), repr(run.agent.header), repr(run.controller)]
        texts.append(repr(run.controller.hello))

    texts.append(caplog.text)
    texts += [record.getMessage() for record in caplog.records]
    everything = "\n".join(texts)
    for secret in secrets_seen:
        assert secret not in everything
        assert secret.lower() not in everything.lower()


SMOKE_39_INBOUND = """
import asyncio, ssl, sys
sys.path.insert(0, sys.argv[1])
from fleetbus_base import wire as p
cert, key, fingerprint = sys.argv[2:5]

async def ops(stream):
    return {"pong": True}

async def main():
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    outcomes = asyncio.Queue()

    async def on_client(reader, writer):
        try:
            welcome = await p.agent_accept_handshake(
                reader, writer, key="k1", certificate_fingerprint=fingerprint, timeout=5
            )
        except p.HandshakeError as exc:
            await outcomes.put(exc)
            return
        conn = p.Connection.from_welcome(reader, writer, welcome, ops)
        conn.start()
        await outcomes.put(conn)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
    )
    seen = p.peer_certificate_fingerprint(writer)
    assert seen == fingerprint, seen
    acc = await p.controller_connect_handshake(
        reader, writer, key="k1", agent_fingerprint=seen, server="s1", heartbeat_s=0.5
    )
    ctrl = p.Connection.from_accepted(reader, writer, acc)
    ctrl.start()
    agent = await outcomes.get()
    events = [e async for e in ctrl.open_stream("ping").events()]
    assert events[-1].result == {"pong": True}, events
    await ctrl.close("bye", goaway=True)
    await agent.wait_closed()

    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
    )
    try:
        await p.controller_connect_handshake(
            reader, writer, key="k2", agent_fingerprint=fingerprint, server="s1"
        )
        raise AssertionError("a wrong key was accepted")
    except p.AuthError as exc:
        assert exc.code == "auth_failed"
    assert isinstance(await outcomes.get(), p.AuthError)
    server.close()
    await server.wait_closed()
    print("ok", sys.version_info[:2])

asyncio.run(main())
"""


def test_inbound_handshake_runs_on_python_3_9(tls: Tls) -> None:
    python = find_python39()
    if python is None:
        pytest.skip("no Python 3.9 interpreter here")
    result = subprocess.run(
        [
            python,
            "-I",
            "-c",
            SMOKE_39_INBOUND,
            str(REPO / "agent"),
            str(tls.cert_file),
            str(tls.key_file),
            tls.fingerprint,
        ],
        capture_output=True,
        text=True,
        timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok (3, 9)"


# ------------------------------------------------------------------------ streams


async def test_ops_results_and_errors(tls: Tls) -> None:
    async with connected(tls) as pair:
        c = pair.controller
        out, final = await final_event_and_output(c.open_stream("exec", {"argv": ["a", "b"]}))
        assert out == {"stdout": b"a b", "stderr": b"warn"}
        assert (final.kind, final.result) == ("done", {"exit_code": 0})
        assert (await final_event(c.open_stream("ping"))).result == {"pong": True}
        refused = await final_event(c.open_stream("refuse"))
        assert refused.error == {"code": "not_found", "message": "no such file: /nope"}
        crashed = await final_event(c.open_stream("crash"))
        assert crashed.error is not None and crashed.error["code"] == "internal"
        assert "secret" not in crashed.error["message"]
        assert pair.controller.peer_address[0] == "127.0.0.1"
        assert c.open_streams == 0 and pair.agent.open_streams == 0


async def test_many_concurrent_streams_are_multiplexed(tls: Tls) -> None:
    async with connected(tls) as pair:
        streams = [
            pair.controller.open_stream("exec", {"argv": [f"stream-{i}"], "repeat": 1 + i * 100})
            for i in range(50)
        ]
        results = await asyncio.gather(*(final_event_and_output(s) for s in streams))
        for i, (out, final) in enumerate(results):
            assert out["stdout"] == f"stream-{i}".encode() * (1 + i * 100)
            assert final.kind == "done"
        assert [s.id for s in streams] == list(range(1, 51))


async def test_get_64_mib_with_a_slow_consumer_stays_bounded(tls: Tls) -> None:
    ops = Ops()
    async with connected(tls, ops=ops) as pair:
        stream = pair.controller.open_stream("get", {"mib": 64})
        digest, meta, final = hashlib.sha256(), None, None
        chunks = 0
        async for event in stream.events():
            if event.kind == "meta":
                meta = event
            elif event.kind == "data":
                digest.update(event.body)
                ops.flow.note_consumed(len(event.body))
                chunks += 1
                if chunks % 4 == 0:
                    await asyncio.sleep(0.001)  # the slow consumer
            else:
                final = event
        expected = hashlib.sha256()
        for i in range(64):
            expected.update(make_block(i))
        assert meta is not None and (meta.size, meta.mode) == (64 * MIB, 0o640)
        assert final is not None and final.result == {"sent": 64 * MIB}
        assert digest.hexdigest() == expected.hexdigest()
        # Credit, not buffers, decides how far the producer runs ahead.
        assert ops.flow.max_ahead <= DEFAULT_WINDOW
        assert pair.agent.stats.max_queued_data_bytes <= DEFAULT_WINDOW
        assert pair.controller.stats.max_buffered_in_bytes <= DEFAULT_WINDOW
        assert pair.controller.stats.buffered_in_bytes == 0


async def test_put_64_mib_with_a_slow_consumer_stays_bounded(tls: Tls) -> None:
    ops = Ops(slow_s=0.0005)
    async with connected(tls, ops=ops) as pair:
        stream = pair.controller.open_stream("put", {"path": "/tmp/x"})
        expected = hashlib.sha256()
        for i in range(64):
            block = make_block(i)
            expected.update(block)
            await stream.send(block)
            ops.flow.produced += len(block)
            ops.flow.max_ahead = max(ops.flow.max_ahead, ops.flow.produced - ops.flow.consumed)
        await stream.send_eof()
        final = await final_event(stream)
        assert final.result == {"sha256": expected.hexdigest(), "size": 64 * MIB}
        assert ops.flow.max_ahead <= DEFAULT_WINDOW
        assert pair.controller.stats.max_queued_data_bytes <= DEFAULT_WINDOW
        assert pair.agent.stats.max_buffered_in_bytes <= DEFAULT_WINDOW


async def test_small_stream_overtakes_a_large_transfer(tls: Tls) -> None:
    async with connected(tls) as pair:
        finished: list[str] = []
        large = pair.controller.open_stream("get", {"mib": 32})
        first_data = asyncio.Event()

        async def consume_large() -> None:
            async for event in large.events():
                if event.kind == "data":
                    first_data.set()
                    await asyncio.sleep(0.0005)
                elif event.kind == "done":
                    finished.append("large")

        large_task = asyncio.create_task(consume_large())
        await asyncio.wait_for(first_data.wait(), DEADLINE_S)
        # The small one has output of its own, sent round-robin with the large data.
        out, final = await final_event_and_output(
            pair.controller.open_stream("exec", {"argv": ["x" * 1000], "repeat": 300})
        )
        finished.append("small")
        assert (len(out["stdout"]), final.kind) == (300_000, "done")
        await asyncio.wait_for(large_task, DEADLINE_S * 2)
        assert finished == ["small", "large"]


async def test_cancel_cancels_the_agent_handler(tls: Tls) -> None:
    async with connected(tls) as pair:
        stream = pair.controller.open_stream("block", {"late_output": True})
        await pair.ops.wait_started(stream.id)
        stream.cancel()
        final = await final_event(stream)
        assert final.error == {"code": "cancelled", "message": "cancelled by the controller"}
        await pair.ops.wait_cancelled(stream.id)
        with pytest.raises(StreamError) as info:
            await stream.send(b"more")
        assert info.value.code == "cancelled"
        # The late output and the agent's "fail cancelled" were ignored; all still works.
        out, after = await final_event_and_output(
            pair.controller.open_stream("exec", {"argv": ["ok"]})
        )
        assert (out["stdout"], after.kind) == (b"ok", "done")
        assert not pair.controller.closed and not pair.agent.closed


async def test_cancel_read_with_its_open_is_answered_and_forgotten(tls: Tls) -> None:
    async with connected(tls) as pair:
        # Both frames leave in this loop turn, so the agent reads them together and its
        # task for the stream is cancelled before the handler starts.
        stream = pair.controller.open_stream("block", {})
        stream.cancel()
        assert (await final_event(stream)).error["code"] == "cancelled"
        await wait_until(lambda: stream.id not in pair.agent._streams)
        assert stream.id not in pair.ops.started  # the handler never ran
        out, after = await final_event_and_output(pair.controller.open_stream("exec", {"argv": ["ok"]}))
        assert (out["stdout"], after.kind) == (b"ok", "done")


async def test_close_fails_in_flight_streams_at_once(tls: Tls) -> None:
    async with connected(tls) as pair:
        streams = [pair.controller.open_stream("block") for _ in range(3)]
        for s in streams:
            await pair.ops.wait_started(s.id)
        started = time.monotonic()
        await pair.controller.close("gateway stopping")
        finals = [await final_event(s) for s in streams]
        assert time.monotonic() - started < 1.0
        for final in finals:
            assert final.error == {"code": "server_offline", "message": "gateway stopping"}
        with pytest.raises(StreamError) as info:
            pair.controller.open_stream("ping")
        assert info.value.code == "server_offline"
        # The agent notices the closed connection and cancels its handlers.
        await asyncio.wait_for(pair.agent.wait_closed(), DEADLINE_S)
        for s in streams:
            await pair.ops.wait_cancelled(s.id)


async def test_goaway_from_the_controller(tls: Tls) -> None:
    async with connected(tls) as pair:
        stream = pair.controller.open_stream("block")
        await pair.ops.wait_started(stream.id)
        await pair.controller.close("key revoked", code="key_revoked", goaway=True)
        await asyncio.wait_for(pair.agent.wait_closed(), DEADLINE_S)
        assert pair.agent.close_reason == "key revoked"
        assert pair.agent.close_code == "key_revoked"
        await pair.ops.wait_cancelled(stream.id)


async def test_goaway_from_the_agent_fails_controller_streams_with_its_message(tls: Tls) -> None:
    async with connected(tls) as pair:
        stream = pair.controller.open_stream("block")
        await pair.ops.wait_started(stream.id)
        await pair.agent.close("agent shutting down", goaway=True)
        final = await final_event(stream)
        assert final.error == {"code": "server_offline", "message": "agent shutting down"}
        await asyncio.wait_for(pair.controller.wait_closed(), DEADLINE_S)


async def test_heartbeats_keep_an_idle_connection_alive(tls: Tls) -> None:
    # Version 2's rules (the controller pings); version 3's are in test_heartbeat.py.
    async with connected(tls, heartbeat_s=0.1, controller_versions=(1, 2)) as pair:
        await asyncio.sleep(0.6)  # six heartbeat intervals with no traffic of its own
        assert not pair.controller.closed and not pair.agent.closed
        assert pair.controller.stats.frames_received >= 4  # pongs to its pings
        # Only the controller keeps an idle link alive: the agent hears its pings and
        # answers, and sends none of its own (half the heartbeat frames per agent).
        assert pair.controller.stats.pings_sent >= 4
        assert pair.agent.stats.pings_sent == 0
        # Heartbeats run from a loop timer, not a task per connection (thousands of
        # idle agents on a gateway each woke one per interval), and frames are parsed in
        # the transport's callback, not a reader task: a writer task per end, no more.
        names = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("fleetbus-proto-")]
        kinds = sorted(n.split("-")[2] for n in names)
        assert kinds == ["write", "write"]
        assert (await final_event(pair.controller.open_stream("ping"))).kind == "done"


async def test_silent_agent_is_declared_dead_by_heartbeat(tls: Tls) -> None:
    conns: asyncio.Queue[Connection] = asyncio.Queue()
    async with listener(tls, started_controllers(conns, heartbeat_s=0.2)) as port:
        reader, writer = await dial(tls, port)
        # A handshaken agent that then neither reads nor writes (a frozen process).
        await agent_handshake(reader, writer, {"method": "key", "key": KEY})
        writer.transport.pause_reading()
        controller = await asyncio.wait_for(conns.get(), DEADLINE_S)
        streams = [controller.open_stream("exec", {"argv": ["x"]}) for _ in range(3)]
        started = time.monotonic()
        finals = [await final_event(s) for s in streams]
        elapsed = time.monotonic() - started
        await asyncio.wait_for(controller.wait_closed(), DEADLINE_S)
        writer.close()
    for final in finals:
        assert final.error == {
            "code": "server_offline",
            "message": "agent connection lost: heartbeat timeout",
        }
    assert 0.4 <= elapsed < 1.5  # 3 * heartbeat_s = 0.6 s
    assert controller.close_reason == "agent connection lost: heartbeat timeout"


async def agent_of_a_silent_controller(tls: Tls, heartbeat_s: float, deadline_s: float,
                                       versions: tuple[int, ...] | None = None) -> tuple[Connection, float]:
    """An agent handshaken with a controller that then neither reads nor writes (its kernel
    still acknowledges: only silence tells), once the agent gave it up, and how long that took."""
    done = asyncio.Event()
    offered = {} if versions is None else {"versions": versions}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await controller_handshake(reader, writer, authenticate, heartbeat_s=heartbeat_s, **offered)
        writer.transport.pause_reading()
        await done.wait()
        writer.close()

    async with listener(tls, handler) as port:
        reader, writer = await dial(tls, port)
        welcome = await agent_handshake(reader, writer, {"method": "key", "key": KEY})
        agent = Connection.from_welcome(reader, writer, welcome, Ops())
        started = time.monotonic()
        agent.start()
        try:
            await asyncio.wait_for(agent.wait_closed(), deadline_s)
            return agent, time.monotonic() - started
        finally:
            done.set()


async def test_silent_controller_is_declared_dead_by_heartbeat(tls: Tls) -> None:
    # Version 2's bound (3 intervals); version 3's is in test_heartbeat.py.
    agent, elapsed = await agent_of_a_silent_controller(tls, 0.2, DEADLINE_S, versions=(1, 2))
    assert agent.close_reason == "controller connection lost: heartbeat timeout"
    assert agent.stats.pings_sent >= 1  # a quiet controller is pinged before it is given up
    assert 0.4 <= elapsed < 1.5


async def test_flow_control_violation_closes_the_connection(tls: Tls) -> None:
    """A controller that ignores the agent's window is cut off, not buffered."""
    agent_conns: asyncio.Queue[Connection] = asyncio.Queue()
    ops = Ops(slow_s=10.0)  # takes one chunk, then sits on it

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Inbound layout: this listening side is the agent.
        welcome = await agent_handshake(
            reader, writer, {"method": "key", "key": KEY}, window=64 * 1024
        )
        conn = Connection.from_welcome(reader, writer, welcome, ops)
        conn.start()
        await agent_conns.put(conn)

    async with listener(tls, handler) as port:
        reader, writer = await dial(tls, port)
        await controller_handshake(reader, writer, authenticate)
        agent = await asyncio.wait_for(agent_conns.get(), DEADLINE_S)
        writer.write(encode_frame({"t": "open", "s": 1, "op": "put", "args": {}}))
        # 160 KiB against a 64 KiB window (at most one 32 KiB chunk is consumed and
        # granted back before the handler dawdles), never waiting for window frames.
        for _ in range(5):
            writer.write(encode_frame({"t": "data", "s": 1}, b"x" * 32 * 1024))
        await writer.drain()
        frame = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
        while frame.type != "error":
            frame = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
        await asyncio.wait_for(agent.wait_closed(), DEADLINE_S)
        writer.close()
    assert frame.header["code"] == "invalid_request"
    assert "flow-control window" in frame.header["message"]
    assert agent.stats.max_buffered_in_bytes <= 64 * 1024


async def test_put_to_a_failing_agent_raises_instead_of_hanging(tls: Tls) -> None:
    async with connected(tls) as pair:
        stream = pair.controller.open_stream("refuse")  # fails without reading any data
        with pytest.raises(StreamError) as info:
            for _ in range(64):  # more than a window: would block forever without the fail
                await asyncio.wait_for(stream.send(b"z" * MIB), DEADLINE_S)
        assert (info.value.code, info.value.message) == ("not_found", "no such file: /nope")
        assert (await final_event(stream)).error == {
            "code": "not_found",
            "message": "no such file: /nope",
        }


async def test_frames_sent_right_behind_the_welcome_are_dispatched(tls: Tls) -> None:
    """Frames the handshake's reader already holds are handled once the connection starts."""
    agent_conns: asyncio.Queue[tuple[Connection, asyncio.StreamWriter]] = asyncio.Queue()
    held: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        welcome = await agent_handshake(reader, writer, {"method": "key", "key": KEY})
        # The welcome and the frames behind it came in one TLS record, so the stream
        # reader holds them now; they must not be lost when the parser takes over.
        held.append(len(reader._buffer))
        conn = Connection.from_welcome(reader, writer, welcome, Ops())
        conn.start()
        await agent_conns.put((conn, writer))

    async with listener(tls, handler) as port:
        reader, writer = await dial(tls, port)
        hello = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
        assert hello.type == "hello"
        welcome = {"t": "welcome", "version": 1, "server": "web-1", "heartbeat_s": 5,
                   "max_body": 1024 * 1024, "window": DEFAULT_WINDOW}
        writer.write(
            encode_frame(welcome)
            + encode_frame({"t": "ping", "n": 5})
            + encode_frame({"t": "open", "s": 1, "op": "exec", "args": {"argv": ["hi"]}})
        )
        agent, agent_writer = await asyncio.wait_for(agent_conns.get(), DEADLINE_S)
        got = [await asyncio.wait_for(read_frame(reader), DEADLINE_S)]
        while got[-1].type != "done":
            got.append(await asyncio.wait_for(read_frame(reader), DEADLINE_S))
        assert got[0].type == "pong" and got[0].header["n"] == 5
        assert got[-1].header == {"t": "done", "s": 1, "result": {"exit_code": 0}}
        writer.close()
        await asyncio.wait_for(agent.wait_closed(), DEADLINE_S)
        # The stream writer still learns that the connection ended (its wait_closed
        # follows the transport, which the parser took over from the stream reader).
        await asyncio.wait_for(agent_writer.wait_closed(), DEADLINE_S)
    assert held and held[0] > 0
    assert agent.close_reason == "controller connection lost: connection closed by peer"


async def test_a_peer_gone_before_the_connection_starts_closes_it(tls: Tls) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await controller_handshake(reader, writer, authenticate)
        writer.close()

    async with listener(tls, handler) as port:
        reader, writer = await dial(tls, port)
        welcome = await agent_handshake(reader, writer, {"method": "key", "key": KEY})
        assert await asyncio.wait_for(reader.read(1), DEADLINE_S) == b""  # the end, seen
        agent = Connection.from_welcome(reader, writer, welcome, Ops())
        agent.start()
        await asyncio.wait_for(agent.wait_closed(), DEADLINE_S)
    assert agent.close_reason == "controller connection lost: connection closed by peer"


async def test_a_peer_that_stops_reading_blocks_the_writer(tls: Tls) -> None:
    """Write backpressure still reaches the writer task once frames are parsed in the
    transport's callback: its drain() waits while the peer reads nothing."""
    conns: asyncio.Queue[Connection] = asyncio.Queue()
    async with listener(tls, started_controllers(conns, heartbeat_s=30)) as port:
        reader, writer = await dial(tls, port)
        # A large window lets the controller queue more than the kernel's socket
        # buffers hold, so the transport's own buffer must fill up behind them.
        await agent_handshake(reader, writer, {"method": "key", "key": KEY}, window=256 * MIB)
        writer.transport.pause_reading()
        controller = await asyncio.wait_for(conns.get(), DEADLINE_S)
        stream = controller.open_stream("put", {"path": "/x"})
        sender = asyncio.ensure_future(stream.send(b"p" * (64 * MIB)))
        deadline = time.monotonic() + DEADLINE_S
        while True:
            blocked = controller._write_blocked_since
            if blocked is not None and time.monotonic() - blocked > 0.2:
                break  # stuck in drain() for a while: the peer's silence reached it
            assert time.monotonic() < deadline, "the writer never waited for the peer"
            await asyncio.sleep(0.02)
        assert controller.stats.bytes_sent < 64 * MIB
        await controller.close("test over")
        await asyncio.wait_for(asyncio.gather(sender, return_exceptions=True), DEADLINE_S)
        writer.close()


async def test_wire_format_and_forward_compatibility(tls: Tls) -> None:
    """A hand-written controller: unknown types and unknown stream ids are ignored."""
    agent_conns: asyncio.Queue[Connection] = asyncio.Queue()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        welcome = await agent_handshake(reader, writer, {"method": "key", "key": KEY})
        conn = Connection.from_welcome(reader, writer, welcome, Ops())
        conn.start()
        await agent_conns.put(conn)

    async def next_frame(reader: asyncio.StreamReader, *types: str) -> protocol.Frame:
        while True:
            frame = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
            if frame.type in types:
                return frame

    async with listener(tls, handler) as port:
        reader, writer = await dial(tls, port)
        hello = await asyncio.wait_for(read_frame(reader), DEADLINE_S)
        assert hello.type == "hello" and hello.header["versions"] == [1, 2, 3]
        assert hello.header["auth"] == {"method": "key", "key": KEY}
        writer.write(
            encode_frame(
                {
                    "t": "welcome",
                    "version": 1,
                    "server": "web-1",
                    "heartbeat_s": 5,
                    "max_body": 1024,
                    "window": 4096,
                    "future_field": True,
                }
            )
        )
        agent = await asyncio.wait_for(agent_conns.get(), DEADLINE_S)
        for header, body in [
            ({"t": "from-the-future", "x": [1, 2]}, b"ignored"),
            ({"t": "data", "s": 99}, b"for a stream that does not exist"),
            ({"t": "window", "s": 42, "n": 5}, b""),
            ({"t": "cancel", "s": 7}, b""),
            ({"t": "pong", "n": 3}, b""),
            ({"t": "ping", "n": 77}, b""),
        ]:
            writer.write(encode_frame(header, body))
        assert (await next_frame(reader, "pong")).header == {"t": "pong", "n": 77}
        writer.write(
            encode_frame({"t": "open", "s": 1, "op": "exec", "args": {"argv": ["e" * 3000]}})
        )
        outs = []
        frame = await next_frame(reader, "out", "done")
        while frame.type == "out":
            assert frame.stream == 1 and len(frame.body) <= 1024  # our announced max_body
            outs.append((frame.header["stream"], frame.body))
            frame = await next_frame(reader, "out", "done")
        assert frame.header == {"t": "done", "s": 1, "result": {"exit_code": 0}}
        assert b"".join(b for name, b in outs if name == "stdout") == b"e" * 3000
        assert [b for name, b in outs if name == "stderr"] == [b"warn"]
        assert not agent.closed
        writer.write(
            encode_frame({"t": "goaway", "code": "replaced", "message": "newer connection"})
        )
        await asyncio.wait_for(agent.wait_closed(), DEADLINE_S)
        assert (agent.close_code, agent.close_reason) == ("replaced", "newer connection")
        writer.close()


# ------------------------------------------------------------- Python 3.9 runtime


def find_python39() -> str | None:
    """A working Python 3.9 interpreter, if this machine has one (pyenv shims may lie)."""
    candidates = [shutil.which("python3.9")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9")))
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 9))"],
            capture_output=True,
            text=True,
            timeout=30, check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "True":
            return candidate
    return None


SMOKE_39 = """
import asyncio, hashlib, sys
sys.path.insert(0, sys.argv[1])
from fleetbus_base import wire as p

async def ops(stream):
    if stream.op == "put":
        h = hashlib.sha256()
        async for chunk in stream.data():
            h.update(chunk)
        return {"sha256": h.hexdigest()}
    if stream.op == "get":
        await stream.send_meta(300000, None)
        await stream.send_data(b"g" * 300000)
        return None
    await asyncio.Event().wait()

async def main():
    got = asyncio.get_running_loop().create_future()
    async def auth(hello):
        return "s1"
    async def on_client(reader, writer):
        acc = await p.controller_handshake(
            reader, writer, auth, heartbeat_s=0.5, window=4096, max_body=1024
        )
        conn = p.Connection.from_accepted(reader, writer, acc)
        conn.start()
        got.set_result(conn)
    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    welcome = await p.agent_handshake(
        reader, writer, {"method": "key", "key": "k"}, window=4096, max_body=1024
    )
    agent = p.Connection.from_welcome(reader, writer, welcome, ops)
    agent.start()
    ctrl = await got
    s = ctrl.open_stream("put")
    await s.send(b"p" * 100000)
    await s.send_eof()
    events = [e async for e in s.events()]
    assert events[-1].result == {"sha256": hashlib.sha256(b"p" * 100000).hexdigest()}, events
    s = ctrl.open_stream("get")
    body = b"".join([e.body async for e in s.events() if e.kind == "data"])
    assert body == b"g" * 300000
    s = ctrl.open_stream("block")
    s.cancel()
    assert [e.error["code"] async for e in s.events()] == ["cancelled"]
    s = ctrl.open_stream("block")
    await agent.close("bye", goaway=True)
    assert [e.error["message"] async for e in s.events()] == ["bye"]
    await ctrl.wait_closed()
    server.close()
    await server.wait_closed()
    print("ok", sys.version_info[:2])

asyncio.run(main())
"""


def test_runs_on_python_3_9() -> None:
    python = find_python39()
    if python is None:
        pytest.skip("no Python 3.9 interpreter here")
    result = subprocess.run(
        [python, "-I", "-c", SMOKE_39, str(REPO / "agent")],
        capture_output=True,
        text=True,
        timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok (3, 9)"


async def test_tls_connections_share_one_read_buffer_yet_keep_their_bytes_apart(tls: Tls) -> None:
    """With the tls_read_buffer patch every TLS connection of a thread reads into one buffer
    so concurrent transfers on several connections must each still get exactly
    their own bytes, in both directions."""
    if not tuning.enabled():
        pytest.skip("FLEETBUS_TUNING=off: tls_read_buffer not applied")
    tuning.apply([tuning.TLS_READ_BUFFER_PATCH])
    assert tuning.tls_read_buffer() == "already shared"  # a second call must not wrap the class again
    async with connected(tls) as a, connected(tls) as b, connected(tls) as c:
        pairs = [a, b, c]
        ends = [conn for p in pairs for conn in (p.controller, p.agent)]
        protos = [conn._writer.transport._ssl_protocol for conn in ends]
        views = [proto.get_buffer(-1) for proto in protos]
        assert all(view.obj is views[0].obj for view in views)
        assert all(len(proto._ssl_buffer) == 0 for proto in protos)  # none of their own

        async def put(k: int, pair: Pair) -> None:
            stream = pair.controller.open_stream("put", {"path": "/tmp/x"})
            expected = hashlib.sha256()
            for i in range(8):
                block = make_block(1000 * (k + 1) + i)
                expected.update(block)
                await stream.send(block)
            await stream.send_eof()
            final = await asyncio.wait_for(collect(stream), 60)
            assert final[1].result == {"sha256": expected.hexdigest(), "size": 8 * MIB}

        async def get(pair: Pair) -> None:
            out, final = await asyncio.wait_for(collect(pair.controller.open_stream("get", {"mib": 8})), 60)
            assert final.result == {"sent": 8 * MIB}
            assert out["data"] == b"".join(make_block(i) for i in range(8))

        await asyncio.gather(*(put(k, p) for k, p in enumerate(pairs)), *(get(p) for p in pairs))
        # The read path stops without waiting for SSLWantReadError: a TLS close must
        # still read as the peer's close, answered at once: a missed close_notify left
        # the controller waiting out LINGER_S for the agent's before it gave up.
        started = time.monotonic()
        await a.controller.close("done here")
        assert time.monotonic() - started < LINGER_S
        await asyncio.wait_for(a.agent.wait_closed(), DEADLINE_S)
        assert a.agent.close_reason == "controller connection lost: connection closed by peer"


@dataclass
class QuickOps(Ops):
    """Ops with the agent Handler's fast path: ping answered without a handler task."""

    def answer_now(self, stream: AgentStream) -> dict[str, Any] | None:
        return {"quick": True} if stream.op == "ping" else None


async def test_an_operation_answered_at_once_runs_no_handler_task(tls: Tls) -> None:
    ops = QuickOps()
    async with connected(tls, ops=ops) as pair:
        done = await asyncio.wait_for(pair.controller.open_stream("ping").final(), DEADLINE_S)
        assert (done.kind, done.result) == ("done", {"quick": True})
        assert not ops.started  # the coroutine callback never ran
        other = await asyncio.wait_for(
            pair.controller.open_stream("exec", {"argv": ["a"]}).final(), DEADLINE_S)
        assert other.kind == "done" and ops.started  # everything else still gets its task


def test_the_agent_handler_answers_ping_at_once_and_nothing_else() -> None:
    from types import SimpleNamespace

    from fleetbus_agent.handlers import Handler

    handler = Handler()
    assert handler.answer_now(SimpleNamespace(op="ping")) == {}  # type: ignore[arg-type]
    for op in ("exec", "put", "get", "info", "nope"):
        assert handler.answer_now(SimpleNamespace(op=op)) is None  # type: ignore[arg-type]


async def test_final_skips_output_and_gives_its_credit_back(tls: Tls) -> None:
    # Many windows of output: without the credit going back the agent would stall and
    # final() would never return.
    async with connected(tls, window=64 * 1024) as pair:
        stream = pair.controller.open_stream("exec", {"argv": ["x" * 1000], "repeat": 2000})
        done = await asyncio.wait_for(stream.final(), DEADLINE_S)
        assert (done.kind, done.result) == ("done", {"exit_code": 0})
        assert pair.controller.stats.buffered_in_bytes == 0


async def test_next_event_reads_output_then_done_and_then_no_more(tls: Tls) -> None:
    # The generator-free way to read a stream: same events and credit as events(), and
    # nothing left for the event loop to finalize after done.
    async with connected(tls, window=64 * 1024) as pair:
        stream = pair.controller.open_stream("exec", {"argv": ["x" * 1000], "repeat": 200})
        got: dict[str, int] = {}
        while True:
            event = await asyncio.wait_for(stream.next_event(), DEADLINE_S)
            if event.kind != "out":
                break
            got[event.stream] = got.get(event.stream, 0) + len(event.body)  # type: ignore[index]
        assert (event.kind, event.result) == ("done", {"exit_code": 0})
        assert got == {"stdout": 1000 * 200, "stderr": 4}
        assert pair.controller.stats.buffered_in_bytes == 0
        with pytest.raises(StreamError):
            await stream.next_event()
