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
import json
import logging
import random
import re
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fleetbus_agent import protocol
from fleetbus_agent.frames import DEFAULT_MAX_BODY, MIN_LIMIT, Frame, max_frame_size
from fleetbus_agent.protocol import (
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
from support.fuzzing import (
    Findings,
    FuzzRun,
    dumps,
    encode_text,
    frame_stream,
    framed,
    hostile_frame,
    mutate_bytes,
    mutate_json,
    random_header,
    random_json,
    shown,
    split_randomly,
    valid_frame,
)

RUN = FuzzRun.from_env()

# Cases per target in CI (FLEETBUS_FUZZ_CASES overrides them all): each target a few
# seconds on a shared 2-core machine, the whole file well under half a minute.
CI_CASES = {
    "frames_parser": 1500,
    "frames_roundtrip": 1500,
    "frames_handshake": 400,
    "frames_connection": 300,
    "gateway_preauth": 120,
    "gateway_link": 120,
    "bus_bodies": 300,
}

# A case taking longer than this is a hang (or quadratic work) as far as the fuzzer is
# concerned; the targets' own deadlines are far below it.
CASE_DEADLINE_S = 10.0

KEY = "fbk1_" + "0" * 16 + "_" + "k" * 43
FINGERPRINT = "sha256:" + "ab" * 32
PROTOCOL_LOGGER = "fleetbus_agent.protocol"


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


def _hello(rng: random.Random) -> dict[str, Any]:
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


def _one_whole_frame(data: bytes) -> bool:
    parser = FrameParser()
    parser.feed(data)
    try:
        return parser.next() is not None and not parser.pending
    except ProtocolError:
        return False


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
                data, sent[:] = _as_frame(rng, _hello(rng)) if rng.random() < 0.7 else frame_stream(rng)
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
                hello = await _read_frame_or_none(peer_reader) if _one_whole_frame(data) else None
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
