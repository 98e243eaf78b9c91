"""``fleetbus credentials ...``: the vault. Secrets never come from argv and are never printed."""

from __future__ import annotations

import sys

import click

from .context import (
    MAX_SECRET_FILE,
    Globals,
    client_call,
    pass_globals,
    prompt_secret,
    read_secret,
    read_secret_file,
)
from .render import emit_json, table


@click.group("credentials")
def credentials() -> None:
    """Add, list and remove credentials (stored encrypted; never shown again)."""


@credentials.command("add")
@click.argument("name")
@click.option("--type", "ctype", type=click.Choice(["password", "ssh-key", "token", "windows"]), required=True)
@click.option("--user", help="The user name the credential logs in as.")
@click.option("--secret-file", type=click.Path(dir_okay=False), help="Read the secret from this file.")
@click.option("--private-key-file", type=click.Path(dir_okay=False), help="ssh-key: the private key file.")
@click.option("--passphrase-file", type=click.Path(dir_okay=False), help="ssh-key: the key's passphrase.")
@click.option("--description", help="Free text.")
@click.option("--replace", is_flag=True, help="Overwrite an existing credential.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored record (no secret) as JSON.")
@pass_globals
def add(g: Globals, name: str, ctype: str, user: str | None, secret_file: str | None,
        private_key_file: str | None, passphrase_file: str | None, description: str | None,
        replace: bool, as_json: bool) -> None:
    """Add the credential NAME.

    The secret comes from --secret-file / --private-key-file, else from standard input
    when it is not a terminal, else from a prompt. It is never taken from the command
    line, where other users could read it in the process list.
    """
    source = private_key_file or secret_file
    passphrase: bytes | None = None
    secret = read_secret(source, "Secret", strip=ctype != "ssh-key")
    if ctype == "ssh-key":
        if passphrase_file:
            passphrase = read_secret_file(passphrase_file).rstrip(b"\r\n")
        elif source and not sys.stdin.isatty():
            passphrase = sys.stdin.buffer.read(MAX_SECRET_FILE).rstrip(b"\r\n") or None
        elif source:
            passphrase = prompt_secret("Key passphrase (empty for none)", confirm=False) or None

    stored = client_call(g, lambda c: c.add_credential(
        name, ctype, secret, user=user, passphrase=passphrase, description=description,
        replace=replace))
    if as_json:
        emit_json(stored)
    else:
        click.echo(f"stored credential {name} ({ctype})")


@credentials.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_globals
def list_(g: Globals, as_json: bool) -> None:
    """List credentials: names, types and users, never secrets."""
    found = client_call(g, lambda c: c.list_credentials())
    if as_json:
        emit_json(found)
        return
    if not found:
        click.echo("no credentials stored")
        return
    table(["name", "type", "user", "created", "description"],
          [[c["name"], c["type"], c.get("user"), c.get("created"), c.get("description")] for c in found])


@credentials.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove even if servers still use it.")
@pass_globals
def remove(g: Globals, name: str, force: bool) -> None:
    """Remove the credential NAME."""
    client_call(g, lambda c: c.remove_credential(name, force=force))
    click.echo(f"removed credential {name}")
