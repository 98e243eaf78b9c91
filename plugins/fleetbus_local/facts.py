"""What ``info`` reports about this host.

Everything here reads small local files or asks the C library, so it runs directly on
the event loop; each fact that cannot be found is reported as ``None`` rather than
failing the whole request.
"""

from __future__ import annotations

import os
import platform
import socket

from fleetbus.transport import ServerFacts


def os_version() -> str:
    """The distribution's PRETTY_NAME from os-release, else the kernel release."""
    try:
        # Reads /etc/os-release, then /usr/lib/os-release, as os-release(5) prescribes.
        pretty = platform.freedesktop_os_release().get("PRETTY_NAME")
    except OSError:
        pretty = None
    return pretty or platform.release()


def uptime_s() -> float | None:
    """Seconds since boot from /proc/uptime; None where there is no such file."""
    if platform.system() != "Linux":
        return None
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def effective_user() -> str:
    """The name of the user commands run as, or its numeric id when it has no name."""
    try:
        import pwd  # POSIX only, like the rest of this transport
    except ImportError:  # pragma: no cover - not POSIX
        import getpass

        return getpass.getuser()
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        # Containers often run under a uid that has no passwd entry.
        return str(uid)


def server_facts() -> ServerFacts:
    """Facts about the host this process runs on."""
    return ServerFacts(
        hostname=socket.gethostname(),
        os=platform.system() or None,
        os_version=os_version() or None,
        kernel=platform.release() or None,
        arch=platform.machine() or None,
        uptime_s=uptime_s(),
        extra={"python": platform.python_version(), "user": effective_user()},
    )
