"""put and get through PowerShell: base64 over WinRS, since WS-Management has no file channel.

The scripts are produced by small pure functions (:func:`put_script`, :func:`get_script`,
:func:`remove_script`) so their text is unit tested; each starts with a
``# fleetbus-wmi <kind> v1`` line and a ``# params`` ... ``# end params`` block of
``$Name = value`` lines (PowerShell single-quoted strings, ``$true``/``$false``,
integers) followed by a fixed body. The test WS-Management server recognises exactly
these scripts and emulates them (in Python, on its own disk): the PowerShell bodies
themselves are not executed by the test suite.

put: one command, data on stdin
    One ``powershell.exe -EncodedCommand`` per file. The script creates a temporary file
    ``.fleetbus-<random>.tmp`` beside the target, and its ``process`` block appends every
    stdin line, base64-decoded; the file travels as base64 lines in WinRS ``Send``
    messages (stdin), one line of ``put_chunk_bytes`` bytes per Send. At the end the
    script checks the byte count, reports the SHA-256 (compared with what was sent), and
    renames the temporary file over the target with ``Move-Item -Force``.

    Why not one command per chunk: a chunk in a command line is base64 of UTF-16 of
    base64, 3.6 characters per byte, and a command line is at most 8191 characters
    through cmd (32767 without): a 2-9 KB chunk and a PowerShell start (~0.3-1 s on
    Windows) per chunk. A Send is limited only by the server's ``MaxEnvelopeSizekb``
    (500 KB by default since Windows Server 2012, 150 KB before): a chunk of N bytes is
    a line of 4N/3 characters, base64-encoded again in the Send, so 16N/9 bytes plus about
    1.5 KB of envelope. The default ``put_chunk_bytes`` of 192 KiB makes a 343 KiB
    envelope, with room to spare under 500 KB; on a server with the old 150 KB limit set
    it to 64 KiB (or raise the limit: ``Set-Item WSMan:\\localhost\\MaxEnvelopeSizekb 500``).

    Measured against the test server (loopback HTTPS, Basic; client and server in one
    Python process, so CPU-bound; 16 MiB file, median of 3): 32 KiB chunks 7.4 MB/s,
    64 KiB 10.8, 128 KiB 14.5, 192 KiB 16.6, 256 KiB 15.1 (noisy: 14-23). Throughput
    stops growing at about 192 KiB, hence the default. Each Send is one round trip, so on
    a real network put moves at most ``put_chunk_bytes`` per round trip (192 KiB at
    10 ms RTT: under 20 MB/s).

    "Atomic" on Windows: readers never see a partly written file (the data goes to the
    temporary file, which is renamed in the same directory, so on the same volume). With
    Windows PowerShell 5.1 ``Move-Item -Force`` onto an existing file deletes the target
    and then renames, so for a moment the path does not exist; PowerShell 7 renames with
    MoveFileEx(REPLACE_EXISTING). The rename fails if the target is open without
    FILE_SHARE_DELETE (a running .exe, a locked log): the error says so and the target is
    left as it was. The new file gets the ACL its directory gives new files, not the
    replaced file's explicit ACL; ``mode`` is ignored (there are no POSIX modes).

get: one command, data on stdout
    The script opens the file (sharing read/write/delete), prints a JSON header line
    (``{"ok": true, "size": N}`` or an error), seeks to ``offset``, then prints
    ``get_chunk_bytes`` at a time as base64 lines, then ``.``. The bytes arrive through
    the Receive loop; pywinrm asks for responses of at most 150 KiB (its fixed
    ``MaxEnvelopeSize`` of 153600), so each Receive carries about 80 KiB of file and
    ``get_chunk_bytes`` hardly matters (measured: 11 MB/s against the test server for any
    line size from 48 to 384 KiB). Exactly ``size`` bytes are read even if the file grows
    meanwhile.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ntpath
import re
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fleetbus.errors import FleetbusError, InvalidRequest, TransportError, error_for_code
from fleetbus.transport import FileStat, PutSpec, RemoteFile
from fleetbus_base.text import one_line, shorten

from .commands import powershell_line, ps_quote

if TYPE_CHECKING:  # annotations only: shell imports pywinrm, which loads at first session
    from .shell import Connection, RunningCommand

TEMP_PREFIX = ".fleetbus-"
DEFAULT_PUT_CHUNK = 192 * 1024
DEFAULT_GET_CHUNK = 192 * 1024
MAX_PUT_CHUNK = 270 * 1024  # 16N/9 + envelope stays under 500 KB

_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\[^\\/]+[\\/][^\\/]+)")


def check_windows_path(path: object) -> str:
    """Refuse empty and relative paths and control characters (never valid in Windows names).

    Accepts ``C:\\...`` and ``\\\\host\\share\\...``.
    """
    if not isinstance(path, str) or not path:
        raise InvalidRequest("path must not be empty")
    if any(ord(ch) < 32 for ch in path):
        raise InvalidRequest(f"path contains a control character, which Windows file names cannot: {path!r}")
    if not _ABSOLUTE.match(path):
        raise InvalidRequest(
            f"path must be an absolute Windows path like C:\\dir\\file: {shorten(one_line(path), 200)}")
    return path


def temp_path(path: str) -> str:
    """The temporary file beside ``path`` that put writes first."""
    return ntpath.join(ntpath.dirname(path), f"{TEMP_PREFIX}{uuid.uuid4().hex[:16]}.tmp")


def _ps_value(value: object) -> str:
    if isinstance(value, bool):
        return "$true" if value else "$false"
    if isinstance(value, int):
        return str(value)
    return ps_quote(str(value))


def _params(kind: str, params: dict[str, object], indent: str = "") -> str:
    lines = [f"{indent}# params"]
    lines += [f"{indent}${name} = {_ps_value(value)}" for name, value in params.items()]
    lines.append(f"{indent}# end params")
    return "\n".join(lines)


def parse_params(script: str) -> tuple[str, dict[str, object]]:
    """The kind and parameters of a script made here (the inverse of the builders).

    Used by the tests and by the test server to recognise the scripts it emulates.
    """
    first = script.lstrip().splitlines()[0] if script.strip() else ""
    for line in script.splitlines():
        match = re.match(r"^# fleetbus-wmi (\w+) v1$", line.strip())
        if match:
            kind = match.group(1)
            break
    else:
        raise ValueError(f"not a fleetbus-wmi script: {first[:60]!r}")
    params: dict[str, object] = {}
    inside = False
    for raw in script.splitlines():
        line = raw.strip()
        if line == "# params":
            inside = True
            continue
        if line == "# end params":
            break
        if not inside:
            continue
        match = re.match(r"^\$(\w+) = (.*)$", line)
        if not match:
            raise ValueError(f"bad parameter line {line!r}")
        name, text = match.groups()
        if text in ("$true", "$false"):
            params[name] = text == "$true"
        elif re.fullmatch(r"-?\d+", text):
            params[name] = int(text)
        elif len(text) >= 2 and text[0] == "'" and text[-1] == "'":
            params[name] = re.sub("(['\u2018\u2019\u201a\u201b])\\1", r"\1", text[1:-1])
        else:
            raise ValueError(f"bad parameter value {text!r}")
    return kind, params


PUT_BODY = r"""
    $ErrorActionPreference = 'Stop'
    $ProgressPreference = 'SilentlyContinue'
    $fs = $null
    function Send-Result($result) { [Console]::Out.WriteLine(($result | ConvertTo-Json -Compress)) }
    function Stop-Put($code, $message) {
        if ($null -ne $fs) { $fs.Dispose() }
        if ([IO.File]::Exists($Temp)) { [IO.File]::Delete($Temp) }
        Send-Result @{ ok = $false; code = $code; message = $message }
        exit 1
    }
    try {
        if ([IO.Directory]::Exists($Path)) { Stop-Put 'invalid_request' "is a directory: $Path" }
        $dir = [IO.Path]::GetDirectoryName($Path)
        if (-not [IO.Directory]::Exists($dir)) {
            if (-not $MakeParents) { Stop-Put 'not_found' "no such directory: $dir" }
            [void][IO.Directory]::CreateDirectory($dir)
        }
        $fs = New-Object IO.FileStream($Temp, [IO.FileMode]::CreateNew, [IO.FileAccess]::Write, [IO.FileShare]::None)
        $sha = [Security.Cryptography.SHA256]::Create()
        $written = [long]0
    } catch { Stop-Put 'transport_error' $_.Exception.Message }
}
process {
    try {
        $line = [string]$_
        if ($line.Length -gt 0) {
            $bytes = [Convert]::FromBase64String($line)
            $fs.Write($bytes, 0, $bytes.Length)
            [void]$sha.TransformBlock($bytes, 0, $bytes.Length, $bytes, 0)
            $written += $bytes.Length
        }
    } catch { Stop-Put 'transport_error' $_.Exception.Message }
}
end {
    try {
        $fs.Flush($true)
        $fs.Dispose()
        $fs = $null
        [void]$sha.TransformFinalBlock((New-Object byte[] 0), 0, 0)
        $hash = ([BitConverter]::ToString($sha.Hash) -replace '-', '').ToLowerInvariant()
        if ($Size -ge 0 -and $written -ne $Size) {
            Stop-Put 'transport_error' "size mismatch: expected $Size bytes, received $written"
        }
        Move-Item -LiteralPath $Temp -Destination $Path -Force
        Send-Result @{ ok = $true; size = $written; sha256 = $hash }
    } catch { Stop-Put 'transport_error' $_.Exception.Message }
}
"""


def put_script(path: str, temp: str, make_parents: bool, size: int | None) -> str:
    """The PowerShell that writes stdin's base64 lines to ``temp``, then moves it to ``path``."""
    params = {"Path": path, "Temp": temp, "MakeParents": bool(make_parents),
              "Size": -1 if size is None else int(size)}
    return "# fleetbus-wmi put v1\nbegin {\n" + _params("put", params, "    ") + PUT_BODY


GET_BODY = r"""
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
function Send-Line($text) { [Console]::Out.WriteLine($text) }
function Send-Result($result) { Send-Line ($result | ConvertTo-Json -Compress) }
try {
    if ([IO.Directory]::Exists($Path)) { Send-Result @{ ok = $false; code = 'invalid_request'; message = "is a directory: $Path" }; exit 1 }
    if (-not [IO.File]::Exists($Path)) { Send-Result @{ ok = $false; code = 'not_found'; message = "no such file: $Path" }; exit 1 }
    $fs = New-Object IO.FileStream($Path, [IO.FileMode]::Open, [IO.FileAccess]::Read, [IO.FileShare]'ReadWrite, Delete')
} catch { Send-Result @{ ok = $false; code = 'transport_error'; message = $_.Exception.Message }; exit 1 }
try {
    $size = $fs.Length
    Send-Result @{ ok = $true; size = $size }
    [void]$fs.Seek($Offset, [IO.SeekOrigin]::Begin)
    $remaining = $size - $Offset
    $buffer = New-Object byte[] $Chunk
    while ($remaining -gt 0) {
        $n = $fs.Read($buffer, 0, [int][Math]::Min([long]$Chunk, $remaining))
        if ($n -le 0) { break }
        Send-Line ([Convert]::ToBase64String($buffer, 0, $n))
        $remaining -= $n
    }
    Send-Line '.'
} catch { [Console]::Error.WriteLine($_.Exception.Message); exit 1 } finally { $fs.Dispose() }
"""


def get_script(path: str, offset: int = 0, chunk: int = DEFAULT_GET_CHUNK) -> str:
    """The PowerShell that prints a JSON header, then ``path`` from ``offset`` as base64 lines, then ``.``."""
    params = {"Path": path, "Offset": int(offset), "Chunk": int(chunk)}
    return "# fleetbus-wmi get v1\n" + _params("get", params) + GET_BODY


REMOVE_BODY = r"""
$ProgressPreference = 'SilentlyContinue'
Remove-Item -LiteralPath $Path -Force -ErrorAction SilentlyContinue
"""


def remove_script(path: str) -> str:
    """Best-effort removal of a temporary file left by an abandoned put."""
    return "# fleetbus-wmi remove v1\n" + _params("remove", {"Path": path}) + REMOVE_BODY


def put_lines(data: bytes, chunk: int) -> list[bytes]:
    """``data`` as the stdin lines put sends: base64 of ``chunk`` bytes, CRLF-terminated."""
    return [base64.b64encode(data[i: i + chunk]) + b"\r\n" for i in range(0, len(data), chunk)]


def result_error(result: dict[str, object], what: str) -> FleetbusError:
    """The fleetbus error for a failed script's result. The script is a peer
    (errors.error_for_code): a code it gives that fleetbus does not know, or
    ``internal``, is the transport failing."""
    message = shorten(one_line(result.get("message") or "failed"), 300)
    return error_for_code(result.get("code") or TransportError.code, f"{what}: {message}",
                          reporter="the server's script")


def last_json(stdout: bytes) -> dict[str, object] | None:
    """The last line of ``stdout`` that is a JSON object."""
    for line in reversed(stdout.decode("utf-8", "replace").lstrip("\ufeff").splitlines()):
        line = line.strip().lstrip("\ufeff")
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


async def _rechunk(source: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    buffer = bytearray()
    async for piece in source:
        buffer += piece
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


async def put_file(conn: Connection, spec: PutSpec, source: AsyncIterator[bytes],
                   chunk: int = DEFAULT_PUT_CHUNK) -> FileStat:
    path = check_windows_path(spec.path)
    if path.endswith(("\\", "/")):
        raise InvalidRequest(f"path names a directory: {path}")
    if spec.size is not None and (not isinstance(spec.size, int) or spec.size < 0):
        raise InvalidRequest(f"invalid size {spec.size!r}")
    temp = temp_path(path)
    line = powershell_line(put_script(path, temp, spec.make_parents, spec.size))
    cmd = await conn.start(line, stdin=True)
    sha = hashlib.sha256()
    sent = 0
    out = bytearray()
    err = bytearray()
    try:
        accepted = True
        async for piece in _rechunk(source, chunk):
            sent += len(piece)
            if spec.size is not None and sent > spec.size:
                raise TransportError(f"size mismatch for {path}: expected {spec.size} bytes, "
                                     f"received at least {sent}")
            sha.update(piece)
            accepted = await cmd.send(base64.b64encode(piece) + b"\r\n", end=False)
            if not accepted:
                break  # the script stopped (it reports why)
        if accepted:
            if spec.size is not None and sent != spec.size:
                raise TransportError(f"size mismatch for {path}: expected {spec.size} bytes, "
                                     f"received {sent}")
            await cmd.send(b"", end=True)
        while True:
            o, e, code = await cmd.receive()
            out += o
            err += e[: max(0, 65536 - len(err))]
            if code is not None:
                break
            cmd.check_stdin()
    except BaseException:
        await cmd.abandon()
        await _remove_temp(conn, temp)
        raise
    await cmd.finish()
    result = last_json(bytes(out))
    if result is None:
        detail = shorten(one_line(bytes(err).decode("utf-8", "replace") or f"exit code {code}"), 300)
        raise TransportError(f"put {path}: the PowerShell script gave no result: {detail}")
    if not result.get("ok"):
        raise result_error(result, f"put {path}")
    if result.get("size") != sent or str(result.get("sha256", "")).lower() != sha.hexdigest():
        raise TransportError(f"put {path}: the server wrote {result.get('size')} bytes with "
                             f"SHA-256 {result.get('sha256')}, fleetbus sent {sent} bytes with "
                             f"{sha.hexdigest()}")
    return FileStat(size=sent, mode=None)


async def _remove_temp(conn: Connection, temp: str) -> None:
    async def remove() -> None:
        cmd = await conn.start(powershell_line(remove_script(temp)))
        try:
            while (await cmd.receive())[2] is None:
                pass
        except BaseException:
            await cmd.abandon()
            raise
        await cmd.finish()

    await conn.shielded(remove())


class _Lines:
    """The stdout of a command, line by line, as Receive responses arrive."""

    def __init__(self, cmd: RunningCommand) -> None:
        self.cmd = cmd
        self._buffer = bytearray()
        self.stderr = bytearray()
        self.exit_code: int | None = None
        self._first = True

    async def next(self) -> bytes | None:
        while True:
            newline = self._buffer.find(b"\n")
            if newline >= 0:
                line = bytes(self._buffer[:newline]).rstrip(b"\r")
                del self._buffer[: newline + 1]
                if self._first:
                    line = line.removeprefix(b"\xef\xbb\xbf")
                    self._first = False
                return line
            if self.exit_code is not None:
                if self._buffer:
                    line, self._buffer = bytes(self._buffer), bytearray()
                    return line
                return None
            out, err, code = await self.cmd.receive()
            self._buffer += out
            self.stderr += err[: max(0, 65536 - len(self.stderr))]
            if code is not None:
                self.exit_code = code


class _GetChunks(AsyncIterator[bytes]):
    """The chunks of a file being read; ``aclose`` before the end stops the command."""

    def __init__(self, lines: _Lines, path: str, size: int) -> None:
        self._lines = lines
        self._path = path
        self._size = size
        self._received = 0
        self._finished = False

    def __aiter__(self) -> _GetChunks:
        return self

    async def __anext__(self) -> bytes:
        if self._finished:
            raise StopAsyncIteration
        try:
            line = await self._lines.next()
            if line == b".":
                if self._received != self._size:
                    raise TransportError(f"get {self._path}: read {self._received} bytes of {self._size}")
                while await self._lines.next() is not None:
                    pass
                self._finished = True
                await self._lines.cmd.finish()
                raise StopAsyncIteration
            if line is None:
                detail = shorten(one_line(bytes(self._lines.stderr).decode("utf-8", "replace")
                                  or f"exit code {self._lines.exit_code}"), 300)
                raise TransportError(f"get {self._path}: reading stopped after {self._received} "
                                     f"of {self._size} bytes: {detail}")
            try:
                data = base64.b64decode(line, validate=True)
            except ValueError:
                raise TransportError(f"get {self._path}: the server sent a line that is not base64") from None
            self._received += len(data)
            if self._received > self._size:
                raise TransportError(f"get {self._path}: received more than {self._size} bytes")
            return data
        except StopAsyncIteration:
            raise
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if not self._finished:
            self._finished = True
            await self._lines.cmd.abandon()


async def get_file(conn: Connection, path: str, chunk: int = DEFAULT_GET_CHUNK) -> RemoteFile:
    path = check_windows_path(path)
    cmd = await conn.start(powershell_line(get_script(path, 0, chunk)))
    lines = _Lines(cmd)
    try:
        header_line = await lines.next()
        header = last_json(header_line or b"")
        if header is None or not header.get("ok"):
            while await lines.next() is not None:
                pass
    except BaseException:
        await cmd.abandon()
        raise
    if header is None:
        await cmd.finish()
        detail = shorten(one_line(bytes(lines.stderr).decode("utf-8", "replace")
                          or f"exit code {lines.exit_code}"), 300)
        raise TransportError(f"get {path}: the PowerShell script gave no header: {detail}")
    if not header.get("ok"):
        await cmd.finish()
        raise result_error(header, f"get {path}")
    size = header.get("size")
    if not isinstance(size, int) or size < 0:
        await cmd.abandon()
        raise TransportError(f"get {path}: bad size {size!r} in the header")
    return RemoteFile(size=size, mode=None, chunks=_GetChunks(lines, path, size))
