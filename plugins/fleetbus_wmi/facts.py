"""``info`` for Windows: WMI classes read with Get-CimInstance, returned as one JSON line.

Win32_OperatingSystem gives Caption ("Microsoft Windows Server 2022 Standard"), Version
("10.0.20348"), BuildNumber, OSArchitecture ("64-bit") and LastBootUpTime;
Win32_ComputerSystem gives Name and Domain. The uptime is computed on the server
(its clock minus its boot time), so clock skew between fleetbus and the server does not
matter. ``arch`` is ``PROCESSOR_ARCHITECTURE`` (``AMD64``, ``ARM64``, ``x86``): the
value Python's ``platform.machine()`` gives on Windows, so it matches what a fleetbus
agent on the same machine reports. Needs PowerShell 3.0 or later (Server 2012+).
"""

from __future__ import annotations

import json
from typing import Any

from fleetbus.errors import TransportError
from fleetbus.transport import ServerFacts
from fleetbus_base.text import one_line, shorten

INFO_SCRIPT = r"""# fleetbus-wmi info v1
# params
# end params
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$os = Get-CimInstance -ClassName Win32_OperatingSystem
$cs = Get-CimInstance -ClassName Win32_ComputerSystem
$now = Get-Date
$facts = @{
    Name = $cs.Name
    Domain = $cs.Domain
    Caption = $os.Caption
    Version = $os.Version
    BuildNumber = $os.BuildNumber
    OSArchitecture = $os.OSArchitecture
    ProcessorArchitecture = $env:PROCESSOR_ARCHITECTURE
    LastBootUpTime = $os.LastBootUpTime.ToUniversalTime().ToString('o')
    UptimeSeconds = [Math]::Round(($now - $os.LastBootUpTime).TotalSeconds, 3)
    PSVersion = $PSVersionTable.PSVersion.ToString()
}
[Console]::Out.WriteLine(($facts | ConvertTo-Json -Compress))
"""


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def parse_facts(stdout: bytes | str, user: str | None = None,
                wsman: dict[str, str] | None = None, transport_version: str | None = None) -> ServerFacts:
    """ServerFacts from the JSON line :data:`INFO_SCRIPT` prints."""
    text = stdout.decode("utf-8", "replace") if isinstance(stdout, bytes) else stdout
    data: dict[str, Any] | None = None
    for line in reversed(text.lstrip("\ufeff").splitlines()):
        line = line.strip().lstrip("\ufeff")
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                data = value
                break
    if data is None:
        raise TransportError(f"info: the PowerShell facts script printed no JSON: {shorten(one_line(text), 200)!r}")
    uptime: float | None
    try:
        uptime = float(data["UptimeSeconds"]) if data.get("UptimeSeconds") is not None else None
    except (TypeError, ValueError):
        uptime = None
    extra: dict[str, Any] = {}
    for key, name in (("Domain", "domain"), ("BuildNumber", "build"),
                      ("OSArchitecture", "os_architecture"), ("LastBootUpTime", "last_boot_time"),
                      ("PSVersion", "powershell")):
        value = _text(data.get(key))
        if value is not None:
            extra[name] = value
    if user:
        extra["user"] = user
    if wsman:
        if wsman.get("ProductVersion"):
            extra["wsman_product_version"] = wsman["ProductVersion"]
        if wsman.get("ProductVendor"):
            extra["wsman_vendor"] = wsman["ProductVendor"]
    if transport_version:
        extra["transport_version"] = transport_version
    version = _text(data.get("Version"))
    return ServerFacts(
        hostname=_text(data.get("Name")),
        os="Windows",
        os_version=_text(data.get("Caption")),
        kernel=version,
        arch=_text(data.get("ProcessorArchitecture")) or _text(data.get("OSArchitecture")),
        uptime_s=uptime,
        extra=extra,
    )
