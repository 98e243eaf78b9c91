"""A seeded random fuzzer's parts: run settings, per-case generators, findings.

Standard library only (``random.Random``), so every case is reproducible from three
values: the run's seed, the target's name and the case's index. Each case draws from its
own ``Random(f"{seed}:{target}:{index}")``, so one case can be replayed alone
(``FLEETBUS_FUZZ_CASE``) without generating the cases before it.

Settings (environment; docs/testing.md says how to run longer):

``FLEETBUS_FUZZ_SEED``   the run's seed (default: a fresh random one, printed)
``FLEETBUS_FUZZ_CASES``  cases per target (default: each target's small CI count)
``FLEETBUS_FUZZ_CASE``   run only this case index (with the seed that failed)
"""

from __future__ import annotations

import itertools
import json
import os
import random
import secrets
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fleetbus_base.wire.frames import DEFAULT_MAX_BODY, MAX_HEADER, encode_frame, max_frame_size

# ------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class FuzzRun:
    """One run's seed and case selection, read once from the environment."""

    seed: int
    cases: int | None
    only_case: int | None

    @classmethod
    def from_env(cls) -> FuzzRun:
        env = _start_environment()
        seed = env.get("FLEETBUS_FUZZ_SEED")
        cases = env.get("FLEETBUS_FUZZ_CASES")
        only = env.get("FLEETBUS_FUZZ_CASE")
        return cls(
            # 31 bits: short enough to read off a CI log and type back in.
            seed=int(seed) if seed else secrets.randbits(31),
            cases=int(cases) if cases else None,
            only_case=int(only) if only else None,
        )

    def indexes(self, default_cases: int) -> range:
        """The case indexes to run for a target whose CI default is ``default_cases``."""
        if self.only_case is not None:
            return range(self.only_case, self.only_case + 1)
        return range(self.cases if self.cases is not None else default_cases)

    def rng(self, target: str, index: int) -> random.Random:
        # A str seed is hashed with SHA-512 by random.seed: stable across processes and
        # Python versions, unaffected by PYTHONHASHSEED.
        return random.Random(f"{self.seed}:{target}:{index}")

    def reproducer(self, target: str, index: int) -> str:
        """The command that replays one case (``index`` < 0: the whole run of the target)."""
        if index < 0 and self.only_case is not None:
            index = self.only_case  # the run was one case already
        case = f" FLEETBUS_FUZZ_CASE={index}" if index >= 0 else ""
        cases = f" FLEETBUS_FUZZ_CASES={self.cases}" if self.cases is not None and index < 0 else ""
        return (f"FLEETBUS_FUZZ_SEED={self.seed}{case}{cases} "
                f".venv/bin/python -m pytest tests/test_fuzz.py -k {target}")


def _start_environment() -> dict[str, str]:
    """The FLEETBUS_FUZZ_* variables the test process was started with.

    tests/conftest.py removes every FLEETBUS_* variable at configure time, before test
    modules are imported, so no test can reach a developer's real fleet. These three only
    steer the fuzzer, so they are read from the environment the process started with
    (/proc/self/environ keeps it; the tests run on Linux), after os.environ.
    """
    env = {k: v for k, v in os.environ.items() if k.startswith("FLEETBUS_FUZZ_")}
    try:
        with open("/proc/self/environ", "rb") as fh:
            entries = fh.read().split(b"\0")
    except OSError:
        return env
    for entry in entries:
        name, sep, value = entry.decode(errors="replace").partition("=")
        if sep and name.startswith("FLEETBUS_FUZZ_"):
            env.setdefault(name, value)
    return env


# ------------------------------------------------------------------------- findings


@dataclass
class Finding:
    """One distinct kind of failure: the first case that showed it, and how many did."""

    signature: str
    index: int
    detail: str
    count: int = 1


@dataclass
class Findings:
    """Failures of one target, grouped by signature so a run reports each kind once.

    A fuzz run keeps going after a failure: the point is a list of every distinct defect
    with a reproducer each, not the first one alone.
    """

    run: FuzzRun
    target: str
    found: dict[str, Finding] = field(default_factory=dict)

    def add(self, index: int, signature: str, detail: str) -> None:
        known = self.found.get(signature)
        if known is None:
            self.found[signature] = Finding(signature, index, detail)
        else:
            known.count += 1

    def report(self) -> str:
        lines = [f"fuzz target {self.target}: {len(self.found)} distinct failure(s), seed {self.run.seed}"]
        for f in self.found.values():
            first = f"case {f.index}" if f.index >= 0 else "seen after the cases ran"
            lines.append(f"- {f.signature} ({f.count} case(s)); first: {first}")
            lines.append(f"    {f.detail}")
            lines.append(f"    reproduce: {self.run.reproducer(self.target, f.index)}")
        return "\n".join(lines)

    def check(self) -> None:
        """Fail the test with the report when anything was found."""
        assert not self.found, self.report()


def shown(value: Any, limit: int = 300) -> str:
    """A short repr of a generated input, for a finding's detail."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


# ----------------------------------------------------------------- random JSON values

# Strings chosen to break naive code: control characters, NUL, a lone surrogate (valid
# in JSON text as an escape, not encodable as UTF-8), right-to-left marks, terminal
# escapes, a trailing newline (Python's re "$" matches before it), wildcards and dots
# (subject tokens), path tricks.
NASTY_STRINGS = (
    "", " ", "\x00", "a\x00b", "\n", "local\n", "x\r\n", "\ud800", "\udfff\ud800",
    "\u202e\u0644", "\x1b[31mred\x1b[0m", "*", ">", "a.b", "..", "../../etc/passwd",
    "%s%n", "{}", "[]", "null", "true", "0", "-1", "1e999", "NaN", "é" * 3, "💥",
    "\ufeff", "0644", "-0", "0o777", "  0644", "\t", "\\", '"',
)
NASTY_NUMBERS = (
    0, -1, 1, -0.0, 0.5, 2**31 - 1, 2**31, 2**32, 2**63, -(2**63), 2**64 + 1, 10**30,
    1e308, -1e308, 5e-324, float("nan"), float("inf"), float("-inf"), 10**4000,
)


def random_text(rng: random.Random, max_len: int = 40) -> str:
    pick = rng.random()
    if pick < 0.3:
        return rng.choice(NASTY_STRINGS)
    if pick < 0.55:
        return "".join(rng.choice("abcxyz019-_./ ") for _ in range(rng.randint(0, max_len)))
    if pick < 0.8:
        # Any code point, surrogates included: JSON can carry them as escapes.
        return "".join(chr(rng.randint(0, 0x10FFFF)) for _ in range(rng.randint(1, max_len)))
    return "".join(chr(rng.randint(0, 0x7F)) for _ in range(rng.randint(1, max_len)))


def random_number(rng: random.Random) -> int | float:
    pick = rng.random()
    if pick < 0.5:
        return rng.choice(NASTY_NUMBERS)
    if pick < 0.8:
        return rng.randint(-(2**40), 2**40)
    return rng.uniform(-1e6, 1e6)


def random_json(rng: random.Random, depth: int = 3) -> Any:
    """Any JSON value (with Python's extensions NaN/Infinity), up to ``depth`` levels deep."""
    kind = rng.randrange(8 if depth > 0 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice((True, False))
    if kind in (2, 3):
        return random_number(rng)
    if kind in (4, 5):
        return random_text(rng)
    if kind == 6:
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    return {random_text(rng, 12): random_json(rng, depth - 1) for _ in range(rng.randint(0, 4))}


def deep_json_text(rng: random.Random, depth: int | None = None) -> str:
    """JSON text nested ``depth`` levels (default: 1,000 to 200,000), as no encoder would write it."""
    depth = depth if depth is not None else rng.choice((1000, 5000, 100_000, 200_000))
    opener, closer = rng.choice((("[", "]"), ('{"a":', "}")))
    return opener * depth + "1" + closer * depth


def dumps(value: Any, rng: random.Random) -> str:
    """JSON text for ``value``: ASCII-escaped or raw UTF-8, compact or spaced, at random."""
    return json.dumps(value, ensure_ascii=rng.random() < 0.5,
                      separators=rng.choice(((",", ":"), (", ", ": "))))


def encode_text(text: str) -> bytes:
    """UTF-8, with lone surrogates passed through as the invalid bytes they would be."""
    return text.encode("utf-8", "surrogatepass")


# --------------------------------------------------------------- mutating JSON values


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        value = value[p]
    return value


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    parent = _get(value, path[:-1])
    parent[path[-1]] = new
    return value


def _wrong_type(rng: random.Random, old: Any) -> Any:
    """A value of another JSON type than ``old`` (or a nasty one of the same)."""
    for _ in range(10):
        new = random_json(rng, 2)
        if type(new) is not type(old) or rng.random() < 0.2:
            return new
    return None


def mutate_json(rng: random.Random, value: Any, steps: int | None = None) -> tuple[Any, list[str]]:
    """Apply a few structural mutations to a copy of ``value``; returns it and what was done."""
    value = json.loads(json.dumps(value))  # a deep copy that stays plain JSON
    done: list[str] = []
    for _ in range(steps if steps is not None else rng.randint(1, 3)):
        paths = list(_paths(value))
        path = rng.choice(paths)
        node = _get(value, path)
        # Suffixes on strings (op 7) get three shares: a valid value plus one character is
        # where validation most often slips.
        op = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 7, 7, 8, 9, 10))
        where = ".".join(map(str, path)) or "<root>"
        if len(where) > 40:
            where = f"{where[:20]}...{where[-12:]} ({len(path)} deep)"
        if op == 0:
            value = _replace(value, path, _wrong_type(rng, node))
            done.append(f"wrong type at {where}")
        elif op == 1 and isinstance(node, dict):
            node[random_text(rng, 16) or "unknown"] = random_json(rng, 1)
            done.append(f"unknown field in {where}")
        elif op == 2 and isinstance(node, dict) and node:
            del node[rng.choice(list(node))]
            done.append(f"deleted a field of {where}")
        elif op == 3:
            size = rng.choice((1000, 70_000, 600_000, 1_100_000))
            value = _replace(value, path, rng.choice("ax\u00e9\U0001f4a5") * size)
            done.append(f"huge string ({size} chars) at {where}")
        elif op == 4:
            value = _replace(value, path, json.loads(deep_json_text(rng, rng.choice((50, 200, 400)))))
            done.append(f"deep nesting at {where}")
        elif op == 5:
            value = _replace(value, path, rng.choice(NASTY_STRINGS))
            done.append(f"nasty string at {where}")
        elif op == 6:
            value = _replace(value, path, random_number(rng))
            done.append(f"odd number at {where}")
        elif op == 7 and (strings := [p for p in paths if isinstance(_get(value, p), str)]):
            # Any string, not only the node drawn: suffixes are how a valid name or id
            # slips past a regex ending in "$", which matches before a final newline.
            path = rng.choice(strings)
            value = _replace(value, path, _get(value, path) + rng.choice(("\n", "\n", "\x00", " ", "\ud800", ".x", "*")))
            done.append(f"suffix on the string at {'.'.join(map(str, path))[:40] or '<root>'}")
        elif op == 8 and isinstance(node, list):
            node.extend(random_json(rng, 1) for _ in range(rng.randint(1, 5)))
            done.append(f"longer list at {where}")
        elif op == 9:
            value = _replace(value, path, [node] if rng.random() < 0.5 else {"v": node})
            done.append(f"wrapped {where}")
        else:
            value = _replace(value, path, None)
            done.append(f"null at {where}")
    return value, done


# ----------------------------------------------------------------------- byte mutation


def mutate_bytes(rng: random.Random, data: bytes, steps: int | None = None) -> tuple[bytes, list[str]]:
    """Byte-level damage: bit flips, cuts, inserts, duplicated or swapped ranges."""
    buf = bytearray(data)
    done: list[str] = []
    for _ in range(steps if steps is not None else rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
            done.append(f"bit flip at {i}")
        elif op == 1 and buf:
            i = rng.randrange(len(buf) + 1)
            del buf[i:]
            done.append(f"truncated to {i}")
        elif op == 2:
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
            done.append(f"random bytes inserted at {i}")
        elif op == 3 and buf:
            i = rng.randrange(len(buf))
            j = rng.randint(i, min(len(buf), i + 64))
            buf[j:j] = buf[i:j]
            done.append(f"duplicated {i}:{j}")
        elif op == 4 and len(buf) > 1:
            i = rng.randrange(len(buf))
            j = rng.randint(i, min(len(buf), i + 32))
            del buf[i:j]
            done.append(f"deleted {i}:{j}")
        else:
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.choice((b"\x00", b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b'"', b"}", b"\\"))
            done.append(f"odd byte inserted at {i}")
    return bytes(buf), done


def split_randomly(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` cut at random boundaries (sometimes one byte at a time, sometimes whole)."""
    if not data or rng.random() < 0.2:
        return [data] if data else []
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
    if rng.random() < 0.1 and len(data) < 200:
        cuts = list(range(1, len(data)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# ----------------------------------------------------------------------------- frames

FRAME_TYPES = ("open", "out", "data", "eof", "meta", "done", "fail", "cancel", "window",
               "ping", "pong", "hello", "welcome", "challenge", "error", "goaway", "zzz-future")


def random_header(rng: random.Random) -> dict[str, Any]:
    """A frame header a valid peer could send (types and fields roughly right)."""
    t = rng.choice(FRAME_TYPES)
    header: dict[str, Any] = {"t": t}
    if t in ("open", "out", "data", "eof", "meta", "done", "fail", "cancel", "window") or rng.random() < 0.1:
        header["s"] = rng.choice((1, 2, 3, rng.randint(1, 2**40)))
    for _ in range(rng.randint(0, 3)):
        header[random_text(rng, 8)] = random_json(rng, 2)
    return header


def framed(header_bytes: bytes, body: bytes = b"", n: int | None = None, h: int | None = None) -> bytes:
    """Raw frame bytes with a given (possibly lying) prefix."""
    n = 2 + len(header_bytes) + len(body) if n is None else n
    h = len(header_bytes) if h is None else h
    return struct.pack(">IH", n & 0xFFFFFFFF, h & 0xFFFF) + header_bytes + body


def valid_frame(rng: random.Random, max_body: int = DEFAULT_MAX_BODY) -> bytes:
    body_len = rng.choice((0, 0, 1, 17, 1000, rng.randint(0, min(max_body, 70_000))))
    for _ in range(5):
        try:
            return encode_frame(random_header(rng), rng.randbytes(body_len))
        except ValueError:  # a header that encodes to over 64 KiB, or NaN: try another
            continue
    return encode_frame({"t": "ping", "n": 1})


def hostile_frame(rng: random.Random, max_body: int = DEFAULT_MAX_BODY) -> tuple[bytes, str]:
    """One frame built to break a parser; returns the bytes and a short description."""
    limit = max_frame_size(max_body)
    kind = rng.randrange(14)
    if kind == 0:
        n = rng.choice((0, 1, 2, 3, 2**31, 2**31 - 1, 2**32 - 1, limit - 1, limit, limit + 1))
        return framed(b'{"t":"ping"}', n=n), f"length prefix {n}"
    if kind == 1:
        return framed(b'{"t":"ping"}', h=0), "header length 0"
    if kind == 2:
        return framed(b'{"t":"ping"}', h=rng.choice((13, 200, MAX_HEADER))), "header length beyond the frame"
    if kind == 3:
        text = deep_json_text(rng, rng.choice((1000, 20_000, 32_000)))
        return framed(text.encode()[:MAX_HEADER]), "deeply nested header"
    if kind == 4:
        pad = "x" * (MAX_HEADER - 20 + rng.randint(-3, 3))
        data = json.dumps({"t": "ping", "p": pad}).encode()
        return framed(data, h=min(len(data), MAX_HEADER)), f"header of {len(data)} bytes"
    if kind == 5:
        value = rng.choice(([], "t", 1, None, [{"t": "ping"}], {"t": 1}, {"t": None}, {"t": ["ping"]}, {}))
        return framed(json.dumps(value).encode()), f"header {value!r}"
    if kind == 6:
        s = rng.choice((0, -1, True, False, "1", 1.0, None, [1], 2**64, 10**400))
        return framed(json.dumps({"t": rng.choice(FRAME_TYPES), "s": s}).encode()), f"stream id {s!r}"
    if kind == 7:
        data = rng.choice((b'{"t":"\xff\xfe"}', b'{"t":"ping","x":"\xed\xa0\x80"}', b"\xef\xbb\xbf{\"t\":\"ping\"}",
                           b'{"t":"\\ud800"}', b'{"t":"ping"} {"t":"ping"}', b' {"t":"ping"} ', b'{"t":"ping",}'))
        return framed(data), f"header bytes {data!r}"
    if kind == 8:
        body = max_body + rng.choice((-1, 0, 1))
        return framed(b'{"t":"data","s":1}', b"\0" * max(0, body)), f"body of {body} bytes"
    if kind == 9:
        value = {"t": rng.choice(FRAME_TYPES), "s": 1, "n": rng.choice(NASTY_NUMBERS[:-4]),
                 "size": random_number(rng), "result": random_json(rng, 2), "error": random_json(rng, 2)}
        return framed(json.dumps(value).encode()), "odd numbers and values"
    if kind == 10:
        digits = rng.choice((4000, 4400, 10_000))
        return framed(b'{"t":"ping","n":' + b"9" * digits + b"}"), f"{digits}-digit integer"
    if kind == 11:
        data = json.dumps({"t": "ping", **{f"k{i}": i for i in range(3000)}}).encode()[:MAX_HEADER]
        return framed(data), "many fields"
    if kind == 12:
        data, how = mutate_bytes(rng, valid_frame(rng, max_body))
        return data, "mutated valid frame: " + ", ".join(how)
    return rng.randbytes(rng.randint(1, 64)), "random bytes"


def frame_stream(rng: random.Random, max_body: int = DEFAULT_MAX_BODY) -> tuple[bytes, list[str]]:
    """A byte stream of valid and hostile frames; returns it and what went into it."""
    parts: list[bytes] = []
    what: list[str] = []
    for _ in range(rng.randint(1, 6)):
        if rng.random() < 0.5:
            parts.append(valid_frame(rng, max_body))
            what.append("valid")
        else:
            data, how = hostile_frame(rng, max_body)
            parts.append(data)
            what.append(how)
    data = b"".join(parts)
    if rng.random() < 0.3:
        data, how = mutate_bytes(rng, data)
        what.append("then " + ", ".join(how))
    return data, what


def pick(rng: random.Random, weighted: list[tuple[float, Callable[[], Any]]]) -> Any:
    """Call one of ``weighted``'s makers, chosen by weight."""
    total = sum(w for w, _ in weighted)
    x = rng.uniform(0, total)
    for w, make in weighted:
        x -= w
        if x <= 0:
            return make()
    return weighted[-1][1]()
