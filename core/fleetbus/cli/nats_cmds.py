"""``fleetbus nats accounts``: fleetbus's accounts for a NATS fleetbus does not run.

Prints the same ``accounts`` block the embedded NATS runs with
(:func:`fleetbus.natsaccounts.account_config`), for an operator to include in their
nats-server.conf (docs/operations.md, "Users on a shared NATS"). fleetbus's own
processes are FLEETBUS users by nkey, so the block holds public keys only: the seed
``--fleetbus-nkey-out`` makes is written to its own 0600 file, never printed.
"""

from __future__ import annotations

import click

from ..errors import FleetbusError
from ..natsaccounts import account_config, nkey_user, users_include
from .context import Globals, fail, pass_globals
from .nkeyfiles import new_user_key, write_seed
from .render import emit_json

DEFAULT_USERS_FILE = "fleetbus-users.conf"


def _public_user_key(value: str) -> str:
    """``value`` if it is an nkey user public key, else a one-line error."""
    from ..users import is_user_key

    if not is_user_key(value):
        fail(f"--owner-nkey {value[:12]!r}...: not an nkey user public key (U and 55 base32 characters)")
    return value


@click.group("nats")
def nats() -> None:
    """What a NATS that fleetbus does not run needs from fleetbus."""


@nats.command("accounts")
@click.option("--fleetbus-nkey-out", type=click.Path(dir_okay=False), metavar="FILE",
              help="Make an nkey for fleetbus's own processes: its seed to this new file (0600), "
                   "its public key a FLEETBUS user.")
@click.option("--owner-nkey", "owner_nkeys", multiple=True, metavar="PUBKEY",
              help="An nkey public key (U...) that is a FLEETBUS user too: an operator's own, or "
                   "fleetbus's from an earlier run (repeatable).")
@click.option("--users-file", default=DEFAULT_USERS_FILE, show_default=True, metavar="PATH",
              help="The USERS account's users file, relative to the file that includes this block; "
                   "`fleetbus core --nats-users-file` keeps it.")
@click.option("--json", "as_json", is_flag=True, help='Print {"config": ..., "fleetbus_nkey": ..., ...}.')
@pass_globals
def accounts(g: Globals, fleetbus_nkey_out: str | None, owner_nkeys: tuple[str, ...], users_file: str,
             as_json: bool) -> None:
    """Print the accounts block (FLEETBUS, USERS) for a shared nats-server's config."""
    owners = [_public_user_key(key) for key in owner_nkeys]
    if not fleetbus_nkey_out and not owners:
        fail("give --fleetbus-nkey-out FILE (a new key for fleetbus's processes) or --owner-nkey PUBKEY: "
             "FLEETBUS needs a user")
    try:
        include = users_include(users_file)
    except FleetbusError as exc:
        fail(exc.message)
    fleetbus_key = None
    if fleetbus_nkey_out:
        seed, fleetbus_key = new_user_key()
        write_seed(fleetbus_nkey_out, seed, "--fleetbus-nkey-out")
    keys = list(dict.fromkeys(([fleetbus_key] if fleetbus_key else []) + owners))
    config = "\n".join(account_config(g.prefix or "fleetbus", include, [nkey_user(k) for k in keys])) + "\n"
    if as_json:
        emit_json({"config": config, "users_file": include,
                   "fleetbus_nkey": ({"public_key": fleetbus_key, "seed_file": fleetbus_nkey_out}
                                     if fleetbus_key else None),
                   "owner_nkeys": owners})
        return
    click.echo(config, nl=False)
    if fleetbus_key:
        click.echo(f"fleetbus's nkey seed written to {fleetbus_nkey_out} (mode 0600); "
                   f"its public key {fleetbus_key} is a FLEETBUS user", err=True)
    click.echo(f"next: create {include} beside the file that includes this block, holding `users: []`, "
               "and run `fleetbus core --nats-users-file` on it (docs/operations.md)", err=True)
