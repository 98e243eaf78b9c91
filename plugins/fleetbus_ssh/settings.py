"""The ``ssh`` transport's settings (``ctx.settings``), validated once at start-up.

Every key is optional; unknown keys are ignored so a newer configuration does not stop
an older worker. A bad value raises ``ValueError`` naming the key, which the transport
turns into a start-up error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

MiB = 1024 * 1024


@dataclass(frozen=True)
class SshSettings:
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

    connect_timeout_s: float = 10.0
    keepalive_s: float = 15.0
    idle_timeout_s: float = 300.0
    ping_timeout_s: float = 10.0
    term_grace_s: float = 2.0
    exit_grace_s: float = 1.0
    kill_timeout_s: float = 5.0
    timeout_backstop_s: float = 5.0
    window_size: int = 16 * MiB
    max_packet_size: int = 32 * 1024
    exec_window_size: int = 2 * MiB
    sftp_request_size: int = 256 * 1024
    sftp_read_ahead: int = 8 * MiB
    max_sessions: int = 10
    max_jump_hops: int = 4

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None) -> SshSettings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if not settings or f.name not in settings:
                continue
            value = settings[f.name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                # ValueError, not TypeError: callers report every ValueError as a bad setting.
                raise ValueError(f"ssh setting {f.name!r} must be a number, not {value!r}")  # noqa: TRY004
            if f.type == "int" or f.type is int:
                if int(value) != value or value < 1:
                    raise ValueError(f"ssh setting {f.name!r} must be a positive integer, not {value!r}")
                values[f.name] = int(value)
            else:
                if not math.isfinite(value) or value < 0:
                    raise ValueError(
                        f"ssh setting {f.name!r} must be a non-negative number of seconds, not {value!r}")
                values[f.name] = float(value)
        made = cls(**values)
        if made.max_sessions < 2:
            # One channel is kept for stopping cancelled commands (see session.ChannelSlots).
            raise ValueError("ssh setting 'max_sessions' must be at least 2")
        return made
