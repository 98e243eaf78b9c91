"""Where NATS is and how to prove who we are to it: server URL lists, NATS CLI contexts.

A deployment on a NATS cluster names several servers, so every setting that takes a URL
takes a comma-separated list (``--nats``, ``FLEETBUS_NATS_URL``, ``run.json``, a
context's ``url``); nats-py gets them as its server pool and moves to the next one when
a server is down. A URL may carry a user and password or a token in its user part, so a
URL is never shown as given: :func:`redact` is what every message prints.

A NATS CLI context (``--nats-context NAME``) is read the way the ``nats`` CLI stores it
(ADR-21): ``$XDG_CONFIG_HOME/nats/context/NAME.json`` (default ``~/.config``), with the
fields ``url``, ``token``, ``user``, ``password``, ``creds``, ``nkey``, ``ca``, ``cert``
and ``key``; the others (JetStream domain, inbox prefix, ...) are not used. ``creds`` and
``nkey`` must be file paths (``nsc://``, ``op://``, ``env://`` and ``data:`` are refused
by name).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import InvalidRequest

ENV_CONTEXT = "FLEETBUS_NATS_CONTEXT"
SCHEMES = ("nats", "tls", "ws", "wss")
# A context name is a file name in the context folder: no path separators.
CONTEXT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_CONTEXT_BYTES = 64 * 1024


def redact(url: str) -> str:
    """``url`` (one or a comma-separated list) with every user part shown as ``***``."""
    return ",".join(_redact_one(part) for part in url.split(","))


def _redact_one(url: str) -> str:
    text = url.strip()
    at = text.rfind("@")
    if at < 0:
        return text
    scheme, sep, _ = text.partition("://")
    return f"{scheme}://***@{text[at + 1:]}" if sep else f"***@{text[at + 1:]}"


def split_urls(value: str, source: str = "--nats") -> list[str]:
    """The servers of a comma-separated list, each checked; InvalidRequest names the bad one.

    Accepts what nats-py accepts: ``nats://``, ``tls://``, ``ws://``, ``wss://`` URLs or a
    bare ``HOST:PORT`` (then ``nats://``), never a mix of websocket and plain ones.
    """
    parts = [p.strip() for p in value.split(",")]
    if not value.strip() or any(not p for p in parts):
        raise InvalidRequest(f"{source}: {redact(value)!r} is not a list of NATS URLs "
                             f"(give nats://HOST:PORT, comma-separated, with no empty entry)")
    for part in parts:
        _check_url(part, source)
    websocket = {urlsplit(_with_scheme(p)).scheme in ("ws", "wss") for p in parts}
    if len(websocket) > 1:
        raise InvalidRequest(f"{source}: websocket and plain NATS URLs cannot be mixed in one list")
    return parts


def _with_scheme(url: str) -> str:
    return url if "://" in url else f"nats://{url}"


def _check_url(url: str, source: str) -> None:
    shown = _redact_one(url)
    try:
        parts = urlsplit(_with_scheme(url))
        port = parts.port
    except ValueError:
        raise InvalidRequest(f"{source}: {shown!r} is not a NATS URL (bad port)") from None
    if parts.scheme not in SCHEMES:
        raise InvalidRequest(f"{source}: {shown!r} is not a NATS URL "
                             f"(the scheme must be one of {', '.join(s + '://' for s in SCHEMES)})")
    if not parts.hostname:
        raise InvalidRequest(f"{source}: {shown!r} names no host")
    if port is None and parts.scheme in ("nats", "tls") and parts.netloc.endswith(":"):
        raise InvalidRequest(f"{source}: {shown!r} has an empty port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidRequest(f"{source}: {shown!r} is not a NATS URL (it has a path or query)")


@dataclass(frozen=True)
class NatsContext:
    """The connection fields of one NATS CLI context. Secrets are kept out of ``repr``."""

    name: str
    url: str | None = None
    token: str | None = None
    user: str | None = None
    password: str | None = None
    creds: str | None = None
    nkey: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __repr__(self) -> str:
        return f"NatsContext(name={self.name!r}, url={redact(self.url or '')!r})"

    @classmethod
    def load(cls, name: str) -> NatsContext:
        """Read context ``name``; InvalidRequest for a missing, unreadable or odd file."""
        if not CONTEXT_NAME_RE.match(name):
            raise InvalidRequest(f"--nats-context: {name!r} is not a context name")
        path = context_dir() / f"{name}.json"
        try:
            raw = path.read_bytes()[:MAX_CONTEXT_BYTES + 1]
        except FileNotFoundError:
            raise InvalidRequest(f"--nats-context: no NATS context {name!r} (looked for {path})") from None
        except OSError as exc:
            raise InvalidRequest(f"--nats-context: cannot read {path}: {exc.strerror}") from None
        try:
            data = json.loads(raw) if len(raw) <= MAX_CONTEXT_BYTES else None
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise InvalidRequest(f"--nats-context: {path} is not a NATS context (a JSON object)")
        fields: dict[str, str | None] = {}
        for key in ("url", "token", "user", "password", "creds", "nkey", "ca", "cert", "key"):
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise InvalidRequest(f"--nats-context: {path}: {key} must be a string")
            fields[key] = value or None
        for key in ("creds", "nkey"):
            fields[key] = _credential_path(fields[key], key, path)
        if data.get("nsc"):
            raise InvalidRequest(f"--nats-context: {path} uses nsc, which fleetbus does not run; "
                                 f"give the .creds file in creds")
        return cls(name=name, **fields)


def context_dir() -> Path:
    """Where the ``nats`` CLI keeps its contexts (XDG base directory rules)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "nats" / "context"


def _credential_path(value: str | None, key: str, path: Path) -> str | None:
    if value is None:
        return None
    if value.startswith("file://"):
        return value[len("file://"):]
    if re.match(r"^[a-z][a-z0-9+.-]*:", value) and not value.startswith("/"):
        scheme = value.split(":", 1)[0]
        raise InvalidRequest(f"--nats-context: {path}: {key} uses {scheme}:, which fleetbus does not "
                             f"support; give a file path")
    return value
