"""Mapping pywinrm / requests failures to fleetbus errors, one line each.

| what happened | fleetbus error |
| --- | --- |
| connection refused, DNS failure, host unreachable, connect timeout | ServerOffline |
| HTTP 401 (credentials refused) | AuthFailed |
| WSManFault "Access is denied" (code 5: authenticated, not allowed to use WinRM) | AuthFailed |
| TLS certificate verification failed (unknown CA, wrong host name, expired) | AuthFailed, "certificate" |
| other TLS failures (e.g. https against an http listener) | ServerOffline |
| read timeout (the server stopped answering mid-operation) | Timeout |
| WSManFault 2150859173 / 2150859236 (MaxShellsPerUser quota) | TransportError naming the quota |
| WSManFault 2150859174 (MaxConcurrentOperationsPerUser quota) | TransportError naming the quota |
| any other WSManFault | TransportError with the fault's reason and code |
| other HTTP errors | TransportError with the status |

No message ever carries the password: pywinrm and requests do not put it in their
exception texts, and the messages below are built from host, port, user and codes.
"""

from __future__ import annotations

import re
from typing import Any

import requests
from fleetbus.errors import (
    AuthFailed,
    FleetbusError,
    InvalidRequest,
    ServerOffline,
    Timeout,
    TransportError,
)
from fleetbus_base.text import one_line, shorten
from winrm.exceptions import (
    InvalidCredentialsError,
    WinRMError,
    WinRMOperationTimeoutError,
    WinRMTransportError,
    WSManFaultError,
)

#: ERROR_WSMAN_QUOTA_MAX_SHELLS: the user already has MaxShellsPerUser shells open.
FAULT_MAX_SHELLS = 2150859173
#: ERROR_WSMAN_QUOTA_MAX_SHELLS_PPQ: the same quota set on the plugin (winrs/cmd plugin).
FAULT_MAX_SHELLS_PLUGIN = 2150859236
#: ERROR_WSMAN_QUOTA_MAX_OPERATIONS: MaxConcurrentOperationsPerUser; on Windows before
#: 2012 every command run in a shell counts, so a long-lived shell meets it too.
FAULT_MAX_OPERATIONS = 2150859174
#: ERROR_WSMAN_QUOTA_MAX_COMMANDS_PER_SHELL_PPQ.
FAULT_MAX_COMMANDS_PER_SHELL = 2150859241
#: The shell does not exist (any more): deleted, idle-timed out, WinRM restarted.
FAULT_SHELL_NOT_FOUND = 2150858843
#: A Receive found no output within OperationTimeout (pywinrm raises
#: WinRMOperationTimeoutError for it; the caller just asks again).
FAULT_RECEIVE_TIMEOUT = 2150858793
#: ERROR_ACCESS_DENIED as a WSManFault code.
FAULT_ACCESS_DENIED = 5

SHELL_QUOTA_FAULTS = frozenset({FAULT_MAX_SHELLS, FAULT_MAX_SHELLS_PLUGIN})
#: Faults after which a fresh shell may succeed where a reused one failed.
RETRY_WITH_NEW_SHELL = frozenset({
    FAULT_SHELL_NOT_FOUND, FAULT_MAX_OPERATIONS, FAULT_MAX_COMMANDS_PER_SHELL,
})

_CERT_WORDS = ("certificate verify failed", "certificate_verify_failed", "hostname mismatch",
               "doesn't match", "self signed certificate", "self-signed certificate",
               "unable to get local issuer", "certificate has expired")


def fault_code(exc: BaseException) -> int | None:
    """The WSManFault code of a pywinrm fault, or None."""
    if isinstance(exc, WSManFaultError):
        return exc.wsman_fault_code
    return None


def _chain(exc: BaseException) -> str:
    parts = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        parts.append(str(cur))
        for arg in getattr(cur, "args", ()):
            if isinstance(arg, BaseException):
                parts.append(str(arg))
        cur = cur.__cause__ or cur.__context__
    return " ".join(parts)


def map_error(exc: BaseException, where: dict[str, Any]) -> FleetbusError:
    """The fleetbus error for ``exc``, raised by a pywinrm call.

    ``where`` names the endpoint: ``server``, ``endpoint`` (``host:port``), ``user``,
    ``auth``, ``scheme``.
    """
    if isinstance(exc, FleetbusError):
        return exc
    server = where.get("server", "?")
    endpoint = where.get("endpoint", "?")
    if isinstance(exc, InvalidCredentialsError):
        return AuthFailed(
            f"{server}: WinRM at {endpoint} refused the credentials of {where.get('user')!s} "
            f"({where.get('auth')} authentication, HTTP 401)")
    if isinstance(exc, WSManFaultError):
        return _map_fault(exc, server, endpoint, where)
    if isinstance(exc, WinRMOperationTimeoutError):
        return Timeout(f"{server}: WinRM at {endpoint} did not complete the operation in time")
    if isinstance(exc, WinRMTransportError):
        return TransportError(f"{server}: WinRM at {endpoint} answered HTTP {exc.code}"
                              + (f": {shorten(one_line(exc.response_text), 200)}" if exc.response_text else ""))
    if isinstance(exc, requests.exceptions.SSLError):
        text = _chain(exc).lower()
        if any(word in text for word in _CERT_WORDS):
            return AuthFailed(
                f"{server}: the TLS certificate of WinRM at {endpoint} could not be verified "
                f"({_ssl_reason(text)}); give its CA with --option ca=/path/ca.pem "
                "(or, only if you accept the risk, --option insecure_skip_verify=true)")
        return ServerOffline(
            f"{server}: TLS with WinRM at {endpoint} failed ({_ssl_reason(text)}); "
            "is the listener HTTPS? (use --option scheme=http for an HTTP listener)")
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return ServerOffline(f"{server}: WinRM at {endpoint} did not accept a connection in time")
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return Timeout(f"{server}: WinRM at {endpoint} stopped answering (read timed out)")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return ServerOffline(f"{server}: cannot reach WinRM at {endpoint}: {_conn_reason(exc)}")
    if isinstance(exc, requests.exceptions.RequestException):
        return TransportError(f"{server}: HTTP to WinRM at {endpoint} failed: {shorten(one_line(exc), 200)}")
    if isinstance(exc, WinRMError):
        return TransportError(f"{server}: WinRM client error: {shorten(one_line(exc), 200)}")
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
        return ServerOffline(f"{server}: cannot reach WinRM at {endpoint}: {shorten(one_line(exc), 200)}")
    if isinstance(exc, InvalidRequest):
        return exc
    return TransportError(f"{server}: WinRM call failed: {type(exc).__name__}: {shorten(one_line(exc), 200)}")


def _map_fault(exc: WSManFaultError, server: str, endpoint: str, where: dict[str, Any]) -> FleetbusError:
    code = exc.wsman_fault_code
    reason = shorten(one_line(exc.reason or "no reason given"), 400)
    if code in SHELL_QUOTA_FAULTS or "concurrent shells" in reason.lower():
        return TransportError(
            f"{server}: Windows refused a new WinRM shell: the user {where.get('user')!s} has "
            f"reached the MaxShellsPerUser quota (WSManFault {code}). Close other WinRM "
            "sessions of this user, lower the wmi transport's max_shells setting, or raise "
            "the quota on the server: Set-Item WSMan:\\localhost\\Shell\\MaxShellsPerUser 100 "
            f"(winrm set winrm/config/winrs @{{MaxShellsPerUser=\"100\"}}). Server said: {reason}",
            fault_code=code, quota="MaxShellsPerUser")
    if code == FAULT_MAX_OPERATIONS or "concurrent operations" in reason.lower():
        return TransportError(
            f"{server}: Windows refused the operation: the user {where.get('user')!s} has reached "
            f"the MaxConcurrentOperationsPerUser quota (WSManFault {code}). Raise it with "
            "Set-Item WSMan:\\localhost\\Service\\MaxConcurrentOperationsPerUser 1500. "
            f"Server said: {reason}",
            fault_code=code, quota="MaxConcurrentOperationsPerUser")
    if code == FAULT_ACCESS_DENIED or reason.lower().startswith("access is denied"):
        return AuthFailed(
            f"{server}: WinRM at {endpoint} accepted the login of {where.get('user')!s} but denied "
            "access (the user must be an administrator or in Remote Management Users)")
    if code is None:
        return TransportError(f"{server}: WinRM fault: {reason}")
    return TransportError(f"{server}: WinRM fault: {reason} (WSManFault {code})", fault_code=code)


def _ssl_reason(text: str) -> str:
    match = re.search(r"certificate verify failed: ([^(')\]]+)", text)
    if match:
        return "certificate verify failed: " + match.group(1).strip()
    for word in _CERT_WORDS:
        if word in text:
            return word
    match = re.search(r"\[ssl: ([a-z_]+)\]|ssl: ([a-z_]+)", text)
    if match:
        return (match.group(1) or match.group(2)).lower()
    return "TLS error"


def _conn_reason(exc: BaseException) -> str:
    text = _chain(exc)
    for needle, shown in (("Connection refused", "connection refused"),
                          ("Name or service not known", "unknown host name"),
                          ("nodename nor servname", "unknown host name"),
                          ("Temporary failure in name resolution", "unknown host name"),
                          ("No route to host", "no route to host"),
                          ("Network is unreachable", "network unreachable"),
                          ("Connection reset", "connection reset"),
                          ("RemoteDisconnected", "the server closed the connection"),
                          ("timed out", "timed out")):
        if needle in text:
            return shown
    return type(exc).__name__
