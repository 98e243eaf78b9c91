"""How every fleetbus process finds and connects to NATS.

The servers come from ``--nats``, else ``FLEETBUS_NATS_URL``, else the NATS CLI context
(``--nats-context`` / ``FLEETBUS_NATS_CONTEXT``), else the run file that ``fleetbus up``
writes in the home folder; each is one URL or a comma-separated list
(:mod:`fleetbus.natsconfig`). The embedded NATS requires a token; it is read from
``FLEETBUS_NATS_TOKEN``, a context or the token file, never from a command line, so it
never shows in a process list. Since the embedded NATS runs with accounts, its token is
the password of its user ``owner`` (a NATS token cannot sit beside account users): a
token of the embedded form (``fbn_`` and 64 hex digits, :data:`OWNER_TOKEN_RE`) is sent
as ``owner``'s password, any other token as a NATS token. A ``.creds`` file (``--nats-creds`` /
``FLEETBUS_NATS_CREDS``), an nkey seed file (``--nats-nkey`` / ``FLEETBUS_NATS_NKEY``, as
``fleetbus users add --out`` writes it) or a context's user, password, nkey or TLS files
are the other ways to authenticate; given an nkey or creds file, the home folder's token
file is not read (the caller chose who to be).

A connection that authenticates with an nkey seed or a creds file is a user's
(docs/security.md): its inboxes are ``_I.<its public key>`` (nats-py's ``inbox_prefix``),
the only subjects its permissions let it subscribe to. The public key comes from the
seed, which is read for that and never logged or put in an error.
"""

from __future__ import annotations

import fcntl
import os
import re
import ssl
import sys
import termios
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nkeys
from nats.aio.client import Client as NATS

from .errors import InvalidRequest, ServerOffline
from .home import Home
from .natsconfig import ENV_CONTEXT, NatsContext, redact, split_urls
from .subjects import Names

# Publishing that writes to nats-py's socket at once where tuning allows it
# (fleetbus.tuning.natspy); the plugin host and the client import it from here.
from .tuning.natspy import publish_now, publish_soon, send_now  # noqa: F401

ENV_URL = "FLEETBUS_NATS_URL"
ENV_TOKEN = "FLEETBUS_NATS_TOKEN"
ENV_CREDS = "FLEETBUS_NATS_CREDS"
ENV_NKEY = "FLEETBUS_NATS_NKEY"
ENV_PREFIX = "FLEETBUS_PREFIX"
DEFAULT_PREFIX = "fleetbus"
#: A token the embedded NATS made (embedded.new_token): the password of OWNER_USER there.
OWNER_TOKEN_RE = re.compile(r"^fbn_[0-9a-f]{64}$")
OWNER_USER = "owner"


@dataclass(frozen=True)
class NatsSettings:
    """Where NATS is and what to present to it. ``url`` is one URL or a comma-separated
    list; secrets (token, password) stay out of ``repr``."""

    url: str
    token: str | None = field(default=None, repr=False)
    creds_file: str | None = None
    prefix: str = DEFAULT_PREFIX
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    nkey_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def __repr__(self) -> str:
        return (f"NatsSettings(url={self.shown!r}, prefix={self.prefix!r}, creds_file={self.creds_file!r}, "
                f"user={self.user!r}, nkey_file={self.nkey_file!r}, token={'***' if self.token else None})")

    @property
    def servers(self) -> list[str]:
        """The server pool, in the order given (InvalidRequest for a bad list)."""
        return split_urls(self.url)

    @property
    def shown(self) -> str:
        """The URL list as messages print it: user parts (tokens, passwords) redacted."""
        return redact(self.url)

    @classmethod
    def resolve(
        cls,
        url: str | None = None,
        home: Home | None = None,
        prefix: str | None = None,
        creds_file: str | None = None,
        context: str | None = None,
        nkey_file: str | None = None,
    ) -> NatsSettings:
        """The settings from flags, then the environment, then a context, then run.json."""
        home = home or Home.resolve()
        context = context or os.environ.get(ENV_CONTEXT) or None
        ctx = NatsContext.load(context) if context else None
        token = os.environ.get(ENV_TOKEN) or (ctx.token if ctx else None) or None
        creds = creds_file or os.environ.get(ENV_CREDS) or (ctx.creds if ctx else None) or None
        nkey = nkey_file or os.environ.get(ENV_NKEY) or (ctx.nkey if ctx else None) or None
        # An nkey or creds file says who to be: the owner's token file must not ride along.
        chosen = bool(nkey or creds)
        prefix = prefix or os.environ.get(ENV_PREFIX) or DEFAULT_PREFIX
        source = ("--nats" if url else ENV_URL if os.environ.get(ENV_URL)
                  else f"the NATS context {ctx.name}" if ctx and ctx.url else "the run file")
        url = url or os.environ.get(ENV_URL) or (ctx.url if ctx else None)
        if not url:
            run = home.read_run()
            if not run or "nats_url" not in run:
                raise ServerOffline(
                    f"no NATS to talk to: start `fleetbus up`, or pass --nats URL[,URL...] "
                    f"(or set {ENV_URL}, or --nats-context); looked for {home.run_file}"
                )
            raw = run["nats_url"]
            url = ",".join(str(u) for u in raw) if isinstance(raw, list) else str(raw)
            prefix = str(run.get("prefix", prefix))
            # `up` on an external NATS records how it authenticated (names and paths only).
            if ctx is None and run.get("nats_context"):
                ctx = NatsContext.load(str(run["nats_context"]))
                token = token or ctx.token
            creds = creds or (str(run["nats_creds"]) if run.get("nats_creds") else None)
            if token is None and not chosen and home.nats_token.exists():
                token = home.nats_token.read_text().strip()
        split_urls(url, source)  # a bad list is one clear line now, not nats-py's later
        return cls(url=url, token=token, creds_file=creds, prefix=prefix,
                   user=ctx.user if ctx else None, password=ctx.password if ctx else None,
                   nkey_file=nkey, tls_ca=ctx.ca if ctx else None,
                   tls_cert=ctx.cert if ctx else None, tls_key=ctx.key if ctx else None)

    def user_public_key(self) -> str | None:
        """The nkey public key this connection authenticates as, read from the nkey seed
        file or the creds file's seed; None when it uses neither (the owner, a password).
        InvalidRequest naming the file when it cannot be read or holds no user seed."""
        if self.creds_file:
            path = _readable(self.creds_file, "NATS credentials file")
            return _public_key(_creds_seed(_read_small(path, "NATS credentials file")), path,
                               "NATS credentials file")
        if self.nkey_file:
            path = _readable(self.nkey_file, "NATS nkey seed file")
            return _public_key(_read_small(path, "NATS nkey seed file").strip(), path, "NATS nkey seed file")
        return None

    def auth_options(self) -> dict[str, object]:
        """nats-py ``connect`` options for these credentials; InvalidRequest when a named
        file cannot be read (checked here so the error names the file, not nats-py's)."""
        opts: dict[str, object] = {}
        if self.token and not self.user and OWNER_TOKEN_RE.fullmatch(self.token):
            # nats-py sends user and password instead of a token, never both.
            opts["user"], opts["password"] = OWNER_USER, self.token
        elif self.token:
            opts["token"] = self.token
        if self.user:
            opts["user"] = self.user
            if self.password:
                opts["password"] = self.password
        if self.creds_file:
            opts["user_credentials"] = _readable(self.creds_file, "NATS credentials file")
        if self.nkey_file:
            opts["nkeys_seed"] = _readable(self.nkey_file, "NATS nkey seed file")
        if self.tls_ca or self.tls_cert:
            tls = ssl.create_default_context(cafile=_readable(self.tls_ca, "TLS CA file") if self.tls_ca else None)
            if self.tls_cert:
                tls.load_cert_chain(_readable(self.tls_cert, "TLS certificate"),
                                    _readable(self.tls_key, "TLS key") if self.tls_key else None)
            opts["tls"] = tls
        return opts


def _readable(path: str, what: str) -> str:
    full = Path(path).expanduser()
    if not os.access(full, os.R_OK) or not full.is_file():
        raise InvalidRequest(f"cannot read the {what} {full}")
    return str(full)


#: Larger than any creds file; a seed file is a line.
_MAX_KEY_FILE = 64 * 1024
_CREDS_SEED_RE = re.compile(rb"-{3,}BEGIN USER NKEY SEED-{3,}\s+(\S+)")


def _read_small(path: str, what: str) -> bytes:
    """A key file's bytes (a few hundred; read once per connect, so read directly)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_KEY_FILE + 1)
    except OSError:
        raise InvalidRequest(f"cannot read the {what} {path}") from None
    if len(data) > _MAX_KEY_FILE:
        raise InvalidRequest(f"the {what} {path} is larger than 64 KiB; that is not a key file")
    return data


def _creds_seed(data: bytes) -> bytes:
    """The seed in a creds file's ``BEGIN USER NKEY SEED`` block (empty when it has none)."""
    found = _CREDS_SEED_RE.search(data)
    return found.group(1) if found else b""


def _public_key(seed: bytes, path: str, what: str) -> str:
    """The user public key of ``seed``; InvalidRequest naming ``path``, never the seed."""
    try:
        keys = nkeys.from_seed(bytearray(seed))
        public = keys.public_key.decode()
        keys.wipe()
    except Exception:
        raise InvalidRequest(f"the {what} {path} holds no nkey user seed") from None
    if not public.startswith("U"):
        raise InvalidRequest(f"the {what} {path} holds no nkey user seed")
    return public


def unread_bytes(nc: NATS) -> int:
    """Bytes NATS has sent this process that nats-py has not parsed yet: what its stream
    reader holds plus what waits in the socket's receive buffer (0 where unknown).

    Above a message or two, the process is reading behind what NATS delivers, and
    nats-server is holding the rest for it (a *slow consumer* once that passes its
    ``max_pending``).
    """
    transport = getattr(nc, "_transport", None)
    reader = getattr(transport, "_io_reader", None)
    writer = getattr(transport, "_io_writer", None)
    buffered = getattr(reader, "_buffer", None)
    held = len(buffered) if isinstance(buffered, bytearray) else 0
    sock = writer.get_extra_info("socket") if writer is not None else None
    if sock is None:
        return held
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (OSError, ValueError):
        return held
    return held + int.from_bytes(raw, sys.byteorder, signed=True)


def watch_errors(nc: NATS, listener: Callable[[Exception], None]) -> None:
    """Call ``listener(exc)`` for every error nats-py reports on ``nc`` (its ``error_cb``),
    before the callback it was connected with. ``listener`` must not block."""
    previous = getattr(nc, "_error_cb", None)
    if previous is None:
        return  # nats-py's internals differ: nothing to chain onto

    async def chained(exc: Exception) -> None:
        try:
            listener(exc)
        except Exception:
            pass  # a listener's bug must not reach nats-py's read loop
        await previous(exc)

    nc._error_cb = chained  # type: ignore[attr-defined]


async def connect(
    settings: NatsSettings, name: str, reconnect_forever: bool = True, user_inbox: bool = False,
    **kwargs: object,
) -> NATS:
    """Connect to NATS; an unreachable server is a one-line ServerOffline.

    The first connection fails fast (a CLI must not hang on a stopped stack); once
    connected, long-running processes reconnect forever. With ``user_inbox`` (the
    client's), a connection authenticating with an nkey seed or creds file takes its
    inboxes under ``_I.<its public key>`` (:func:`user_inbox_prefix`); fleetbus's own
    processes keep ``_INBOX``, which is where their replies are answered.
    """

    # nats-py ends a failed first connect with NoServersError whatever went wrong; what
    # each server said on the way goes to error_cb, kept here until connected.
    seen: list[Exception] = []

    async def _quiet(exc: Exception) -> None:  # nats-py prints tracebacks by default
        if len(seen) < 16 and not connected:
            seen.append(exc)

    connected = False

    servers = settings.servers
    opts: dict[str, object] = {
        "servers": servers,
        "name": name,
        "connect_timeout": 3,
        "allow_reconnect": True,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.25,
        "error_cb": _quiet,
    }
    opts.update(settings.auth_options())
    if user_inbox and (prefix := user_inbox_prefix(settings)) is not None:
        opts["inbox_prefix"] = prefix.rstrip(".")
    opts.update(kwargs)
    try:
        nc = await nats.connect(**opts)  # type: ignore[arg-type]
    except Exception as exc:  # nats-py raises several unrelated types here
        where = "any of " + settings.shown.replace(",", ", ") if len(servers) > 1 else settings.shown
        cause = next((e for e in seen if _is_auth(e)), exc)
        raise ServerOffline(f"cannot connect to NATS at {where}: {_reason(cause, settings)}") from None
    connected = True
    # nats-py reads this option on every reconnect, so relaxing it now keeps the
    # fail-fast first connect while long-running processes ride out NATS restarts.
    nc.options["max_reconnect_attempts"] = -1 if reconnect_forever else 3
    return nc


def user_inbox_prefix(settings: NatsSettings) -> str | None:
    """``_I.<public key>.`` for a connection authenticating with an nkey seed or creds
    file, the only inboxes a user may subscribe to (userperms.permissions); else None."""
    public_key = settings.user_public_key()
    return None if public_key is None else Names.user_inbox(public_key)


def _reason(exc: Exception, settings: NatsSettings) -> str:
    text = str(exc).strip() or type(exc).__name__
    if _is_auth(exc):
        return "authorization refused (wrong or missing token or credentials)"
    if type(exc).__name__ == "NoServersError":
        return "nothing is listening there"
    line = text.splitlines()[0][:200]
    # nats-py's messages may quote a URL, and a URL may carry a secret.
    for secret in (settings.token, settings.password, *(_user_parts(settings.url))):
        if secret:
            line = line.replace(secret, "***")
    return line


def _is_auth(exc: Exception) -> bool:
    return "authorization" in str(exc).lower() or "Authorization" in type(exc).__name__


def _user_parts(url: str) -> list[str]:
    """The user parts (``user:password`` or a token) of every URL in ``url``."""
    out = []
    for part in url.split(","):
        head = part.split("://", 1)[-1]
        if "@" in head:
            userinfo = head.rsplit("@", 1)[0]
            out.extend([userinfo, *userinfo.split(":")])
    return [p for p in out if len(p) >= 3]
