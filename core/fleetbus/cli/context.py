"""What every CLI command shares: global options, a connected client, error exits.

Errors leave as one line on stderr and a non-zero exit; a traceback only with
``FLEETBUS_DEBUG=1``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from ..client import Client
from ..connection import NatsSettings
from ..errors import FleetbusError, Forbidden
from ..home import Home
from .render import shown

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


@dataclass
class Globals:
    nats: str | None
    home: str | None
    prefix: str | None
    nats_creds: str | None = None
    nats_context: str | None = None
    #: ``--nats-nkey``: an nkey seed file, a user's (``fleetbus users add --out``).
    nats_nkey: str | None = None

    def home_dir(self) -> Home:
        return Home.resolve(self.home)

    def settings(self) -> NatsSettings:
        return NatsSettings.resolve(url=self.nats, home=self.home_dir(), prefix=self.prefix,
                                    creds_file=self.nats_creds, context=self.nats_context,
                                    nkey_file=self.nats_nkey)


pass_globals = click.make_pass_decorator(Globals)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    # Error messages may quote a server or an agent: escaped like every rendered value.
    click.echo(f"fleetbus: error: {shown(message)}", err=True)
    sys.exit(code)


ENV_LOOP = "FLEETBUS_LOOP"


def choose_event_loop() -> str:
    """asyncio, unless FLEETBUS_LOOP=uvloop (the ``fast`` extra installs uvloop).

    uvloop stays opt-in: measured both ways, it makes fleetbus's commands no faster
    (figures in docs/performance.md, "History of measured changes").
    """
    wanted = os.environ.get(ENV_LOOP, "asyncio").strip().lower()
    if wanted not in ("uvloop", "asyncio"):
        fail(f"{ENV_LOOP} must be asyncio or uvloop, not {wanted!r}")
    if wanted == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        fail("FLEETBUS_LOOP=uvloop but uvloop is not installed: pip install 'fleetbus[fast]'")
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def run_async(
    coro_fn: Callable[[], Awaitable[T]],
    error_exit: int = EXIT_ERROR,
    exits: dict[type[FleetbusError], int] | None = None,
) -> T:
    """Run a coroutine, turning every failure into one line and an exit code."""
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except FleetbusError as exc:
        code = next((v for k, v in (exits or {}).items() if isinstance(exc, k)), error_exit)
        # A refusal says so first: the rest of the line says by whom and why.
        fail(f"forbidden: {exc.message}" if isinstance(exc, Forbidden) else exc.message, code)
    except KeyboardInterrupt:
        click.echo("fleetbus: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except (click.exceptions.Exit, click.exceptions.Abort, SystemExit):
        raise
    except Exception as exc:
        if os.environ.get("FLEETBUS_DEBUG"):
            raise
        first = (str(exc).splitlines() or [""])[0][:300]
        fail(f"unexpected {type(exc).__name__}: {first} (FLEETBUS_DEBUG=1 shows a traceback)")


async def with_client(g: Globals, fn: Callable[[Client], Awaitable[T]]) -> T:
    client = await Client.connect(g.settings())
    try:
        return await fn(client)
    finally:
        await client.close()


def client_call(g: Globals, fn: Callable[[Client], Awaitable[T]], error_exit: int = EXIT_ERROR) -> T:
    return run_async(lambda: with_client(g, fn), error_exit)


def parse_duration(value: str | None, option: str = "--deadline") -> float | None:
    """``90``, ``90s``, ``5m`` or ``2h`` as seconds."""
    if value is None:
        return None
    text = value.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    try:
        seconds = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a duration like 90, 90s, 5m or 2h",
                                 param_hint=option) from None
    if seconds <= 0:
        raise click.BadParameter("must be more than 0", param_hint=option)
    return seconds


def parse_pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
        out[key] = value
    return out


def parse_options(values: tuple[str, ...]) -> dict[str, Any]:
    """``--option k=v``: values that look like JSON (numbers, true, lists) are parsed."""
    import json

    out: dict[str, Any] = {}
    for key, raw in parse_pairs(values, "--option").items():
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


MAX_SECRET_FILE = 64 * 1024


def read_secret_file(path: str) -> bytes:
    p = Path(path).expanduser()
    try:
        if p.stat().st_size > MAX_SECRET_FILE:
            fail(f"{p} is larger than 64 KiB; that is not a secret")
        return p.read_bytes()
    except OSError as exc:
        fail(f"cannot read {p}: {exc.strerror}")


def prompt_secret(label: str, confirm: bool) -> bytes:
    value = click.prompt(label, hide_input=True, confirmation_prompt=confirm, default="",
                         show_default=False, err=True)
    return value.encode()


def read_secret(path: str | None, label: str, strip: bool = True) -> bytes:
    """A secret from ``path``, else standard input when it is not a terminal, else a prompt.

    Never from argv: other users can read a command line in the process list.
    """
    if path:
        secret = read_secret_file(path)
    elif not sys.stdin.isatty():
        secret = sys.stdin.buffer.read(MAX_SECRET_FILE + 1)
        if len(secret) > MAX_SECRET_FILE:
            fail("standard input holds more than 64 KiB; that is not a secret")
    else:
        secret = prompt_secret(label, confirm=True)
    if strip:  # a trailing newline from echo or an editor is not part of a password
        secret = secret.rstrip(b"\r\n")
    if not secret:
        fail("the secret is empty")
    return secret
