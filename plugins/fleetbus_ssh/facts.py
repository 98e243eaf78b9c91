"""``info``: the server's facts, gathered by one small POSIX sh script in one exec.

The script prints sections, each after a marker line, so one missing tool (no
``hostname`` binary, no /proc on a BSD) costs one fact, never the whole answer. The
os-release file is parsed here with the same grammar the local transport and the agent
use (:func:`fleetbus_base.ops.facts.parse_os_release`), so all transports report the
same ``os_version``.
"""

from __future__ import annotations

from fleetbus.errors import TransportError
from fleetbus.transport import ExecSpec, ServerFacts, StreamName
from fleetbus_base.ops.facts import parse_os_release

_MARK = "--fleetbus-facts:"
MAX_OUTPUT = 64 * 1024

SCRIPT = "\n".join([
    f"echo '{_MARK}uname'; uname -s -r -m 2>/dev/null",
    f"echo '{_MARK}hostname'; hostname 2>/dev/null || uname -n 2>/dev/null",
    f"echo '{_MARK}os-release'; cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release 2>/dev/null",
    f"echo '{_MARK}uptime'; cat /proc/uptime 2>/dev/null",
    f"echo '{_MARK}user'; id -un 2>/dev/null",
    "exit 0",
])

FACTS_SPEC = ExecSpec(argv=None, shell=SCRIPT, timeout_s=None)


class Collector:
    """An output sink that keeps (bounded) stdout, for commands we run for ourselves."""

    def __init__(self, limit: int = MAX_OUTPUT) -> None:
        self.stdout = bytearray()
        self.limit = limit

    async def write(self, stream: StreamName, data: bytes) -> None:
        if stream == "stdout" and len(self.stdout) < self.limit:
            self.stdout += data[: self.limit - len(self.stdout)]


def _sections(text: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith(_MARK):
            current = sections.setdefault(line[len(_MARK):].strip(), [])
        elif current is not None:
            current.append(line)
    return sections


def parse_facts(output: bytes, exit_code: int | None, extra: dict[str, object]) -> ServerFacts:
    """The facts in the script's output; unknown ones stay None."""
    text = output.decode("utf-8", errors="replace")
    sections = _sections(text)
    if not sections:
        raise TransportError(f"the info script printed nothing recognizable (exit code {exit_code})")
    os_name = kernel = arch = None
    uname = (sections.get("uname") or [""])[0].split()
    if len(uname) >= 3:
        # Kernel releases hold no spaces, so: first word, last word, the rest between.
        os_name, arch, kernel = uname[0], uname[-1], " ".join(uname[1:-1])
    hostname = next((line.strip() for line in sections.get("hostname", []) if line.strip()), None)
    os_version = None
    if sections.get("os-release"):
        os_version = parse_os_release(sections["os-release"]).get("PRETTY_NAME") or None
    uptime = None
    uptime_lines = sections.get("uptime") or []
    if uptime_lines and uptime_lines[0].split():
        try:
            uptime = float(uptime_lines[0].split()[0])
        except ValueError:
            uptime = None
    user = next((line.strip() for line in sections.get("user", []) if line.strip()), None)
    facts_extra = dict(extra)
    if user:
        facts_extra["user"] = user
    return ServerFacts(hostname=hostname, os=os_name, os_version=os_version or kernel, kernel=kernel,
                       arch=arch, uptime_s=uptime, extra=facts_extra)
