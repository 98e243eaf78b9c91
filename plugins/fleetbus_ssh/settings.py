"""The ``ssh`` transport's declarations: its settings (per worker) and server options.

The host validates the settings once at start (``Transport.load_settings``); the admin
service validates a server's options at ``servers add``. Unknown keys are refused.
"""

from __future__ import annotations

from typing import Annotated

from fleetbus.transport import ServerOptions, TransportSettings
from pydantic import Field, StrictFloat, StrictInt, model_validator

MiB = 1024 * 1024

# Numbers only (no "5" strings, no booleans): a setting is a number or a mistake.
Seconds = Annotated[StrictFloat | StrictInt, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[StrictInt, Field(ge=1)]


class SshOptions(ServerOptions):
    """Per-server options of an ``ssh`` server (``server.options``).

    - ``host_key``: the pinned host key(s): an OpenSSH public key line or a
      ``SHA256:...`` fingerprint, or a list of them (while a key is being rotated).
    - ``via``: the registered ``ssh`` server to reach this one through (a jump host).
    - ``user``: the login user when the credential names none.
    - ``max_sessions``: session channels per connection (the server's ``MaxSessions``).
    """

    host_key: str | list[str] | None = None
    via: str | None = None
    user: str | None = None
    max_sessions: Annotated[StrictInt, Field(ge=2)] | None = None


class SshSettings(TransportSettings):
    """Timings (seconds) and sizes (bytes) of the ``ssh`` transport.

    - ``connect_timeout_s``: TCP connect, SSH banner, key exchange and authentication
      of each hop, each bounded by this.
    - ``keepalive_s``: an SSH keepalive is sent after this long without traffic, so
      NAT/firewall state stays up and a dead peer is noticed (see ``connection``).
    - ``idle_timeout_s``: how long the host keeps an unused connection open.
    - ``ping_timeout_s``: a ``ping`` unanswered this long declares the connection dead.
    - ``term_grace_s``: after SIGTERM to a cancelled command's process group, how long
      before SIGKILL.
    - ``exit_grace_s``: after the remote process exits, how long to wait for the end of
      its output (only a background process it left behind can hold it open).
    - ``kill_timeout_s``: bound on the extra round trips that stop a cancelled
      command (opening the kill channel, waiting for the pgid report).
    - ``timeout_backstop_s``: the host enforces ``ExecSpec.timeout_s`` by cancelling;
      if that has not happened this long after the limit, exec stops itself.
    - ``window_size`` / ``max_packet_size``: SSH flow control for SFTP channels. A
      large window lets a transfer keep the pipe full on high-latency links; exec
      channels use ``exec_window_size`` so slow output consumers cannot make many
      running commands each buffer 16 MiB.
    - ``sftp_request_size``: upper bound on one SFTP read/write request; the server's
      own limit (``limits@openssh.com``) lowers it, else 32 KiB (the protocol minimum).
    - ``sftp_read_ahead``: bytes of reads kept in flight per ``get``.
    - ``max_sessions``: session channels per connection. OpenSSH's ``MaxSessions``
      defaults to 10; a server's ``options.max_sessions`` overrides this.
    - ``max_jump_hops``: longest chain of ``via`` jump hosts followed.
    """

    connect_timeout_s: Seconds = 10.0
    keepalive_s: Seconds = 15.0
    idle_timeout_s: Seconds = 300.0
    ping_timeout_s: Seconds = 10.0
    term_grace_s: Seconds = 2.0
    exit_grace_s: Seconds = 1.0
    kill_timeout_s: Seconds = 5.0
    timeout_backstop_s: Seconds = 5.0
    window_size: Count = 16 * MiB
    max_packet_size: Count = 32 * 1024
    exec_window_size: Count = 2 * MiB
    sftp_request_size: Count = 256 * 1024
    sftp_read_ahead: Count = 8 * MiB
    # One channel is kept for stopping cancelled commands (see session.ChannelSlots).
    max_sessions: Annotated[StrictInt, Field(ge=2)] = 10
    max_jump_hops: Count = 4

    @model_validator(mode="after")
    def _seconds_as_floats(self) -> SshSettings:
        # The timings are used as floats (``f"{s:g}"``, arithmetic); an int given is fine.
        for name in type(self).model_fields:
            if name.endswith("_s"):
                object.__setattr__(self, name, float(getattr(self, name)))
        return self
