"""The ``agent-inbound`` transport's additions to ``fleetbus servers add``.

``--fingerprint sha256:...`` pins the listening agent's certificate, or
``--trust-on-first-use`` pins the first one seen. The server's secret key comes from
``--key-file``, else from standard input when a key is piped in; with neither, fleetbus
issues one (as it does for ``agent-outbound``): it is stored sealed as the credential
``agent-NAME`` and printed once, with the ``fleetbus-agent listen`` command to run on
the server. The key never appears in argv, a log or an error.
"""

from __future__ import annotations

import secrets
import sys

import click
from fleetbus.cli.context import MAX_SECRET_FILE, fail, read_secret_file
from fleetbus.cli.extend import CliRegistry, ServerDraft, Undo
from fleetbus.client import Client

NAME = "agent-inbound"
DEFAULT_PORT = 7444
KEY_PATH = "/etc/fleetbus-agent/key"


def add_cli(cli: CliRegistry) -> None:
    """Register the flags with the CLI (the plugin's ``fleetbus_cli`` hook)."""
    cli.add_server_flag(NAME, "--fingerprint", option="fingerprint",
                        help="agent-inbound: the agent's certificate fingerprint (sha256:...).")
    cli.add_server_flag(NAME, "--trust-on-first-use", is_flag=True,
                        help="agent-inbound: pin the certificate seen first.")
    cli.add_server_flag(NAME, "--key-file", type=click.Path(dir_okay=False),
                        help="agent-inbound: file holding the server's key (else a key piped on "
                             "standard input, else fleetbus issues one and prints it).")
    cli.on_server_add(NAME, _prepare)


def _piped_key() -> bytes:
    """A key piped on standard input, or b"" (a terminal, or nothing piped)."""
    if sys.stdin is None or sys.stdin.isatty():
        return b""
    data = sys.stdin.buffer.read(MAX_SECRET_FILE + 1)
    if len(data) > MAX_SECRET_FILE:
        fail("standard input holds more than 64 KiB; that is not a secret")
    return data.strip()


def _prepare(draft: ServerDraft) -> None:
    if not draft.host:
        fail(f"an agent-inbound server needs --host (and --port unless it is {DEFAULT_PORT})")
    pinned = bool(draft.flags.get("fingerprint")) or bool(draft.flags.get("trust_on_first_use"))
    draft.options["trust_on_first_use"] = bool(draft.flags.get("trust_on_first_use"))
    if draft.credential is not None:
        if not pinned:
            fail("pin the agent's certificate with --fingerprint sha256:... "
                 "(printed by `fleetbus-agent listen`), or pass --trust-on-first-use")
        return
    key_file = draft.flags.get("key_file")
    key = read_secret_file(key_file).strip() if key_file else _piped_key()
    issued = not key
    if issued:
        key = secrets.token_urlsafe(32).encode()
    elif not pinned:
        fail("pin the agent's certificate with --fingerprint sha256:... "
             "(printed by `fleetbus-agent listen`), or pass --trust-on-first-use")
    credential = f"agent-{draft.name}"
    draft.credential = credential

    async def store(c: Client) -> Undo:
        # The key goes into the vault (sealed); the server refers to it by name.
        await c.add_credential(credential, "token", key, description=f"agent key of {draft.name}",
                               replace=draft.replace)

        async def undo(c: Client) -> None:
            await c.remove_credential(credential, force=True)

        return undo

    draft.before.append(store)
    if issued:
        draft.after.append(lambda reply: _show_key(draft, key.decode(), pinned))
        draft.json_extra["key"] = key.decode()


def _show_key(draft: ServerDraft, key: str, pinned: bool) -> None:
    """Print an issued key once, with the command that starts the agent with it."""
    port = draft.port or DEFAULT_PORT
    click.echo("")
    click.echo(f"secret key for {draft.name} (shown only now; fleetbus keeps it sealed as the "
               f"credential {draft.credential}):")
    click.echo(f"  {key}")
    click.echo("")
    click.echo(f"on {draft.name}, save it readable only by the agent's user, then start the agent:")
    click.echo("  install -d -m 700 /etc/fleetbus-agent && "
               f"(umask 077; cat > {KEY_PATH})   # paste the key, then Ctrl-D")
    click.echo(f"  fleetbus-agent listen --port {port} --key-file {KEY_PATH}")
    if not pinned:
        click.echo("")
        click.echo("then pin the certificate fingerprint the agent prints:")
        click.echo(f"  fleetbus servers add {draft.name} --transport {NAME} --host {draft.host} --port {port} "
                   f"--credential {draft.credential} --fingerprint sha256:... --replace")


