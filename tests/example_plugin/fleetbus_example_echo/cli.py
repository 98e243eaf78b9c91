"""The echo transport's additions to the ``fleetbus`` command (the ``fleetbus_cli`` hook).

- ``fleetbus servers add NAME --transport echo --exit-code N`` stores ``options.exit_code``;
- ``fleetbus up --echo-os NAME`` (and ``worker``) sets the ``os_name`` setting.
"""

from __future__ import annotations

from typing import Any

import click


def add_cli(cli: Any) -> None:
    """``cli`` is a :class:`fleetbus.cli.extend.CliRegistry`."""
    cli.add_server_flag("echo", "--exit-code", option="exit_code", type=click.IntRange(0, 255),
                        help="echo: the exit code of this server's echoing programs.")
    for command in ("up", "worker"):
        cli.add_setting_flag(command, "echo", "os_name", "--echo-os", metavar="NAME",
                             help="echo: what `info` reports as the OS of echo servers.")
