"""The built-in ``ssh`` transport: Linux/Unix servers over SSH, agentless (paramiko).

Server fields
-------------
- ``host``, ``port`` (default 22), ``credential``: an ``ssh-key`` or ``password``
  credential from the vault; nothing else (no agent, no ~/.ssh) is ever used.
- ``options.host_key``: the pinned host key, an OpenSSH public key line or a
  ``SHA256:...`` fingerprint (or a list of them); see :mod:`.hostkeys`. Without it the
  server is refused and the error carries the offered key for ``servers trust``.
- ``options.via``: the name of another registered ``ssh`` server to use as a jump host
  (its own credential and pinned host key apply); jump hosts may have a ``via`` too.
- ``options.user``: log in as this user instead of the credential's.
- ``options.max_sessions``: the server sshd's ``MaxSessions`` when not 10.

What the server must have: a POSIX login shell for the user (sh, dash, bash, ksh,
zsh; commands are sent as a small sh wrapper, see :mod:`.remote_exec`), an sshd that
starts sessions with ``setsid()`` (OpenSSH, Dropbear) so a command's process group can
be killed, and the SFTP subsystem with ``posix-rename@openssh.com`` for ``put``
(OpenSSH's ``sftp-server``/``internal-sftp``).

Settings and server options: see :class:`.settings.SshSettings` and :class:`.settings.SshOptions`; ``idle_timeout_s``
(300) is how long the host keeps an unused connection.

Module map: :mod:`.connection` (paramiko transport, jump hosts, keepalive),
:mod:`.hostkeys`, :mod:`.auth`, :mod:`.session`, :mod:`.remote_exec` (exec, process
group kill), :mod:`.sftp_files` (put/get), :mod:`.facts` (info), :mod:`.slots`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import fleetbus
from fleetbus.errors import InvalidRequest, NotFound
from fleetbus.records import Server
from fleetbus.transport import Capabilities, Credential, Session, Transport, TransportContext

from .settings import SshOptions, SshSettings

if TYPE_CHECKING:
    # paramiko comes with .connection and .session, imported at the first open: ~40-70
    # ms of every `fleetbus up` and worker start that a fleet without ssh servers never
    # needs (plugin.py checks at load that it is installed).
    from .connection import Hop, SshConnection


class SshTransport(Transport):
    """Runs commands and moves files on servers through their OpenSSH sshd."""

    name = "ssh"
    version = fleetbus.__version__
    description = "Linux/Unix servers over SSH (agentless, paramiko); host keys pinned, jump hosts"
    serves_registered = True
    Settings = SshSettings
    Options = SshOptions
    capabilities = Capabilities(needs_host=True, default_port=22, supports_via=True)
    settings: SshSettings

    def __init__(self, ctx: TransportContext) -> None:
        super().__init__(ctx)
        self.idle_timeout_s = self.settings.idle_timeout_s

    async def open(self, server: Server, credential: Credential | None) -> Session:
        from .connection import connect
        from .session import SshSession

        hops = await self._route(server, credential)
        max_sessions = self._max_sessions(server)
        task = asyncio.ensure_future(
            self.ctx.run_blocking(connect, hops, self.settings, self.ctx.logger, self._login_refused))
        try:
            # Shielded so a cancelled open can still close what its thread connects.
            conn = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._close_if_opened)
            raise
        return SshSession(conn, self.settings, self.ctx.run_blocking, self.ctx.logger, max_sessions)

    def _login_refused(self, reason: str) -> None:
        # Counted like the agents' failed authentications; count_auth_failure may be
        # called from the connecting thread.
        self.ctx.services.count_auth_failure(self.name, reason)

    def _close_if_opened(self, task: asyncio.Future[SshConnection]) -> None:
        # The open was cancelled while its thread was still connecting: nobody will use
        # the connection. Closing joins paramiko's thread, so not on the event loop.
        if task.cancelled() or task.exception() is not None:
            return
        closing = asyncio.ensure_future(self.ctx.run_blocking(task.result().close))
        closing.add_done_callback(lambda done: done.cancelled() or done.exception())

    def _max_sessions(self, server: Server) -> int:
        value = server.options.get("max_sessions", self.settings.max_sessions)
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise InvalidRequest(f"options.max_sessions of {server.name} must be an integer of at least 2")
        return value

    async def _route(self, server: Server, credential: Credential | None) -> list[Hop]:
        """The hops to ``server``: its jump hosts (outermost first), then itself."""
        from .connection import Hop

        hops = [Hop(server, credential)]
        seen = {server.name}
        current = server
        while True:
            via = current.options.get("via")
            if via is None or via == "":
                return hops
            if not isinstance(via, str):
                raise InvalidRequest(f"options.via of {current.name} must be a server name")
            if via in seen:
                raise InvalidRequest(f"jump hosts of {server.name} form a loop at {via}")
            if len(hops) > self.settings.max_jump_hops:
                raise InvalidRequest(
                    f"{server.name} is behind more than {self.settings.max_jump_hops} jump hosts")
            bastion = await self.ctx.lookup_server(via)
            if bastion is None:
                raise NotFound(f"jump host {via} of {current.name} is not a registered server")
            if bastion.transport != self.name:
                raise InvalidRequest(f"jump host {via} of {current.name} uses the {bastion.transport} "
                                     "transport; a jump host must be an ssh server")
            bastion_credential = None
            if bastion.credential:
                try:
                    bastion_credential = await self.ctx.credential(bastion.credential)
                except NotFound:
                    raise NotFound(f"credential {bastion.credential} of jump host {via} "
                                   "does not exist") from None
            hops.insert(0, Hop(bastion, bastion_credential, jump_for=server.name))
            seen.add(via)
            current = bastion
