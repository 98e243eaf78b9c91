"""The ``wmi`` transport's additions to the ``fleetbus`` command: the ``servers add``
flags ``--scheme``, ``--auth``, ``--ca`` and ``--insecure-skip-verify`` (server options
of the same names; see :class:`fleetbus_wmi.transport.WmiOptions`)."""

from __future__ import annotations

from pathlib import Path

import click
from fleetbus.cli.context import fail
from fleetbus.cli.extend import CliRegistry, ServerDraft

NAME = "wmi"


def add_cli(cli: CliRegistry) -> None:
    """Register the flags with the CLI (the plugin's ``fleetbus_cli`` hook)."""
    cli.add_server_flag(NAME, "--scheme", option="scheme", type=click.Choice(["https", "http"]),
                        help="wmi: WinRM over https (default) or http.")
    cli.add_server_flag(NAME, "--auth", option="auth", type=click.Choice(["ntlm", "kerberos", "basic", "credssp"]),
                        help="wmi: WinRM authentication (default ntlm).")
    cli.add_server_flag(NAME, "--ca", "ca_file", type=click.Path(exists=True, dir_okay=False),
                        help="wmi: CA bundle to verify the server's certificate.")
    cli.add_server_flag(NAME, "--insecure-skip-verify", option="insecure_skip_verify", is_flag=True,
                        help="wmi: do not verify the certificate (not advised).")
    cli.on_server_add(NAME, _prepare)


def _prepare(draft: ServerDraft) -> None:
    if not draft.host:
        fail("a wmi server needs --host")
    ca_file = draft.flags.get("ca_file")
    if ca_file and draft.flags.get("insecure_skip_verify"):
        fail("give --ca or --insecure-skip-verify, not both")
    if ca_file:
        # The workers read it: an absolute path, as this machine resolves it.
        draft.options["ca"] = str(Path(ca_file).resolve())
