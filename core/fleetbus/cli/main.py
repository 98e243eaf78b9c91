"""The ``fleetbus`` command."""

from __future__ import annotations

import os

import click

from .. import __version__, tuning
from ..connection import ENV_NKEY
from .admin_cmds import admin
from .agent_cmds import agent
from .audit_cmds import audit
from .commands import get, info, ping, put, run
from .context import Globals
from .credentials import credentials
from .extend import PluginGroup
from .jobs import jobs
from .nats_cmds import nats
from .plugins_cmd import plugins
from .servers import servers
from .stack_cmds import core, up, worker
from .users import users


@click.group(cls=PluginGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fleetbus")
@click.option("--nats", envvar="FLEETBUS_NATS_URL", metavar="URL[,URL...]",
              help="NATS servers to use, comma-separated (default: the one `fleetbus up` started). "
                   "Env: FLEETBUS_NATS_URL.")
@click.option("--nats-creds", envvar="FLEETBUS_NATS_CREDS", metavar="FILE",
              help="A NATS credentials (.creds) file. Env: FLEETBUS_NATS_CREDS.")
@click.option("--nats-nkey", envvar="FLEETBUS_NATS_NKEY", metavar="FILE",
              help="A NATS nkey seed file: connect as the user `fleetbus users add --out` made. "
                   "Env: FLEETBUS_NATS_NKEY.")
@click.option("--nats-context", envvar="FLEETBUS_NATS_CONTEXT", metavar="NAME",
              help="A `nats` CLI context (~/.config/nats/context/NAME.json): servers, token, "
                   "user, creds, nkey, TLS files. Env: FLEETBUS_NATS_CONTEXT.")
@click.option("--home", envvar="FLEETBUS_HOME", type=click.Path(file_okay=False),
              help="Data folder (default ~/.fleetbus). Env: FLEETBUS_HOME.")
@click.option("--prefix", envvar="FLEETBUS_PREFIX", help="Subject prefix (default fleetbus).")
@click.pass_context
def cli(ctx: click.Context, nats: str | None, nats_creds: str | None, nats_nkey: str | None,
        nats_context: str | None, home: str | None, prefix: str | None) -> None:
    """Register a server once, then run commands and move files on it by name."""
    if nats_nkey:
        # `up --nats ...`, `core` and `worker` resolve their NATS settings from the
        # environment (stack.py): the flag must reach them as the variable would. A path,
        # not a secret.
        os.environ[ENV_NKEY] = nats_nkey
    ctx.obj = Globals(nats=nats, home=home, prefix=prefix, nats_creds=nats_creds,
                      nats_context=nats_context, nats_nkey=nats_nkey)


# Installed transports add their own commands (e.g. `gateway`) through the fleetbus_cli hook.
for command in (up, core, worker, servers, credentials, run, put, get, info, ping, jobs, plugins,
                agent, admin, users, nats, audit):
    cli.add_command(command)


def main() -> None:
    tuning.apply(tuning.CLIENT)
    cli(prog_name="fleetbus")


if __name__ == "__main__":
    main()
