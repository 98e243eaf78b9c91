"""A seeded random fuzzer for the agent wire protocol and the bus API (issue 17).

Targets, each a test; all share one run seed (docs/testing.md, "Fuzzing"):

* frames: :class:`FrameParser` and :func:`read_frame` on valid, mutated and hostile
  byte streams cut at random boundaries; the handshakes of both modes; a running
  :class:`Connection` in either role. No network: a socketpair where a transport is
  needed.
* gateway: a real `fleetbus up` (the module's ``fleet``): pre-authentication garbage over
  plain TCP and TLS, then a scripted agent with a real key answering real commands with
  fuzzed frames.
* bus: fuzzed request bodies to every server operation on ``local`` and every admin
  endpoint, checked against the documented error codes.

Every case draws from its own ``random.Random(f"{seed}:{target}:{index}")``. A run keeps
going after a failure and reports each distinct one once, with the case that showed it
and a command that replays it. Waits are conditions with deadlines, never sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import socket
import ssl
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from fleetbus.errors import ERROR_CODES
from fleetbus_base import wire as protocol
from fleetbus_base.wire import (
    Accepted,
    AgentStream,
    AuthError,
    Connection,
    ControllerStream,
    Event,
    FrameParser,
    HandshakeError,
    ProtocolError,
    Welcome,
    agent_accept_handshake,
    agent_handshake,
    controller_connect_handshake,
    controller_handshake,
    encode_frame,
    inbound_proof,
    read_frame,
)
from fleetbus_base.wire.frames import DEFAULT_MAX_BODY, MIN_LIMIT, Frame, max_frame_size
from nats.aio.client import Client as NATS
from support.agents import Agent, add_agent_server, gateway_of, wait_online
from support.fuzzing import (
    Findings,
    FuzzRun,
    deep_json_text,
    dumps,
    encode_text,
    frame_stream,
    framed,
    hostile_frame,
    mutate_bytes,
    mutate_json,
    random_header,
    random_json,
    random_text,
    shown,
    split_randomly,
    valid_frame,
)
from support.processes import Fleet

RUN = FuzzRun.from_env()

# Cases per target in CI (FLEETBUS_FUZZ_CASES overrides them all): each target a few
# seconds on a shared 2-core machine, the whole file well under half a minute.
CI_CASES = {
    "frames_parser": 1500,
    "frames_roundtrip": 1500,
    "frames_handshake": 400,
    "frames_connection": 300,
    "gateway_preauth": 200,
    "gateway_link": 120,
    "bus_bodies": 500,
}

# A case taking longer than this is a hang (or quadratic work) as far as the fuzzer is
# concerned; the targets' own deadlines are far below it.
CASE_DEADLINE_S = 10.0

KEY = "fbk1_" + "0" * 16 + "_" + "k" * 43
FINGERPRINT = "sha256:" + "ab" * 32
PROTOCOL_LOGGER = "fleetbus_base.wire"


@pytest.fixture(scope="module", autouse=True)
def announce_seed() -> None:
    # Printed where pytest shows output (-s, or the captured section of a failure), and
    # in every failure message, so a random run can always be replayed.
    print(f"\nfleetbus fuzz seed {RUN.seed} (FLEETBUS_FUZZ_SEED={RUN.seed} replays this run)")


class ErrorLog(logging.Handler):
    """Collects ERROR records of one logger: the protocol logs there only for its own bugs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        out = [r.getMessage() + (f" ({r.exc_info[0].__name__})" if r.exc_info and r.exc_info[0] else "")
               for r in self.records]
        self.records.clear()
        return out


@pytest.fixture
def protocol_errors() -> Iterator[ErrorLog]:
    handler = ErrorLog()
    logger = logging.getLogger(PROTOCOL_LOGGER)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def _loop_error_recorder(seen: list[str]) -> Any:
    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        seen.append(f"{context.get('message')}: {type(exc).__name__ if exc else ''} {exc or ''}"[:300])

    return handler


# ============================================================================ frames


def _parse_with_parser(chunks: list[bytes], max_body: int) -> tuple[list[Frame], ProtocolError | None, int]:
    """Frames out of ``chunks`` through FrameParser, checking the buffer bound on the way."""
    parser = FrameParser(max_body)
    bound = 4 + max_frame_size(max_body)
    frames: list[Frame] = []
    for chunk in chunks:
        parser.feed(chunk)
        try:
            while (frame := parser.next()) is not None:
                frames.append(frame)
        except ProtocolError as exc:
            return frames, exc, parser.pending
        # Drained: what is left is less than one frame, whatever the peer claimed.
        assert parser.pending < bound, f"parser holds {parser.pending} bytes, bound {bound}"
    return frames, None, parser.pending


async def _parse_with_reader(data: bytes, max_body: int) -> tuple[list[Frame], BaseException]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames: list[Frame] = []
    while True:
        try:
            frames.append(await read_frame(reader, max_body))
        except (ProtocolError, EOFError) as exc:
            return frames, exc


async def test_fuzz_frames_parser() -> None:
    """FrameParser and read_frame: only ProtocolError (or EOFError), the same frames, bounded memory."""
    target = "frames_parser"
    findings = Findings(RUN, target)
    for index in RUN.indexes(CI_CASES[target]):
        rng = RUN.rng(target, index)
        max_body = rng.choice((MIN_LIMIT, 4096, 65536, DEFAULT_MAX_BODY))
        data, what = frame_stream(rng, max_body)
        chunks = split_randomly(rng, data)
        detail = f"max_body {max_body}, {len(data)} bytes: {'; '.join(what)}"
        traced = index % 4 == 0 and len(data) < 300_000
        started = time.monotonic()
        if traced:
            tracemalloc.start()
        try:
            frames, error, pending = _parse_with_parser(chunks, max_body)
            peak = tracemalloc.get_traced_memory()[1] if traced else 0
        except AssertionError as exc:
            findings.add(index, "FrameParser buffer bound", f"{exc}; {detail}")
            continue
        except Exception as exc:
            findings.add(index, f"FrameParser raised {type(exc).__name__}", f"{exc!r:.200}; {detail}")
            continue
        finally:
            if traced:
                tracemalloc.stop()
        # Nothing allocated in proportion to a claimed length (up to 4 GiB): only what the
        # input itself explains (decoded headers take up to ~20 times their JSON text).
        if traced and peak > 20 * len(data) + 2 * 1024 * 1024:
            findings.add(index, "FrameParser memory", f"peak {peak} bytes for {len(data)} in; {detail}")
        try:
            rframes, rerror = await _parse_with_reader(data, max_body)
        except Exception as exc:
            findings.add(index, f"read_frame raised {type(exc).__name__}", f"{exc!r:.200}; {detail}")
            continue
        if [(f.header, f.body) for f in frames] != [(f.header, f.body) for f in rframes]:
            findings.add(index, "FrameParser and read_frame disagree on frames", detail)
        elif (error is not None) != isinstance(rerror, ProtocolError):
            findings.add(index, "FrameParser and read_frame disagree on the error",
                         f"parser {error!r}, reader {rerror!r}; {detail}")
        elif error is None and bool(pending) != ("middle" in str(rerror)):
            findings.add(index, "read_frame's EOF does not match the parser's leftover",
                         f"pending {pending}, reader {rerror!r}; {detail}")
        for frame in frames:
            if not isinstance(frame.header, dict) or not isinstance(frame.header.get("t"), str):
                findings.add(index, "a frame without a string t came out", detail)
            elif "s" in frame.header and frame.stream is None:
                findings.add(index, "a frame with an invalid s came out", detail)
        if time.monotonic() - started > CASE_DEADLINE_S:
            findings.add(index, "slow parse", f"{time.monotonic() - started:.1f} s; {detail}")
    findings.check()


async def test_fuzz_frames_roundtrip() -> None:
    """What encode_frame writes, the parser reads back unchanged, however it is cut."""
    target = "frames_roundtrip"
    findings = Findings(RUN, target)
    for index in RUN.indexes(CI_CASES[target]):
        rng = RUN.rng(target, index)
        sent: list[tuple[dict[str, Any], bytes]] = []
        data = b""
        for _ in range(rng.randint(1, 5)):
            header, body = random_header(rng), rng.randbytes(rng.choice((0, 1, 100, 5000)))
            if "s" in header and not (type(header["s"]) is int and header["s"] > 0):
                continue  # a stream id encode_frame does not check; the receiver refuses it
            try:
                data += encode_frame(header, body)
            except ValueError:
                continue  # too large, NaN, a lone surrogate: documented refusals
            except Exception as exc:
                findings.add(index, f"encode_frame raised {type(exc).__name__}", f"{exc!r:.200}; {shown(header)}")
                continue
            sent.append((json.loads(json.dumps(header)), body))
        try:
            frames, error, pending = _parse_with_parser(split_randomly(rng, data), DEFAULT_MAX_BODY)
        except Exception as exc:
            findings.add(index, f"parsing our own frames raised {type(exc).__name__}", f"{exc!r:.200}")
            continue
        if error is not None or pending:
            findings.add(index, "our own frames do not parse", f"{error!r}, {pending} pending; {shown(sent)}")
        elif [(f.header, f.body) for f in frames] != sent:
            findings.add(index, "frames changed on the way", shown(sent))
    findings.check()


# ------------------------------------------------------------------------ handshakes


@contextlib.asynccontextmanager
async def _socket_pair() -> AsyncIterator[tuple[tuple[asyncio.StreamReader, asyncio.StreamWriter], ...]]:
    """Two connected stream pairs over a local socketpair: (under test, fuzzing peer)."""
    a, b = socket.socketpair()
    ours = await asyncio.open_connection(sock=a)
    theirs = await asyncio.open_connection(sock=b)
    try:
        yield ours, theirs
    finally:
        for _, writer in (ours, theirs):
            writer.transport.abort()


def _hello() -> dict[str, Any]:
    """A valid outbound hello with the frames target's key."""
    return {"t": "hello", "versions": [1], "agent": "fuzz/1", "auth": {"method": "key", "key": KEY},
            "facts": {"hostname": "h"}, "max_body": DEFAULT_MAX_BODY, "window": 65536}


def _as_frame(rng: random.Random, header: Any) -> tuple[bytes, list[str]]:
    """``header`` (mutated) as frame bytes; sometimes damaged further at the byte level."""
    value, done = mutate_json(rng, header) if rng.random() < 0.8 else (header, [])
    text = dumps(value, rng)
    data = framed(encode_text(text))
    if rng.random() < 0.2:
        data, how = mutate_bytes(rng, data)
        done += how
    return data, done


async def _read_frame_or_none(reader: asyncio.StreamReader) -> Frame | None:
    try:
        return await asyncio.wait_for(read_frame(reader), 2.0)
    except (TimeoutError, ProtocolError, EOFError, OSError):
        return None


async def _handshake_case(rng: random.Random) -> tuple[str, Any, list[str]]:
    """Run one side's handshake against a fuzzing peer; returns (role, outcome, what was sent)."""
    role = rng.choice(("controller", "agent", "agent_accept", "controller_connect"))
    sent: list[str] = []

    async def authenticate(hello: dict[str, Any]) -> str:
        auth = hello.get("auth") if isinstance(hello.get("auth"), dict) else {}
        if auth.get("key") != KEY:
            raise AuthError("auth_failed", "unknown key")
        return "fuzz"

    async with _socket_pair() as ((reader, writer), (peer_reader, peer_writer)):

        async def peer() -> None:
            if role == "controller":
                data, sent[:] = _as_frame(rng, _hello()) if rng.random() < 0.7 else frame_stream(rng)
                peer_writer.write(data)
            elif role == "agent":
                await _read_frame_or_none(peer_reader)  # the hello
                welcome = {"t": "welcome", "version": 1, "server": "fuzz", "heartbeat_s": 5.0,
                           "max_body": DEFAULT_MAX_BODY, "window": 65536}
                if rng.random() < 0.2:
                    welcome = {"t": "error", "code": "auth_failed", "message": "no"}
                data, sent[:] = _as_frame(rng, welcome) if rng.random() < 0.7 else frame_stream(rng)
                peer_writer.write(data)
            elif role == "agent_accept":
                challenge = await _read_frame_or_none(peer_reader)
                nonce = base64.b64decode(challenge.header["nonce"]) if challenge else b"\0" * 32
                hello = {"t": "hello", "version": 1, "proof": inbound_proof(KEY, nonce, FINGERPRINT),
                         "server": "fuzz", "heartbeat_s": 5.0, "max_body": DEFAULT_MAX_BODY, "window": 65536}
                # Mutate fields after the proof more often than the proof itself, so the
                # checks behind the proof are reached.
                data, sent[:] = _as_frame(rng, hello) if rng.random() < 0.8 else frame_stream(rng)
                peer_writer.write(data)
            else:
                challenge = {"t": "challenge", "versions": [1], "nonce": base64.b64encode(b"n" * 32).decode(),
                             "agent": "fuzz/1", "facts": {}, "max_body": DEFAULT_MAX_BODY, "window": 65536}
                data, sent[:] = _as_frame(rng, challenge) if rng.random() < 0.7 else frame_stream(rng)
                peer_writer.write(data)
                # Wait for a hello only after a whole challenge frame: on a partial one the
                # controller waits for the rest, and only our EOF ends that.
                hello = await _read_frame_or_none(peer_reader) if data and _frames_end_cleanly(data) else None
                if hello is not None:
                    welcome = {"t": "welcome", "version": hello.header.get("version"), "server": "fuzz",
                               "heartbeat_s": hello.header.get("heartbeat_s"), "max_body": DEFAULT_MAX_BODY,
                               "window": 65536}
                    more, how = _as_frame(rng, welcome) if rng.random() < 0.6 else (encode_frame(welcome), [])
                    peer_writer.write(more)
                    sent.extend(how)
            # End of input: the side under test must finish now, not at its deadline.
            with contextlib.suppress(OSError):
                peer_writer.write_eof()

        peer_task = asyncio.create_task(peer())
        try:
            if role == "controller":
                outcome: Any = await controller_handshake(reader, writer, authenticate, timeout=5)
            elif role == "agent":
                outcome = await agent_handshake(reader, writer, {"method": "key", "key": KEY}, timeout=5)
            elif role == "agent_accept":
                outcome = await agent_accept_handshake(reader, writer, key=KEY,
                                                       certificate_fingerprint=FINGERPRINT, timeout=5)
            else:
                outcome = await controller_connect_handshake(reader, writer, key=KEY,
                                                             agent_fingerprint=FINGERPRINT, server="fuzz",
                                                             timeout=5)
        except Exception as exc:
            outcome = exc
        peer_task.cancel()
        await asyncio.gather(peer_task, return_exceptions=True)
    return role, outcome, sent


async def test_fuzz_frames_handshake(protocol_errors: ErrorLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every handshake ends promptly in its result or HandshakeError, never another exception or a bug log."""
    target = "frames_handshake"
    # The inbound controller checks its TLS peer's certificate before reading anything;
    # a socketpair has none, and the pin check is not what is fuzzed here.
    monkeypatch.setattr(protocol, "peer_certificate_fingerprint", lambda writer: FINGERPRINT)
    findings = Findings(RUN, target)
    for index in RUN.indexes(CI_CASES[target]):
        rng = RUN.rng(target, index)
        started = time.monotonic()
        try:
            role, outcome, sent = await asyncio.wait_for(_handshake_case(rng), CASE_DEADLINE_S)
        except TimeoutError:
            findings.add(index, "handshake hangs", f"past {CASE_DEADLINE_S} s")
            continue
        elapsed = time.monotonic() - started
        detail = f"{role}: sent {'; '.join(sent) or 'as is'}"
        if not isinstance(outcome, (Welcome, Accepted, HandshakeError)):
            findings.add(index, f"{role} handshake raised {type(outcome).__name__}", f"{outcome!r:.200}; {detail}")
        elif elapsed > 4:  # the peer sent EOF: nothing should wait for the 5 s deadline
            findings.add(index, f"{role} handshake waited for its deadline after EOF", f"{elapsed:.1f} s; {detail}")
        for message in protocol_errors.take():
            # The protocol logs at ERROR only for its own bugs ("handshake failed with X"):
            # a peer's input is never one.
            findings.add(index, f"{role} handshake logged: {message}",
                         f"outcome {outcome!r:.100}; {detail}")
    findings.check()


# ----------------------------------------------------------------------- connections


class FuzzAgent:
    """The agent-side operations a Connection under test runs: small, well behaved."""

    async def __call__(self, stream: AgentStream) -> dict[str, Any] | None:
        if stream.op == "put":
            size = 0
            async for chunk in stream.data():
                size += len(chunk)
            return {"size": size}
        if stream.op == "exec":
            await stream.send_out("stdout", b"out")
            return {"exit_code": 0}
        if stream.op == "get":
            await stream.send_meta(3, 0o644)
            await stream.send_data(b"abc")
            return {}
        if stream.op == "sleep":
            await asyncio.sleep(3600)
        return {"op": stream.op}


def _connection_input(rng: random.Random, role: str, streams: int) -> tuple[bytes, list[str]]:
    """What the fuzzing peer sends a connection in ``role``: mostly plausible frames, some not."""
    parts: list[bytes] = []
    what: list[str] = []
    next_open = 1
    count = rng.randint(1, 12)
    for i in range(count):
        # Mostly plausible frames, so a case gets past its first frame; at most the last
        # one or two are the kind that end a connection at once.
        x = rng.random() if i >= count - 2 else rng.random() * 0.8
        if x < 0.6:
            if role == "agent":
                t = rng.choice(("open", "open", "data", "eof", "cancel", "window", "ping", "pong"))
            else:
                t = rng.choice(("out", "data", "meta", "done", "fail", "window", "ping", "pong"))
            s = rng.randint(1, streams + 1) if rng.random() < 0.97 else rng.choice((0, -3, 2**70, "1", None))
            header: dict[str, Any] = {"t": t, "s": s}
            body = b""
            if t == "open":
                header.update(s=next_open if rng.random() < 0.85 else rng.randint(0, next_open),
                              op=rng.choice(("exec", "put", "get", "info", "ping", "sleep", "", 7)),
                              args=rng.choice(({}, {"path": "/x"}, [], None, random_json(rng, 2))))
                next_open += 1
            elif t in ("out", "data"):
                body = rng.randbytes(rng.choice((0, 1, 500, 5000, 70_000)))
                if t == "out":
                    header["stream"] = rng.choice(("stdout", "stderr", "", None, 3, "\x1b]0;x\x07"))
            elif t == "meta":
                header.update(size=random_json(rng, 1), mode=random_json(rng, 1))
            elif t == "done":
                header["result"] = rng.choice(({}, {"exit_code": 0}, random_json(rng, 2)))
            elif t == "fail":
                header["error"] = rng.choice(({"code": "not_found", "message": "x"}, random_json(rng, 2)))
            elif t in ("window", "ping", "pong"):
                header["n"] = rng.choice((1, 4096, 2**40, 0, -1, 1.5, "1", None, 10**300))
            if rng.random() < 0.1:
                data, how = _as_frame(rng, header)
                parts.append(data + body)
                what.append(f"{t} ({', '.join(how) or 'as is'})")
            else:
                try:
                    parts.append(encode_frame(header, body))
                except ValueError:
                    continue
                what.append(f"{t} s={header.get('s')!r:.20}")
        elif x < 0.8:
            parts.append(valid_frame(rng))
            what.append("a random valid frame")
        elif x < 0.9:
            data, how = hostile_frame(rng)
            parts.append(data)
            what.append(how)
        else:
            final = rng.choice(({"t": "goaway", "code": random_json(rng, 1), "message": random_json(rng, 1)},
                                {"t": "error", "code": random_json(rng, 1)}))
            parts.append(framed(encode_text(dumps(final, rng))))
            what.append(f"{final['t']} {shown(final, 80)}")
    return b"".join(parts), what


@dataclass
class _Consumed:
    events: list[Event]
    error: BaseException | None = None


async def _consume(stream: ControllerStream) -> _Consumed:
    got = _Consumed([])
    try:
        while True:
            event = await stream.next_event()
            got.events.append(event)
            if event.kind in ("done", "fail"):
                return got
    except Exception as exc:
        got.error = exc
        return got


def _event_problems(events: list[Event]) -> list[str]:
    """Events that break what Event's docstring promises the controller's code."""
    out = []
    for e in events:
        if e.kind not in ("out", "meta", "data", "done", "fail"):
            out.append(f"event kind {e.kind!r}")
        elif e.kind in ("out", "data") and not (isinstance(e.body, bytes) and e.body):
            out.append(f"{e.kind} event without a body")
        elif e.kind == "out" and not isinstance(e.stream, str):
            out.append(f"out event with stream {type(e.stream).__name__}")
        elif e.kind == "meta" and not all(v is None or type(v) is int for v in (e.size, e.mode)):
            out.append("meta event with a non-integer size or mode")
        elif e.kind == "done" and not isinstance(e.result, dict):
            out.append("done event without a result object")
        elif e.kind == "fail" and not (isinstance(e.error, dict) and isinstance(e.error.get("code"), str)
                                       and isinstance(e.error.get("message"), str)):
            out.append(f"fail event with error {e.error!r:.80}")
    if events and events[-1].kind not in ("done", "fail"):
        out.append("the events do not end in done or fail")
    if any(e.kind in ("done", "fail") for e in events[:-1]):
        out.append("events after done/fail")
    return out


async def _connection_case(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """One Connection under fuzz; returns (role, what was sent, problems)."""
    role = rng.choice(("agent", "controller"))
    max_body = rng.choice((MIN_LIMIT, 65536, DEFAULT_MAX_BODY))
    window = rng.choice((MIN_LIMIT, 65536, 4 * 1024 * 1024))
    problems: list[str] = []
    async with _socket_pair() as ((reader, writer), (peer_reader, peer_writer)):
        conn = Connection(reader, writer, role=role, heartbeat_s=30.0, peer_max_body=DEFAULT_MAX_BODY,
                          peer_window=4 * 1024 * 1024, max_body=max_body, window=window,
                          on_open=FuzzAgent() if role == "agent" else None, name="fuzz")
        conn.start()
        consumers: list[asyncio.Task[_Consumed]] = []
        if role == "controller":
            for _ in range(rng.randint(1, 4)):
                stream = conn.open_stream(rng.choice(("exec", "put", "get", "info", "ping")), {"x": 1})
                consumers.append(asyncio.create_task(_consume(stream)))
                if stream.op == "put" and rng.random() < 0.5:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(stream.send(b"p" * 3000), 0.5)
        data, what = _connection_input(rng, role, len(consumers) or 3)

        async def drain_peer() -> None:  # the connection's writes must never block on us
            with contextlib.suppress(Exception):
                while await peer_reader.read(65536):
                    pass

        drainer = asyncio.create_task(drain_peer())
        for chunk in split_randomly(rng, data):
            peer_writer.write(chunk)
        with contextlib.suppress(OSError):
            peer_writer.write_eof()
        try:
            await asyncio.wait_for(conn.wait_closed(), 5.0)
        except TimeoutError:
            problems.append(f"still open 5 s after the peer's EOF (closed={conn.closed})")
            await conn.close("fuzz case over")
        if conn.open_streams:
            problems.append(f"{conn.open_streams} stream(s) left open after closing")
        if consumers:
            done, pending = await asyncio.wait(consumers, timeout=2.0)
            if pending:
                problems.append(f"{len(pending)} consumer(s) never got done/fail")
                for task in pending:
                    task.cancel()
            for task in done:
                got = task.result()
                if got.error is not None:
                    problems.append(f"next_event raised {type(got.error).__name__}: {got.error}")
                problems.extend(_event_problems(got.events))
        drainer.cancel()
        await asyncio.gather(drainer, return_exceptions=True)
    return role, what, problems


async def test_fuzz_frames_connection(protocol_errors: ErrorLog) -> None:
    """A running Connection fed fuzzed frames: closes or carries on, every stream ends, no bug logged."""
    target = "frames_connection"
    findings = Findings(RUN, target)
    loop_errors: list[str] = []
    asyncio.get_running_loop().set_exception_handler(_loop_error_recorder(loop_errors))
    for index in RUN.indexes(CI_CASES[target]):
        rng = RUN.rng(target, index)
        try:
            role, what, problems = await asyncio.wait_for(_connection_case(rng), CASE_DEADLINE_S)
        except TimeoutError:
            findings.add(index, "connection case hangs", f"past {CASE_DEADLINE_S} s")
            continue
        except Exception as exc:
            findings.add(index, f"connection case raised {type(exc).__name__}", f"{exc!r:.300}")
            continue
        detail = f"{role}: {'; '.join(what)}"
        for problem in problems:
            findings.add(index, f"{role}: {re.sub(r'[0-9]+', 'N', problem)}", f"{problem}; {detail}")
        for message in protocol_errors.take() + loop_errors:
            findings.add(index, f"{role}: logged {message[:120]}", detail)
        loop_errors.clear()
    findings.check()


# =========================================================================== gateway

PREFIX = "fleetbus"
STEADY = "fuzz-steady"  # a real agent that must keep answering whatever the fuzzer does
LINK = "fuzz-link"  # the scripted agent's server
PROTECTED = frozenset({"local", STEADY, LINK})
TRACEBACK = "Traceback (most recent call last):"


@dataclass
class Live:
    """The module's fleet with a real agent online and a key for the scripted one."""

    fleet: Fleet
    host: str
    port: int
    link_key: str
    steady: Agent
    workdir: Path


@pytest.fixture(scope="module")
def live(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    workdir = tmp_path_factory.mktemp("fuzz")
    gateway = gateway_of(fleet)
    steady = Agent(workdir / "steady", gateway["address"], gateway["fingerprint"],
                   add_agent_server(fleet, STEADY)).start()
    try:
        wait_online(fleet, STEADY)
        host, port = gateway["address"].rsplit(":", 1)
        yield Live(fleet, host, int(port), add_agent_server(fleet, LINK), steady, workdir)
    finally:
        steady.stop()


@dataclass
class LogWatch:
    """The fleet log from a point on: tracebacks in it, by the line that announced them."""

    fleet: Fleet
    offset: int = 0

    @classmethod
    def start(cls, fleet: Fleet) -> LogWatch:
        return cls(fleet, len(fleet.output()))

    def by_command(self) -> dict[str, str]:
        """Where each command that failed unexpectedly failed, by command id."""
        out = {}
        for before, where in self.tracebacks():
            # An id that slipped through with a trailing newline splits the line in two.
            m = re.search(r"command (\S+)(\n?) on \S+ failed unexpectedly", before)
            if m:
                out[m.group(1) + m.group(2)] = where
        return out

    def admin_failures(self) -> list[tuple[str, str]]:
        """(subject, where) of each admin request that failed unexpectedly, in log order.

        Admin replies carry no id. The core logs each failure just before it replies, in
        the same step, on its one connection: so the n-th ``internal`` admin reply to
        arrive is the n-th failure logged.
        """
        out = []
        for before, where in self.tracebacks():
            m = re.search(r"admin request on (\S+) failed", before)
            if m:
                out.append((m.group(1), where))
        return out

    def tracebacks(self) -> list[tuple[str, str]]:
        """(the log line before it, "ExcType: message @ our frame (innermost frame)") per
        traceback since start; a chained one counts once, by its last exception.

        "Our frame" is the innermost in fleetbus's own code: it names the defect better than
        a library frame (a BadSubjectError is raised in nats-py whoever built the subject).
        """
        lines = self.fleet.output()[self.offset:].splitlines()
        found = []
        i = 0
        while i < len(lines):
            if lines[i].strip() != TRACEBACK:
                i += 1
                continue
            before, ours, frame, j = "\n".join(lines[max(0, i - 2):i]), None, "?", i + 1
            while True:
                while j < len(lines) and lines[j].startswith(" "):
                    m = re.match(r'\s*File "([^"]+)", line \d+, in (\S+)', lines[j])
                    if m:
                        frame = f"{Path(m.group(1)).name}:{m.group(2)}"
                        if re.search(r"/(core/fleetbus|plugins/fleetbus_\w+|agent/fleetbus_agent)/", m.group(1)):
                            ours = frame
                    j += 1
                exc = lines[j].strip() if j < len(lines) else "?"
                k = j + 1
                while k < len(lines) and not lines[k].strip():
                    k += 1
                if k < len(lines) and lines[k].startswith(("During handling of the above exception",
                                                           "The above exception was the direct cause")):
                    k += 1
                    while k < len(lines) and lines[k].strip() != TRACEBACK:
                        k += 1
                    j = k + 1
                    continue
                break
            where = f"{ours} (in {frame})" if ours and ours != frame else frame
            found.append((before, f"{exc[:160]} @ {where}"))
            i = j + 1
        return found


async def _fleet_nc(fleet: Fleet) -> NATS:
    return await nats.connect(fleet.nats_url, user="owner", password=fleet.token, max_reconnect_attempts=2)


async def _still_serves(nc: NATS) -> list[str]:
    """What no longer works: a real agent's ping and exec, and an exec on local."""
    problems = []
    checks = [(f"{STEADY}.ping", {}), (f"{STEADY}.exec", {"argv": ["echo", "steady"], "timeout_s": 20}),
              ("local.exec", {"argv": ["echo", "steady"], "timeout_s": 20})]
    for subject, body in checks:
        try:
            msg = await nc.request(f"{PREFIX}.v1.servers.{subject}", json.dumps(body).encode(), timeout=30)
            reply = json.loads(msg.data)
        except Exception as exc:
            problems.append(f"{subject}: {type(exc).__name__} {exc}")
            continue
        if not reply.get("ok") or ("exec" in subject and reply.get("stdout") != "steady\n"):
            problems.append(f"{subject}: {shown(reply, 200)}")
    return problems


# The messages fleetbus itself puts on an ``internal`` error; any other came from an agent.
OWN_INTERNAL_MESSAGES = ("internal error", "agent sent a malformed result")


@dataclass
class Internal:
    """A reply with code ``internal``: explained later by the traceback its command id logged."""

    index: int
    command_id: str
    message: str
    detail: str
    arrived: float = 0.0
    """When the reply arrived (monotonic): orders admin replies, which carry no id."""


async def _after_target(findings: Findings, fleet: Fleet, watch: LogWatch, cases: str,
                        internals: list[Internal]) -> None:
    """The properties every live target ends with: no ``internal`` reply, the fleet still
    serves, and its log has no traceback. Each ``internal`` is reported by where it came
    from (the traceback logged for its command id), so one defect is one finding."""
    explained = watch.by_command()
    admin = sorted((c for c in internals if c.command_id.startswith("admin:")), key=lambda c: c.arrived)
    failures = watch.admin_failures()
    if len(admin) == len(failures) and all(c.command_id == f"admin:{s}" for c, (s, _) in zip(admin, failures)):
        for case, (_, where) in zip(admin, failures):
            explained[case.command_id + f"#{case.index}"] = where
            case.command_id += f"#{case.index}"
    for case in internals:
        message = case.message.split(": ", 1)[-1] if case.message.startswith("admin.") else case.message
        where = explained.get(case.command_id)
        if where is not None:
            # The exception's type and where it was raised name the defect; its message
            # (which value broke it) goes in the detail.
            cause = f"{where.split(':', 1)[0]} @ {where.rsplit(' @ ', 1)[-1]}"
            message = where
        elif message.startswith(OWN_INTERNAL_MESSAGES):
            cause = message[:100]
        else:
            cause = "with the agent's own message (its fail had no string code)"
        findings.add(case.index, f"internal: {cause}", f"{message[:200]}; {case.detail}")
    nc = await _fleet_nc(fleet)
    try:
        for problem in await _still_serves(nc):
            findings.add(-1, f"the fleet stopped serving: {problem[:100]}", f"after cases {cases}")
    finally:
        await nc.close()
    reported = {explained[c.command_id] for c in internals if c.command_id in explained}
    for before, where in watch.tracebacks():
        if where not in reported:
            findings.add(-1, f"Traceback in the fleet log: {where.split(':', 1)[0]} @ {where.rsplit(' @ ', 1)[-1]}",
                         f"{where}; logged after: {before[-200:]!r}; one of cases {cases}")


# ---------------------------------------------------------------- before authentication

_CLIENT_HELLO: list[bytes] = []


def _client_hello() -> bytes:
    """A real TLS ClientHello, made in memory, for byte-level mutation."""
    if not _CLIENT_HELLO:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        outgoing = ssl.MemoryBIO()
        tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing)
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        _CLIENT_HELLO.append(outgoing.read())
    return _CLIENT_HELLO[0]


def _fake_key(rng: random.Random) -> str:
    """A key of the right shape but never a real one: its id is random, so no real server
    (nor a throttle keyed by key id) is ever charged for the fuzzer's failures."""
    return f"fbk1_{rng.randbytes(8).hex()}_{base64.urlsafe_b64encode(rng.randbytes(32)).decode()[:43]}"


def _preauth_payload(rng: random.Random, tls: bool) -> tuple[bytes, str]:
    x = rng.random()
    if not tls and x < 0.3:
        data, how = mutate_bytes(rng, _client_hello())
        return data, "mutated ClientHello: " + ", ".join(how)
    if x < 0.45:
        hello = {**_hello(), "auth": rng.choice(({"method": "key", "key": _fake_key(rng)},
                                                     {"method": "password", "key": "x"}, {}, "key"))}
        data, how = _as_frame(rng, hello)
        return data, "hello: " + (", ".join(how) or "as is")
    if x < 0.65:
        data, what = frame_stream(rng)
        return data, "frames: " + "; ".join(what)
    if x < 0.8:
        data, how = hostile_frame(rng)
        return data, how
    if x < 0.9:
        return b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * rng.randint(1, 3), "HTTP request"
    return rng.randbytes(rng.choice((1, 5, 6, 100, 20_000))), "random bytes"


def _preauth_case(live: Live, index: int) -> tuple[int, str | None, str]:
    """One connection of garbage from its own loopback address; returns (index, problem, detail)."""
    rng = RUN.rng("gateway_preauth", index)
    # A source address per case (all of 127/8 is loopback): the gateway throttles failures
    # per address, and the fuzzer must not lock the real agents on 127.0.0.1 out.
    source = f"127.{rng.randint(1, 254)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    tls = rng.random() < 0.6
    payload, what = _preauth_payload(rng, tls)
    detail = f"{'TLS' if tls else 'plain TCP'} from {source}, {len(payload)} bytes: {what}"
    try:
        raw = socket.create_connection((live.host, live.port), timeout=10, source_address=(source, 0))
    except OSError as exc:
        return index, f"cannot connect: {exc}", detail
    sock: socket.socket = raw
    try:
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            try:
                sock = ctx.wrap_socket(raw)
            except (OSError, ssl.SSLError) as exc:
                return index, f"TLS handshake refused: {type(exc).__name__}", detail
        with contextlib.suppress(OSError):  # the gateway may have hung up already
            for chunk in split_randomly(rng, payload):
                sock.sendall(chunk)
        # Our end of the input: the gateway must hang up now, not at its handshake deadline.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 4.0
        sock.settimeout(1.0)
        while time.monotonic() < deadline:
            try:
                if not sock.recv(65536):
                    return index, None, detail
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                return index, None, detail
        return index, "still open 4 s after our EOF", detail
    finally:
        sock.close()


async def test_fuzz_gateway_preauth(live: Live) -> None:
    """Garbage before authentication, over TLS and plain TCP: each connection is closed, the gateway serves on."""
    target = "gateway_preauth"
    findings = Findings(RUN, target)
    watch = LogWatch.start(live.fleet)
    indexes = RUN.indexes(CI_CASES[target])
    loop = asyncio.get_running_loop()
    def case(index: int) -> tuple[int, str | None, str]:
        try:
            return _preauth_case(live, index)
        except Exception as exc:  # a fuzzer bug: reported, and the other cases still run
            return index, f"the fuzzer failed: {type(exc).__name__}", f"{exc!r:.300}"

    with ThreadPoolExecutor(8) as pool:
        results = await asyncio.gather(*(loop.run_in_executor(pool, case, i) for i in indexes))
    for index, problem, detail in results:
        if problem is not None:
            findings.add(index, problem, detail)
    await _after_target(findings, live.fleet, watch, f"{indexes.start}-{indexes.stop - 1}", [])
    findings.check()


# ------------------------------------------------------------------ a keyed, scripted agent

LINK_SOURCE = "127.0.0.2"  # the scripted agent's own address, apart from the real agent's

# What the bus asks of the scripted agent, one per operation; harmless by construction,
# since the scripted agent runs nothing.
LINK_REQUESTS: dict[str, dict[str, Any]] = {
    "exec": {"argv": ["true"], "timeout_s": 10},
    "put": {"path": "/tmp/fuzz-link/never-written", "content_b64": base64.b64encode(b"hello").decode()},
    "get": {"path": "/tmp/fuzz-link/never-read"},
    "info": {},
    "ping": {},
}


def _link_answer(rng: random.Random, op: str, s: int) -> tuple[list[bytes], list[str]]:
    """The scripted agent's answer to stream ``s``: frames, and what they are. Even an
    agent's own ``internal`` must reach the bus as ``transport_error``."""
    frames: list[bytes] = []
    what: list[str] = []

    def add(header: dict[str, Any], body: bytes = b"", mutate: float = 0.5) -> None:
        if rng.random() < mutate:
            data, how = _as_frame(rng, header)
            frames.append(data + body)
            what.append(f"{header['t']} ({', '.join(how) or 'as is'}: {data[6:126]!r})")
        else:
            frames.append(framed(encode_text(dumps(header, rng)), body))
            what.append(f"{header['t']} {shown(header, 120)}")

    x = rng.random()
    if x < 0.1:
        data, how = frame_stream(rng)
        return [data], ["frames: " + "; ".join(how)]
    if x < 0.25:
        add({"t": "fail", "s": s, "error": {"code": rng.choice((*ERROR_CODES, "bogus", "")),
                                            "message": random_text(rng)}})
        return frames, what
    if op == "exec":
        for _ in range(rng.randint(0, 3)):
            add({"t": "out", "s": s, "stream": rng.choice(("stdout", "stderr", "stdin", "", None, 1))},
                rng.randbytes(rng.choice((0, 3, 70_000))), mutate=0.2)
        result: dict[str, Any] = {"exit_code": rng.choice((0, 1, 255, -1, None)), "signal": None}
    elif op == "get":
        size = rng.choice((0, 3, 10, -1, 2**40))
        add({"t": "meta", "s": s, "size": size, "mode": rng.choice((0o644, None, -1, 2**40))}, mutate=0.3)
        for _ in range(rng.randint(0, 2)):
            add({"t": "data", "s": s}, rng.randbytes(rng.choice((0, 3, 10, 5000))), mutate=0.1)
        result = {}
    elif op == "put":
        result = {"size": 5, "mode": 0o644}
    elif op == "info":
        result = {"hostname": "fuzz", "os": "Linux", "os_version": "1", "kernel": "6", "arch": "x86_64",
                  "uptime_s": 12.5, "extra": {"agent_version": "fleetbus-agent/fuzz"}}
    else:
        result = {}
    add({"t": "done", "s": s, "result": result}, mutate=0.7)
    return frames, what


def _problem_kind(op: str, problem: str) -> str:
    """A problem's signature: the same defect with other values is one finding."""
    problem = re.sub(r"^(ok reply has \S+) of type .*", r"\1 of a wrong type", problem)
    problem = re.sub(r"^ok reply has mode .*", "ok reply has a mode that is not four octal digits", problem)
    return f"{op}: {re.sub(r'[0-9]+', 'N', problem)[:120]}"


def _reply_problems(op: str, reply: Any) -> list[str]:
    """What breaks docs/bus-api.md in a server command's reply."""
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        return [f"reply is not {{'ok': bool, ...}}: {shown(reply, 120)}"]
    if not reply["ok"]:
        error = reply.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            return [f"error is not {{'code', 'message'}}: {shown(error, 120)}"]
        if error.get("code") not in ERROR_CODES:
            return [f"undocumented error code {shown(error.get('code'), 40)}"]
        if error["code"] == "internal":
            return [f"internal {reply.get('id', '?')} {error['message'][:100]}"]
        return []

    def typed(name: str, *types: type) -> list[str]:
        value = reply.get(name)
        ok = any(type(value) is t for t in types)  # exact: a bool is not an integer here
        return [] if ok else [f"ok reply has {name} of type {type(value).__name__}: {shown(value, 60)}"]

    out = typed("id", str)
    if op == "exec":
        out += typed("exit_code", int, type(None)) + typed("signal", int, type(None))
        out += typed("stdout", str) + typed("stderr", str) + typed("duration_s", int, float)
    elif op in ("put", "get"):
        out += typed("size", int) + typed("sha256", str) + typed("mode", str, type(None))
        if isinstance(reply.get("size"), int) and reply["size"] < 0:
            out.append(f"ok reply has a negative size {reply['size']}")
        if isinstance(reply.get("mode"), str) and not re.fullmatch(r"[0-7]{4}", reply["mode"]):
            out.append(f"ok reply has mode {shown(reply['mode'], 40)}")
    elif op == "info":
        for name in ("hostname", "os", "os_version", "kernel", "arch"):
            out += typed(name, str, type(None))
        out += typed("uptime_s", int, float, type(None)) + typed("extra", dict)
    elif op == "ping":
        out += typed("latency_s", int, float)
    return out


async def _request_served(nc: NATS, subject: str, body: bytes, timeout: float) -> Any:
    """A request to a server that is being served right now: no responders is retried
    until its subscription is in place (the gateway serves a server just after welcome)."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return await nc.request(subject, body, timeout=timeout)
        except nats.errors.NoRespondersError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.01)  # a condition with a deadline: poll the subscription


async def _open_link(live: Live) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the pin is not what is fuzzed here
    reader, writer = await asyncio.open_connection(live.host, live.port, ssl=ctx,
                                                   local_addr=(LINK_SOURCE, 0))
    await agent_handshake(reader, writer, {"method": "key", "key": live.link_key}, timeout=5)
    return reader, writer


async def _next_open(reader: asyncio.StreamReader) -> Frame | None:
    """The gateway's next ``open`` (pings answered by nobody: the case is short)."""
    while True:
        frame = await _read_frame_or_none(reader)
        if frame is None or frame.type == "open":
            return frame


async def _link_case(live: Live, nc: NATS, rng: random.Random) -> tuple[str, list[str]]:
    """One scripted-agent connection; returns (what was done, problems). A problem
    ``internal <id>`` is a reply with code internal for command ``id``."""
    try:
        reader, writer = await _open_link(live)
    except Exception as exc:
        return "connect", [f"the gateway refused the link's real key: {type(exc).__name__} {exc}"]
    try:
        if rng.random() < 0.3:
            # Unasked-for frames: the gateway answers a ping behind them, or hangs up.
            data, what = _connection_input(rng, "controller", 3)
            for chunk in split_randomly(rng, data):
                writer.write(chunk)
            whole = _frames_end_cleanly(data)
            if whole:
                writer.write(encode_frame({"t": "ping", "n": 424242}))
            else:
                writer.write_eof() if writer.can_write_eof() else writer.close()
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                frame = await _read_frame_or_none(reader)
                if frame is None or (frame.type == "pong" and frame.header.get("n") == 424242):
                    return "unasked: " + "; ".join(what), []
            return "unasked: " + "; ".join(what), ["the gateway neither answered a ping nor hung up in 5 s"]
        op = rng.choice(tuple(LINK_REQUESTS))
        request = asyncio.create_task(_request_served(
            nc, f"{PREFIX}.v1.servers.{LINK}.{op}", json.dumps(LINK_REQUESTS[op]).encode(), timeout=15))
        opened = await _next_open(reader)
        if opened is None:
            request.cancel()
            with contextlib.suppress(BaseException):
                await request
            return op, ["no open frame reached the scripted agent"]
        frames, what = _link_answer(rng, op, opened.stream or 1)
        with contextlib.suppress(OSError):  # the gateway may hang up half-way: that is allowed
            for frame in frames:
                for chunk in split_randomly(rng, frame):
                    writer.write(chunk)
            await writer.drain()
        # Hang up after answering: a stream the answer left open must fail, not wait.
        writer.close()
        detail = f"{op}: " + "; ".join(what)
        try:
            msg = await request
        except TimeoutError:
            return detail, ["no reply within 15 s"]
        except nats.errors.NoRespondersError:
            return detail, ["no responders for the served link"]
        try:
            reply = json.loads(msg.data)
        except ValueError:
            return detail, [f"reply is not JSON: {msg.data[:100]!r}"]
        return detail, _reply_problems(op, reply)
    finally:
        writer.transport.abort()


def _frames_end_cleanly(data: bytes) -> bool:
    """Whether ``data`` parses as whole frames with nothing left over."""
    parser = FrameParser()
    parser.feed(data)
    try:
        while parser.next() is not None:
            pass
    except ProtocolError:
        return False
    return not parser.pending


async def test_fuzz_gateway_link(live: Live) -> None:
    """A keyed agent answering real commands with fuzzed frames: every command gets a
    documented reply (never internal), and the gateway keeps serving everyone else."""
    target = "gateway_link"
    findings = Findings(RUN, target)
    watch = LogWatch.start(live.fleet)
    indexes = RUN.indexes(CI_CASES[target])
    internals: list[Internal] = []
    nc = await _fleet_nc(live.fleet)
    try:
        for index in indexes:
            rng = RUN.rng(target, index)
            try:
                detail, problems = await asyncio.wait_for(_link_case(live, nc, rng), 30)
            except TimeoutError:
                findings.add(index, "link case hangs", "past 30 s")
                continue
            except Exception as exc:  # a fuzzer bug: reported, and the other cases still run
                findings.add(index, f"the fuzzer failed: {type(exc).__name__}", f"{exc!r:.300}")
                continue
            for problem in problems:
                if problem.startswith("internal "):
                    _, command_id, message = problem.split(" ", 2)
                    internals.append(Internal(index, command_id, message, detail))
                    continue
                findings.add(index, _problem_kind(detail.split(":", 1)[0], problem), f"{problem}; {detail}")
    finally:
        await nc.close()
    await _after_target(findings, live.fleet, watch, f"{indexes.start}-{indexes.stop - 1}", internals)
    findings.check()


# =============================================================================== bus

SERVER_OPS = ("exec", "put", "get", "info", "ping", "cancel")

# Every admin endpoint (core/fleetbus/admin.py), and whether a *valid* body could change
# state the other targets rely on. Those get their names steered away from the
# protected servers (below); test_fuzz_bus_bodies checks this table against the
# endpoints the running service announces, so a new endpoint must be classified here.
ADMIN_ENDPOINTS = {
    "servers.add": True,
    "servers.list": False,
    "servers.get": False,
    "servers.remove": True,
    "servers.rotate-key": True,
    "servers.revoke-key": True,
    "gateways.list": False,
    "credentials.add": True,
    "credentials.list": False,
    "credentials.remove": True,
    # Users change what the USERS account may do and reload NATS; no target uses a user.
    "users.add": True,
    "users.list": False,
    "users.show": False,
    "users.remove": True,
    "users.rotate": True,
    "users.change": True,
    # Reads the audit stream through a consumer of its own, deleted after each query.
    "audit.query": False,
    # Reads the registry and the users bucket about the asker; changes nothing.
    "users.reach": False,
}

SAFE_PROGRAMS = frozenset({"true", "echo", "printf", "/bin/true", "/bin/echo", "pwd"})


def _valid_body(rng: random.Random, subject: str, workdir: Path, index: int) -> dict[str, Any]:
    """A body the endpoint accepts, as the starting point of a mutation."""
    uid = f"fuzz-{RUN.seed}-{index}"
    if subject == "exec":
        body: dict[str, Any] = rng.choice((
            {"argv": ["echo", "x"]}, {"shell": "# a comment"}, {"argv": ["true"], "env": {"A": "1"}},
            {"argv": ["printf", "%s", "y"], "cwd": str(workdir), "stdin": "in", "timeout_s": 10},
            {"argv": ["echo", "z"], "stdin_b64": "aGk=", "output_subject": f"_INBOX.fuzz.{index}"},
        ))
        return {"id": uid, **body} if rng.random() < 0.7 else body
    if subject == "put":
        content = rng.randbytes(rng.choice((0, 5, 100)))
        body = {"path": str(workdir / "put" / f"f{index}"), "content_b64": base64.b64encode(content).decode(),
                "mode": rng.choice(("0644", 420, None)), "sha256": hashlib.sha256(content).hexdigest()}
        if rng.random() < 0.7:
            body["id"] = uid
        if rng.random() < 0.15:
            del body["content_b64"], body["sha256"]
            body["object"] = f"fuzz/none-{index}"
        elif rng.random() < 0.05:
            del body["content_b64"]
            body["stream"] = {"subject": f"_INBOX.fuzz.{index}", "size": 5, "idle_s": 1}
        return body
    if subject == "get":
        body = {"path": str(workdir / "small.txt"), "max_inline": rng.choice((0, 10, 524288))}
        if rng.random() < 0.15:
            body["object"] = f"fuzz/get-{index}"
        elif rng.random() < 0.05:
            body["stream"] = {"subject": f"_INBOX.fuzz.{index}", "window": 65536, "idle_s": 1}
        return body
    if subject in ("info", "ping"):
        return rng.choice(({}, {"id": uid}))
    if subject == "cancel":
        return {"id": uid}
    name = f"fuzz-{rng.randint(0, 20)}"
    return {
        "servers.add": {"server": {"name": name, "transport": rng.choice(("local", "agent-outbound")),
                                   "roles": ["web"], "labels": {"a": "b"}, "max_concurrency": 2}},
        "servers.get": {"name": rng.choice(("local", name))},
        "servers.remove": {"name": name},
        "servers.rotate-key": {"name": name},
        "servers.revoke-key": {"name": name},
        "credentials.add": {"name": f"fuzz-cred-{rng.randint(0, 5)}", "type": "password",
                            "secret_b64": "c2VjcmV0", "replace": rng.random() < 0.5},
        "credentials.remove": {"name": f"fuzz-cred-{rng.randint(0, 5)}", "force": rng.random() < 0.5},
        "users.add": {"name": name, "public_key": _user_key(rng), "allow": ["ping:local"],
                      "expires_in": rng.choice((None, "1h"))},
        "users.show": {"name": name},
        "users.remove": {"name": name},
        "users.rotate": {"name": name, "public_key": _user_key(rng)},
        "users.change": {"name": name, "allow": rng.choice(([], ["info:local"])),
                         "expires_in": rng.choice((None, "never", "2h"))},
        "users.reach": {"server": rng.choice(("local", name)), "op": rng.choice(("exec", "get", "ping"))},
        "audit.query": rng.choice(({}, {"server": "local", "op": "exec", "limit": 5}, {"since": "1h"},
                                   {"after_seq": 0, "user": "owner", "limit": 3})),
    }.get(subject, {})


def _user_key(rng: random.Random) -> str:
    """A valid nkey user public key from the run's seed (replayable)."""
    import nkeys

    return nkeys.from_seed(nkeys.encode_seed(rng.randbytes(32), nkeys.PREFIX_BYTE_USER)).public_key.decode()


def _steer(subject: str, body: Any, workdir: Path) -> Any:
    """Keep a mutated body from doing harm if it happens to be valid: no program but a
    harmless one, no file written outside the fuzzer's folder, no wait longer than a
    second for a streamed transfer, and no admin change to a server other targets use.
    Only values that would be valid are steered; wrong ones stay wrong."""
    if not isinstance(body, dict):
        return body
    if subject == "exec":
        argv = body.get("argv")
        if isinstance(argv, list) and argv and isinstance(argv[0], str) and argv[0] not in SAFE_PROGRAMS:
            argv[0] = "fuzz-no-such-program"
        if isinstance(body.get("shell"), str):
            # A comment to the shell whatever it holds (NUL bytes and all).
            body["shell"] = "#" + body["shell"].replace("\n", " ").replace("\r", " ")
    if subject == "put" and isinstance(body.get("path"), str):
        path = body["path"]
        # normpath, not resolve: the path may hold NUL or a lone surrogate, and the
        # folder has no symlinks for ".." to escape through.
        if path.startswith("/") and not os.path.normpath(path).startswith(f"{workdir}/"):
            body["path"] = str(workdir / "put" / "steered")
    stream = body.get("stream") if subject in ("put", "get") else None
    if isinstance(stream, dict) and (isinstance(stream.get("idle_s"), (int, float, str)) or "idle_s" not in stream):
        stream["idle_s"] = 1
    if ADMIN_ENDPOINTS.get(subject):
        for record in (body, body.get("server")):
            if isinstance(record, dict) and isinstance(record.get("name"), str) \
                    and record["name"].strip().lower() in PROTECTED:
                record["name"] = "fuzz-steered"
        server = body.get("server")
        if isinstance(server, dict) and isinstance(server.get("transport"), str) \
                and server["transport"].strip() not in ("local", "agent-outbound"):
            server["transport"] = "fuzz-none"  # no ssh or WinRM connection to a random host
    return body


def _bus_body(rng: random.Random, subject: str, workdir: Path, index: int) -> tuple[bytes, str]:
    """A fuzzed request body for ``subject`` and a description of it."""
    base = _valid_body(rng, subject, workdir, index)
    x = rng.random()
    if x < 0.6:
        value, done = mutate_json(rng, base)
        return encode_text(dumps(_steer(subject, value, workdir), rng)), "mutated: " + ", ".join(done)
    if x < 0.7:
        data, done = mutate_bytes(rng, json.dumps(_steer(subject, base, workdir)).encode())
        return data, "damaged bytes: " + ", ".join(done)
    if x < 0.78:
        # Deep nesting as text no encoder writes, in a field or as the whole body.
        deep = deep_json_text(rng)
        key = rng.choice((*base, "unknown")) if base else "unknown"
        return (deep if rng.random() < 0.3 else f'{{"{key}": {deep}}}').encode(), f"nested {deep.count('[') or deep.count('{')} deep at {key}"
    if x < 0.86:
        value = random_json(rng, 3)
        return encode_text(dumps(_steer(subject, value, workdir), rng)), f"any JSON: {shown(value, 80)}"
    if x < 0.9:
        size = rng.choice((1024 * 1024, 1024 * 1024 + 1, 3 * 1024 * 1024))
        return b'{"pad": "' + b"x" * (size - 11) + b'"}', f"{size}-byte body"
    return rng.choice((b"", b" ", b"\n", b"\xff\xfe", b"\x00", b"nul", b"{", b"NaN", b"1e999")), "odd text"


async def _bus_case(nc: NATS, rng: random.Random, index: int, workdir: Path,
                    gate: asyncio.Semaphore) -> tuple[str, str, Any, float]:
    """One request; returns (subject tail, what was sent, the reply or the exception, when it came).

    ``gate`` bounds the requests in flight; a cancel does not take it, since it mostly
    waits out its silence rather than loading fleetbus."""
    if rng.random() < 0.65:
        tail = f"servers.local.{rng.choice(SERVER_OPS)}"
        if rng.random() < 0.03:
            tail = f"servers.local.{rng.choice(('bogus', 'EXEC', 'exec-', 'x' * 40))}"
    else:
        tail = f"admin.{rng.choice(tuple(ADMIN_ENDPOINTS))}"
    op = tail.rsplit(".", 1)[-1] if tail.startswith("servers.") else tail[len("admin."):]
    body, what = _bus_body(rng, op, workdir, index)
    what = f"{what}; body {body[:160]!r}" + (f" ({len(body)} bytes)" if len(body) > 160 else "")
    # A header value NATS can carry: UTF-8, one line (CR/LF would end the header block).
    requester = encode_text(random_text(rng, 20)).decode("utf-8", "replace").replace("\r", "").replace("\n", "")
    headers = {"Fleetbus-Requester": requester or "fuzz"} if rng.random() < 0.2 else None
    # Within the embedded NATS's 8 MiB max_payload, which nats-py enforces before sending.
    body = body[: 4 * 1024 * 1024]
    # cancel is silent unless it cancelled something (docs/bus-api.md): a short wait.
    timeout = 1.5 if op == "cancel" else 20.0
    try:
        async with contextlib.nullcontext() if op == "cancel" else gate:
            msg = await nc.request(f"{PREFIX}.v1.{tail}", body, timeout=timeout, headers=headers)
    except Exception as exc:
        return tail, what, exc, time.monotonic()
    arrived = time.monotonic()
    try:
        return tail, what, json.loads(msg.data), arrived
    except ValueError:
        return tail, what, msg.data, arrived


async def test_fuzz_bus_bodies(live: Live) -> None:
    """Fuzzed bodies to every server operation on local and every admin endpoint: a
    documented reply to each, never internal, and local still runs commands afterwards."""
    target = "bus_bodies"
    findings = Findings(RUN, target)
    watch = LogWatch.start(live.fleet)
    workdir = live.workdir / "bus"
    (workdir / "put").mkdir(parents=True, exist_ok=True)
    (workdir / "small.txt").write_text("small\n")
    indexes = RUN.indexes(CI_CASES[target])
    internals: list[Internal] = []
    nc = await _fleet_nc(live.fleet)
    try:
        info = json.loads((await nc.request("$SRV.INFO.fleetbus-admin", b"", timeout=10)).data)
        announced = {e["subject"].removeprefix(f"{PREFIX}.v1.admin.") for e in info["endpoints"]}
        assert announced == set(ADMIN_ENDPOINTS), f"classify the admin endpoints {announced ^ set(ADMIN_ENDPOINTS)}"
        # A few at a time: fast, and far from the flood that issue 17's slow-consumer item is about.
        gate = asyncio.Semaphore(6)

        async def one(index: int) -> tuple[int, str, str, Any, float]:
            try:
                return (index, *await _bus_case(nc, RUN.rng(target, index), index, workdir, gate))
            except Exception as exc:  # a fuzzer bug: reported, and the other cases still run
                return index, "the fuzzer", f"failed: {exc!r:.300}", exc, 0.0

        # In batches, so a long run never holds more than a batch of bodies (some are MiBs).
        results: list[tuple[int, str, str, Any, float]] = []
        for start in range(0, len(indexes), 100):
            results += await asyncio.gather(*(one(i) for i in indexes[start:start + 100]))
    finally:
        await nc.close()
    for index, tail, what, reply, arrived in results:
        op = tail.rsplit(".", 1)[-1]
        detail = f"{tail}: {what}"
        if isinstance(reply, nats.errors.NoRespondersError):
            findings.add(index, f"{tail}: no responders", detail)
        elif isinstance(reply, nats.errors.TimeoutError):
            if op != "cancel":
                findings.add(index, f"{tail}: no reply within 20 s", detail)
        elif isinstance(reply, Exception):
            findings.add(index, f"{tail}: request failed with {type(reply).__name__}", f"{reply}; {detail}")
        else:
            problems = _reply_problems(op if tail.startswith("servers.") else "admin", reply)
            for problem in problems:
                if problem.startswith("internal "):
                    _, command_id, message = problem.split(" ", 2)
                    if tail.startswith("admin."):
                        command_id = f"admin:{PREFIX}.v1.{tail}"
                    internals.append(Internal(index, command_id, f"{tail}: {message}", detail, arrived))
                elif not (tail.startswith("admin.") and problem.startswith("ok reply has id")):
                    findings.add(index, _problem_kind(tail, problem), f"{problem}; {detail}")
    await _after_target(findings, live.fleet, watch, f"{indexes.start}-{indexes.stop - 1}", internals)
    findings.check()
