"""The ``local`` transport's addition to the ``fleetbus`` command: ``up``/``worker
--local-user NAME``, the ``user`` setting."""

from __future__ import annotations

from fleetbus.cli.extend import CliRegistry

LOCAL_USER_HELP = ("Run local commands and file operations as this user (name or uid). Default: "
                   "fleetbus's own user; as root, fleetbus-local if it exists, else nobody. "
                   "'root' keeps them root. Same as --transport-setting local.user=NAME.")


def add_cli(cli: CliRegistry) -> None:
    """Register the flag with the CLI (the plugin's ``fleetbus_cli`` hook)."""
    for command in ("up", "worker"):
        cli.add_setting_flag(command, "local", "user", "--local-user", metavar="NAME", help=LOCAL_USER_HELP)
