"""What ``info`` reports about this host.

Everything here reads small local files or asks the C library, so it runs directly on
the event loop; each fact that cannot be found is reported as ``None`` rather than
failing the whole request.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
from collections.abc import Iterable
from typing import Optional, Tuple

from .specs import ServerFacts

OS_RELEASE_FILES = ("/etc/os-release", "/usr/lib/os-release")
"""Where os-release(5) says to look, in that order."""

# The grammar platform.freedesktop_os_release uses (Python 3.10+, so not available to
# the agent on 3.9); kept identical so both read the same PRETTY_NAME.
_OS_RELEASE_LINE = re.compile(
    "^(?P<name>[a-zA-Z0-9_]+)=(?P<quote>[\"']?)(?P<value>.*)(?P=quote)$"
)
_OS_RELEASE_UNESCAPE = re.compile(r"\\([\\\$\"\'`])")


def parse_os_release(lines: Iterable[str]) -> dict[str, str]:
    """The fields of an os-release file, with the defaults os-release(5) gives."""
    info = {"NAME": "Linux", "ID": "linux", "PRETTY_NAME": "Linux"}
    for line in lines:
        match = _OS_RELEASE_LINE.match(line)
        if match is not None:
            info[match.group("name")] = _OS_RELEASE_UNESCAPE.sub(r"\1", match.group("value"))
    return info


def read_os_release() -> dict[str, str]:
    """The fields of this host's os-release file; OSError when there is none."""
    for path in OS_RELEASE_FILES:
        try:
            with open(path, encoding="utf-8") as f:
                return parse_os_release(f)
        except OSError:
            continue
    raise OSError(errno.ENOENT, "no os-release file", OS_RELEASE_FILES[0])


def os_version() -> str:
    """The distribution's PRETTY_NAME from os-release, else the kernel release."""
    try:
        pretty: Optional[str] = read_os_release().get("PRETTY_NAME")
    except OSError:
        pretty = None
    return pretty or _uname()[1]


def _uname() -> Tuple[str, str, str]:
    """(system, release, machine) as ``platform`` reports them.

    ``os.uname`` gives the same three on POSIX; importing ``platform`` costs an idle
    agent about 0.14 MiB it keeps for its lifetime, for three strings it needs once.
    """
    uname = getattr(os, "uname", None)
    if uname is not None:
        u = uname()
        return u.sysname, u.release, u.machine
    import platform  # pragma: no cover - not POSIX

    return platform.system(), platform.release(), platform.machine()  # pragma: no cover


def uptime_s() -> Optional[float]:
    """Seconds since boot from /proc/uptime; None where there is no such file."""
    if _uname()[0] != "Linux":
        return None
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def effective_user() -> str:
    """The name of the user commands run as, or its numeric id when it has no name."""
    try:
        import pwd  # POSIX only, like the rest of the operations
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
    """ServerFacts about the host this process runs on.

    ``extra`` holds ``python`` (this interpreter's version) and ``user`` (who commands
    run as); callers add their own entries (e.g. the agent's version) with
    ``dataclasses.replace``.
    """
    system, release, machine = _uname()
    return ServerFacts(
        hostname=socket.gethostname(),
        os=system or None,
        os_version=os_version() or None,
        kernel=release or None,
        arch=machine or None,
        uptime_s=uptime_s(),
        extra={"python": sys.version.split()[0], "user": effective_user()},  # platform.python_version()
    )
