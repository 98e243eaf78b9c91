"""Turning an :class:`~fleetbus.transport.ExecSpec` into a WinRS command line.

Pure functions, no I/O: everything here is unit tested without a server.

What runs where
---------------

- ``shell`` strings go to ``cmd.exe /c`` exactly as given (WinRS runs a command through
  cmd unless ``WINRS_SKIP_CMD_SHELL`` is set). cmd's own rules apply, including its
  ``/c`` quote rule: a line that *starts* with ``"`` and holds more than two quotes loses
  its first and last quote, so write ``""C:\\Program Files\\x.exe" "arg""``.
- ``argv`` lists also go through cmd (so built-ins such as ``dir`` and ``type`` work),
  quoted so that the program receives exactly the strings in the list:

  1. each element is quoted for ``CommandLineToArgvW`` / the MSVC runtime (the rules
     Windows programs use to split their command line; ``subprocess.list2cmdline`` does
     the same, :func:`quote_arg` also quotes empty strings and every whitespace);
  2. every cmd metacharacter in the arguments (``( ) % ! ^ " < > & |``) is escaped with
     ``^``, so cmd neither interprets them nor expands ``%VAR%``, and passes them on
     unchanged; escaped quotes do not toggle cmd's quote state, so an embedded ``\\"``
     cannot expose the rest of the line;
  3. the program (``argv[0]``) is quoted with plain quotes when it needs quoting (cmd
     finds the program name with unescaped quotes), and if the line then starts with a
     quote it is wrapped in one more pair for the ``/c`` rule above.

  Newlines cannot cross cmd in an argument: such an argv is refused (send the data on
  stdin, or use PowerShell). ``%`` inside the *program* path cannot be escaped.
- PowerShell: ``argv == ["powershell", SCRIPT]`` (also ``powershell.exe``, ``pwsh``,
  ``pwsh.exe``; SCRIPT not starting with ``-`` or ``/``) runs SCRIPT through
  ``powershell.exe -NoLogo -NoProfile -NonInteractive -ExecutionPolicy Bypass
  -EncodedCommand <base64 of UTF-16LE>``, started directly (``WINRS_SKIP_CMD_SHELL``) so
  no quoting is involved and the limit is CreateProcess's 32767 characters (about 12,000
  characters of script) rather than cmd's 8191. The script is sent as is (nothing is
  prepended, so ``param()`` and ``begin``/``process``/``end`` blocks work). Any other
  PowerShell argv (e.g. with ``-File``) is an ordinary argv.

Environment variables and the working directory are not put on the command line: they
are given to the WinRS shell itself (``rsp:Environment``, ``rsp:WorkingDirectory``), see
:mod:`fleetbus_wmi.shell`.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from fleetbus.errors import InvalidRequest

#: cmd.exe's command-line limit (characters after ``cmd /c``).
CMD_MAX_CHARS = 8191
#: CreateProcess's command-line limit.
CREATEPROCESS_MAX_CHARS = 32767

POWERSHELL_NAMES = frozenset({"powershell", "powershell.exe", "pwsh", "pwsh.exe"})
POWERSHELL_FLAGS = "-NoLogo -NoProfile -NonInteractive -ExecutionPolicy Bypass"
_CMD_META = frozenset('()%!^"<>&|')
_NEEDS_QUOTES = re.compile(r'[\s"]')


@dataclass(frozen=True)
class CommandLine:
    """What is sent in a WinRS ``Command``: the line, and whether cmd is skipped."""

    command: str
    skip_cmd_shell: bool = False
    powershell_script: str | None = None


def quote_arg(arg: str) -> str:
    """Quote one argument for ``CommandLineToArgvW`` (the MSVC runtime's rules).

    Backslashes are literal except before a quote: ``2n`` backslashes + ``"`` mean ``n``
    backslashes and a quote delimiter, ``2n+1`` mean ``n`` backslashes and a literal quote.
    """
    if arg and not _NEEDS_QUOTES.search(arg):
        return arg
    out = ['"']
    backslashes = 0
    for ch in arg:
        if ch == "\\":
            backslashes += 1
            continue
        if ch == '"':
            out.append("\\" * (2 * backslashes + 1) + '"')
        else:
            out.append("\\" * backslashes + ch)
        backslashes = 0
    out.append("\\" * (2 * backslashes) + '"')
    return "".join(out)


def cmd_escape(text: str) -> str:
    """Escape every cmd metacharacter (quotes included) with ``^``."""
    return "".join("^" + ch if ch in _CMD_META else ch for ch in text)


def _check_arg(arg: object, index: int) -> str:
    if not isinstance(arg, str):
        raise InvalidRequest(f"argv[{index}] is not a string")
    if "\0" in arg:
        raise InvalidRequest(f"argv[{index}] holds a NUL character")
    if "\r" in arg or "\n" in arg:
        raise InvalidRequest(
            f"argv[{index}] holds a line break, which cmd.exe cannot pass to a program; "
            "send the text on stdin or run it through PowerShell")
    return arg


def argv_to_cmd_line(argv: list[str]) -> str:
    """The cmd command line that gives the program exactly ``argv``."""
    if not argv:
        raise InvalidRequest("argv must not be empty")
    program = _check_arg(argv[0], 0)
    if not program:
        raise InvalidRequest("argv[0] must not be empty")
    if '"' in program:
        raise InvalidRequest('argv[0] holds a quote, which no Windows path can')
    if _NEEDS_QUOTES.search(program) or any(ch in _CMD_META for ch in program):
        head = f'"{program}"'
    else:
        head = program
    parts = [head] + [cmd_escape(quote_arg(_check_arg(a, i))) for i, a in enumerate(argv[1:], 1)]
    line = " ".join(parts)
    if line.startswith('"'):
        # cmd /c strips the first and the last quote of such a line: give it a pair to strip.
        line = f'"{line}"'
    return line


def argv_to_direct_line(argv: list[str]) -> str:
    """The command line for a program started without cmd (CreateProcess)."""
    if not argv:
        raise InvalidRequest("argv must not be empty")
    return " ".join(quote_arg(_check_arg(a, i)) for i, a in enumerate(argv))


def is_powershell_script(argv: list[str] | None) -> bool:
    """Whether ``argv`` is the ``["powershell", SCRIPT]`` convention."""
    return (
        argv is not None
        and len(argv) == 2
        and isinstance(argv[0], str)
        and argv[0].lower() in POWERSHELL_NAMES
        and isinstance(argv[1], str)
        and not argv[1].startswith(("-", "/"))
    )


def encode_powershell(script: str) -> str:
    """Base64 of the UTF-16LE script, as ``-EncodedCommand`` expects."""
    return base64.b64encode(script.encode("utf-16-le")).decode("ascii")


def decode_powershell(encoded: str) -> str:
    """The inverse of :func:`encode_powershell` (used by tests and the test server)."""
    return base64.b64decode(encoded).decode("utf-16-le")


def powershell_line(script: str, program: str = "powershell.exe") -> CommandLine:
    """A command line running ``script`` through PowerShell with ``-EncodedCommand``.

    Nothing is prepended: a statement before a script's ``param()`` or its
    ``begin``/``process``/``end`` blocks would break it (PowerShell would take ``begin``
    for a command). Progress records reaching stderr as CLIXML are dropped by
    :class:`ClixmlFilter` instead.
    """
    if "\0" in script:
        raise InvalidRequest("the PowerShell script holds a NUL character")
    line = f"{program} {POWERSHELL_FLAGS} -EncodedCommand {encode_powershell(script)}"
    if len(line) > CREATEPROCESS_MAX_CHARS:
        raise InvalidRequest(
            f"the PowerShell script is too long for one command line ({len(script)} characters; "
            f"encoded, a script may have about {(CREATEPROCESS_MAX_CHARS - 120) * 3 // 8} "
            "characters): copy it to the server with put and run it with -File")
    return CommandLine(command=line, skip_cmd_shell=True, powershell_script=script)


def command_line(argv: list[str] | None, shell: str | None) -> CommandLine:
    """The WinRS command for an exec request's ``argv`` or ``shell``."""
    if (argv is None) == (shell is None):
        raise InvalidRequest("give exactly one of argv and shell")
    if shell is not None:
        if not shell.strip():
            raise InvalidRequest("the shell command is empty")
        if "\0" in shell:
            raise InvalidRequest("the shell command holds a NUL character")
        if len(shell) > CMD_MAX_CHARS:
            raise InvalidRequest(
                f"the command is {len(shell)} characters; cmd.exe accepts at most {CMD_MAX_CHARS}")
        return CommandLine(command=shell)
    assert argv is not None
    if is_powershell_script(argv):
        program = "pwsh.exe" if argv[0].lower().startswith("pwsh") else "powershell.exe"
        return powershell_line(argv[1], program)
    line = argv_to_cmd_line(argv)
    if len(line) > CMD_MAX_CHARS:
        raise InvalidRequest(
            f"the command line is {len(line)} characters once quoted; cmd.exe accepts at most "
            f"{CMD_MAX_CHARS}: send long data on stdin or copy it with put")
    return CommandLine(command=line)


def ps_quote(value: str) -> str:
    """A PowerShell single-quoted literal of ``value``.

    PowerShell also treats the typographic single quotes as quote characters, so those
    are doubled as well.
    """
    return "'" + re.sub("(['\u2018\u2019\u201a\u201b])", r"\1\1", value) + "'"


class ClixmlFilter:
    """Turns PowerShell's CLIXML error stream (``#< CLIXML``) back into plain text.

    ``powershell.exe -EncodedCommand`` with redirected streams writes its error records
    to stderr as serialized XML. Fed stderr chunks as they arrive, this passes plain
    text through untouched and replaces each complete ``<Objs>`` document by the text of
    its error strings (progress and other records are dropped).
    """

    _HEADER = b"#< CLIXML"
    _END = b"</Objs>"

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out: list[bytes] = []
        while self._buffer:
            start = self._buffer.find(self._HEADER)
            if start < 0:
                # Keep a possible partial header at the end.
                keep = _partial_suffix(self._buffer, self._HEADER)
                out.append(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            out.append(self._buffer[:start])
            end = self._buffer.find(self._END, start)
            if end < 0:
                self._buffer = self._buffer[start:]
                break
            document = self._buffer[start + len(self._HEADER): end + len(self._END)]
            self._buffer = self._buffer[end + len(self._END):].lstrip(b"\r\n")
            out.append(clixml_text(document.decode("utf-8", "replace")).encode("utf-8"))
        return b"".join(out)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest


def _partial_suffix(data: bytes, token: bytes) -> int:
    for n in range(min(len(token) - 1, len(data)), 0, -1):
        if data.endswith(token[:n]):
            return n
    return 0


_CLIXML_ESCAPE = re.compile(r"_x([0-9A-Fa-f]{4})_")


def clixml_text(document: str) -> str:
    """The error text of one CLIXML ``<Objs>`` document."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(document.strip())
    except ET.ParseError:
        return document
    lines: list[str] = []
    for node in root.iter():
        if node.tag.endswith("}S") and node.get("S") == "Error" and node.text:
            lines.append(_CLIXML_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), node.text))
    return "".join(lines)
