"""fleetbus's two NATS accounts in nats-server config, and the USERS account's users file.

Both the embedded NATS (``fleetbus up``) and a shared NATS an operator runs get the same
accounts (docs/security.md, docs/operations.md "Users on a shared NATS"):

- :func:`account_config` renders the ``accounts { FLEETBUS {...} USERS {...} }`` block:
  FLEETBUS holds JetStream and fleetbus's own processes and exports fleetbus's services
  and the users' inboxes; USERS imports them and includes its users from a file of its
  own. The embedded NATS writes it into its config; ``fleetbus nats accounts`` prints it
  for an operator to include.
- :class:`UsersFile` owns that users file: it replaces it atomically, has
  ``nats-server -t`` check the whole config, and makes nats-server re-read it (SIGHUP).
  Whatever fails, the previous file is put back, so the file always holds what the
  running nats-server has. The embedded NATS signals its own child; a core beside a
  shared NATS signals the pid in that server's pid file (:class:`PidFileReload`).

Only config mode: operator mode (JWTs made with ``nsc``) is not supported; the reasons
are in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidRequest
from .home import write_private
from .subjects import Names

FLEETBUS_ACCOUNT = "FLEETBUS"
USERS_ACCOUNT = "USERS"
#: How long a reply to a user's request may take to cross the service import. nats-server
#: forgets the reverse mapping after its default of 2 min and the reply is lost, so it
#: is the longest a command waits (put/get of large files).
RESPONSE_THRESHOLD = "6h"
#: The users file before fleetbus has written any user: an empty USERS account.
NO_USERS = "users: []\n"
#: The longest ``nats-server -t`` may take on a config (a large users file: ~1 s).
CHECK_TIMEOUT_S = 20.0


def nkey_user(public_key: str) -> str:
    """A FLEETBUS user entry authenticated by an nkey (its public key only: no secret)."""
    return json.dumps({"nkey": public_key})


def account_config(prefix: str, users_file: str, fleetbus_users: Sequence[str]) -> list[str]:
    """The ``accounts`` block, one line per item.

    FLEETBUS exports fleetbus's services and the users' inboxes and holds
    ``fleetbus_users`` (entries of a NATS ``users`` list, e.g. :func:`nkey_user`); USERS
    imports them (``share: true``, so every request carries the authenticated user in
    ``Nats-Request-Info``) and includes its users from ``users_file``. nats-server reads
    an include relative to the including file's folder, even an absolute-looking one, so
    ``users_file`` is a relative path from there.
    """
    names = Names(prefix)
    services = names.user_services
    inboxes = json.dumps(names.user_inboxes())
    # Several messages may answer one request (response_type: stream), for as long as
    # the longest command may take (RESPONSE_THRESHOLD).
    exports = [f"      {{service: {json.dumps(s)}, response_type: stream, "
               f"response_threshold: {json.dumps(RESPONSE_THRESHOLD)}}}" for s in services]
    # Live output and transfer messages fleetbus publishes on a user's own inbox.
    exports.append(f"      {{stream: {inboxes}}}")
    imports = [f"      {{service: {{account: {FLEETBUS_ACCOUNT}, subject: {json.dumps(s)}}}, share: true}}"
               for s in services]
    imports.append(f"      {{stream: {{account: {FLEETBUS_ACCOUNT}, subject: {inboxes}}}}}")
    return [
        "accounts {",
        f"  {FLEETBUS_ACCOUNT} {{",
        "    jetstream: enabled",
        "    users: [",
        *(f"      {entry}" for entry in fleetbus_users),
        "    ]",
        "    exports: [", *exports, "    ]",
        "  }",
        f"  {USERS_ACCOUNT} {{",
        # An include inside `users: [...]` is a parse error: the file holds the whole list.
        f"    include {json.dumps(users_file)}",
        "    imports: [", *imports, "    ]",
        "  }",
        "}",
    ]


def users_include(path: str) -> str:
    """``path`` checked as the USERS include's name: relative, since nats-server would
    read an absolute one relative to the including file anyway (and not find it)."""
    if not path or Path(path).is_absolute() or "\n" in path or '"' in path:
        raise InvalidRequest(f"the users file {path!r} must be a path relative to the file that "
                             "includes the accounts block (nats-server reads includes relative to it)")
    return path


async def check_config(binary: str, config: Path, env: Mapping[str, str] | None = None) -> str | None:
    """``nats-server -t -c config``: None if it parses, else its complaint (one line)."""
    check = await asyncio.create_subprocess_exec(
        binary, "-t", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL, env=None if env is None else dict(env),
    )
    try:
        out, _ = await asyncio.wait_for(check.communicate(), CHECK_TIMEOUT_S)
    except TimeoutError:
        check.kill()
        await check.wait()
        return f"the check took longer than {CHECK_TIMEOUT_S:g} s"
    if check.returncode == 0:
        return None
    # Its last line names the file's line at fault: keys and subjects, never a secret
    # (the users file holds public keys only; fleetbus's config passes its token as a
    # variable reference).
    lines = out.decode(errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else f"exit status {check.returncode}"


class PidFileReload:
    """SIGHUP to the nats-server whose pid its ``pid_file`` holds, read anew at every
    reload: a restarted nats-server has another pid."""

    def __init__(self, pid_file: Path) -> None:
        self.pid_file = pid_file

    def __call__(self) -> None:
        try:
            text = self.pid_file.read_text().strip()
        except OSError as exc:
            raise InvalidRequest(f"cannot read the nats-server pid file {self.pid_file}: {exc.strerror} "
                                 "(is nats-server running with pid_file set to it?)") from None
        if not text.isdigit() or int(text) <= 1:
            raise InvalidRequest(f"the nats-server pid file {self.pid_file} holds no pid")
        pid = int(text)
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            raise InvalidRequest(f"no process {pid} (from {self.pid_file}): is nats-server running?") from None
        except PermissionError:
            raise InvalidRequest(f"not allowed to signal nats-server (pid {pid}): run the core as "
                                 "nats-server's user") from None


class UsersFile:
    """The USERS account's users file (a ``users: [...]`` block) of a running nats-server.

    ``reload`` makes nats-server re-read its config and raises when it cannot;
    ``config`` (the whole config that includes the file), when given, is checked with
    ``nats-server -t`` before the reload, with the environment ``env()`` returns (None:
    this process's own). Changes take one at a time.
    """

    def __init__(self, path: Path, reload: Callable[[], None], *, binary: str,
                 config: Path | None = None, env: Callable[[], Mapping[str, str] | None] = lambda: None) -> None:
        self.path = path
        self.reload = reload
        self.binary = binary
        self.config = config
        self.env = env
        self._applying = asyncio.Lock()

    async def apply(self, text: str) -> bool:
        """Make ``text`` the users nats-server runs with; False when it already was.

        Raises InvalidRequest when the file cannot be written, nats-server refuses the
        config or cannot be signalled; the previous file is then back in place.
        """
        async with self._applying:
            try:
                if self.path.read_text() == text:
                    return False
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise self._unwritable(exc) from None
            previous = self.path.with_name(self.path.name + ".previous")
            had_previous = self.path.exists()
            try:
                if had_previous:
                    os.replace(self.path, previous)
                write_private(self.path, text.encode())
            except OSError as exc:
                self._restore(previous, had_previous)
                raise self._unwritable(exc) from None
            try:
                if self.config is not None:
                    problem = await check_config(self.binary, self.config, self.env())
                    if problem is not None:
                        raise InvalidRequest(f"nats-server refused the generated users: {problem}")
                self.reload()
            except BaseException:
                self._restore(previous, had_previous)
                raise
            previous.unlink(missing_ok=True)
            return True

    def _restore(self, previous: Path, had_previous: bool) -> None:
        """Put the file nats-server last read back (or none, if there was none)."""
        if had_previous and previous.exists():
            os.replace(previous, self.path)
        elif not had_previous:
            self.path.unlink(missing_ok=True)

    def _unwritable(self, exc: OSError) -> InvalidRequest:
        return InvalidRequest(f"cannot write the NATS users file {self.path}: {exc.strerror or exc}")


@dataclass(frozen=True)
class SharedUsers:
    """Where a core beside a shared nats-server keeps that server's USERS account
    (``fleetbus core --nats-users-file``): the users file the server's config includes,
    the server's pid file, and its config file to check before each reload (optional)."""

    users_file: Path
    pid_file: Path
    config: Path | None = None

    def open(self, binary: str) -> UsersFile:
        """The :class:`UsersFile` for them; ``binary`` is the nats-server that checks."""
        return UsersFile(self.users_file, PidFileReload(self.pid_file), binary=binary, config=self.config)
