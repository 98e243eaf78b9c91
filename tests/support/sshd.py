"""A real OpenSSH ``sshd`` for tests, on a loopback port chosen at run time.

:class:`Sshd` generates its own host key and ``sshd_config`` in a temporary folder,
authorizes keys for root through its own ``authorized_keys`` file, and runs
``/usr/sbin/sshd -D -e`` as a child process that logs to a file. Readiness is waited for
by polling the port under a deadline, never with a fixed sleep.

:func:`require_sshd` is what a test calls before it needs sshd: when
``/usr/sbin/sshd`` is missing it skips the test, except under CI (``CI`` set), where a
missing sshd is a broken machine and the test fails.

:func:`ensure_password_user` creates the system user ``fbtest`` (``useradd -m``; this
touches /etc/passwd, /etc/shadow and /etc/group) and gives it a fresh random password
(``chpasswd``). Only root can; others get a skip.
"""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import pytest

from .ports import free_port

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
PASSWORD_USER = "fbtest"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0


def require_sshd() -> None:
    """Skip (or, under CI, fail) the calling test when OpenSSH's sshd is not installed."""
    if os.path.exists(SSHD) and os.path.exists(SSH_KEYGEN):
        return
    message = f"OpenSSH is not installed ({SSHD} / ssh-keygen missing): apt-get install openssh-server"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclass(frozen=True)
class KeyPair:
    """A key made by ssh-keygen: the private key file's bytes and the public key line."""

    private: bytes
    public: str
    passphrase: bytes | None = None


def generate_key(directory: Path, name: str, key_type: str = "ed25519",
                 passphrase: bytes | None = None, bits: int | None = None) -> KeyPair:
    """Generate a key pair with ssh-keygen (OpenSSH format) under ``directory``."""
    path = directory / name
    args = [SSH_KEYGEN, "-q", "-t", key_type, "-N", (passphrase or b"").decode(), "-C",
            f"fleetbus-test-{name}", "-f", str(path)]
    if bits is not None:
        args += ["-b", str(bits)]
    subprocess.run(args, check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return KeyPair(path.read_bytes(), Path(f"{path}.pub").read_text().strip(), passphrase)


def keygen_fingerprint_line(public_key_file: Path) -> str:
    """What ``ssh-keygen -lf`` prints for a public key file, e.g. ``256 SHA256:... c (ED25519)``."""
    return subprocess.run([SSH_KEYGEN, "-lf", str(public_key_file)], check=True, capture_output=True,
                          text=True).stdout.strip()


def fingerprint(public_line: str) -> str:
    """``SHA256:<base64, no padding>`` of an OpenSSH public key line, as ssh-keygen -l prints."""
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _descendants(root: int) -> list[int]:
    """Pids of every process below ``root`` (children first-level and deeper)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
    found: list[int] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, ppid in parents.items() if ppid == parent]
        found.extend(kids)
        frontier.extend(kids)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Sshd:
    """One sshd on 127.0.0.1, configured and keyed from scratch in ``directory``."""

    host = "127.0.0.1"

    def __init__(self, directory: Path, port: int | None = None, host_key_type: str = "ed25519",
                 extra_config: list[str] | None = None) -> None:
        self.dir = directory
        self.extra_config = list(extra_config or [])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host_key_path = self.dir / f"ssh_host_{host_key_type}_key"
        self.authorized_keys = self.dir / "authorized_keys"
        self.config_path = self.dir / "sshd_config"
        self.log_path = self.dir / "sshd.log"
        self.pid_path = self.dir / "sshd.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        if not self.host_key_path.exists():
            subprocess.run([SSH_KEYGEN, "-q", "-t", host_key_type, "-N", "", "-C", "test-host",
                            "-f", str(self.host_key_path)], check=True, capture_output=True,
                           stdin=subprocess.DEVNULL)
        self.host_public_key = Path(f"{self.host_key_path}.pub").read_text().strip()
        self.authorized_keys.touch(mode=0o600)
        self._write_config()

    @property
    def host_key_line(self) -> str:
        """The host key as ``<type> <base64>`` (without the comment)."""
        return " ".join(self.host_public_key.split()[:2])

    @property
    def host_fingerprint(self) -> str:
        return fingerprint(self.host_public_key)

    def _write_config(self) -> None:
        lines = [
            f"ListenAddress {self.host}",
            f"Port {self.port}",
            f"HostKey {self.host_key_path}",
            f"PidFile {self.pid_path}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no",
            "UsePAM no",
            "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin yes",
            "AllowTcpForwarding yes",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
            # Many tests open connections in quick succession from one address.
            "MaxStartups 100:30:200",
            *self.extra_config,
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def authorize(self, public_line: str) -> None:
        """Let the holder of ``public_line``'s private key log in (as any user)."""
        with open(self.authorized_keys, "a") as fh:
            fh.write(public_line.strip() + "\n")

    def start(self) -> Self:
        # sshd refuses to start without its privilege separation directory.
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config_path)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"sshd did not listen on port {self.port} within "
                                   f"{START_TIMEOUT_S:g} s:\n{self.log()[-3000:]}")
            time.sleep(0.01)  # polling interval, bounded by the deadline above

    def stop(self) -> None:
        """Stop the listener AND every connection it serves (a real restart drops them)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        # Each connection runs in a child sshd with a session of its own, out of reach of
        # the listener's signal; gather them first, they are ours too.
        victims = _descendants(proc.pid) if proc.poll() is None else []
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _signal(victims, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
        if not _wait_gone(victims, STOP_TIMEOUT_S):
            _signal(victims, signal.SIGKILL)
            _wait_gone(victims, STOP_TIMEOUT_S)

    def restart(self) -> Self:
        """Stop, then start again on the same port with the same host key."""
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def established_connections(port: int) -> int:
    """How many client-side TCP connections to 127.0.0.1:``port`` are ESTABLISHED (state 01)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            remote, state = fields[2], fields[3]
            if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def ensure_password_user() -> tuple[str, bytes]:
    """The user ``fbtest`` with a fresh random password; skip unless running as root.

    Creates the user with ``useradd -m`` when missing: this changes /etc/passwd,
    /etc/shadow and /etc/group on the machine running the tests.
    """
    if os.geteuid() != 0:
        pytest.skip("password authentication tests create the user fbtest and need root")
    try:
        pwd.getpwnam(PASSWORD_USER)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/sh", PASSWORD_USER], check=True,
                       capture_output=True)
    password = secrets.token_urlsafe(18)
    subprocess.run(["chpasswd"], input=f"{PASSWORD_USER}:{password}\n".encode(), check=True,
                   capture_output=True)
    return PASSWORD_USER, password.encode()
