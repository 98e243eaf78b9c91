"""Audit records kept on the worker's disk until the audit stream has stored them.

The plugin host writes a command's record here before it replies and removes it when the
stream acknowledges it (audit.py). A worker killed while records were unacknowledged
(SIGKILL, the OOM killer, during a NATS node loss while the audit stream elects a
leader) leaves them in its spool, and the next worker to start on the same home sends
them again with their original ``Nats-Msg-Id``: the stream stores each once, even when
an earlier send was stored and only its acknowledgement was lost (within the stream's
duplicate window, two minutes; a record recovered later than that may be stored twice,
with the same command id and time).

Each process appends to its own segment files and holds an exclusive ``flock`` on each
while it lives, so a segment whose lock can be taken belongs to a process that is gone.
Writes are plain ``write(2)`` to the page cache with no ``fsync``: the spool outlives the
process, not the machine (a power loss can lose the records of its last seconds), and a
command pays one small write rather than a disk flush.

A stored record is marked so in place (one byte, ``pwrite``) when its acknowledgement
arrives, whatever the order of the acknowledgements, and is never sent again: the
stream's duplicate window is relied on only for records never acknowledged. The file
is not emptied when it drains (a truncate per acknowledgement, and a write into a
fresh page per record, cost each command ~50 us on the worker); it grows to
:data:`SEGMENT_BYTES`, then a new segment starts and the old one is deleted once all of
its records are stored.

Format: one line per record, ``<mark> <msg id> <subject> <record JSON>``, the mark
``+`` while the record waits for the stream and ``-`` once stored; the JSON is ASCII
with no raw newline (audit.encode_record), and a torn last line is skipped. A line with
no mark (written before marks existed) counts as waiting.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fleetbus.audit")

# A segment past this size is closed to new records and deleted once all of its records
# are stored.
SEGMENT_BYTES = 4 * 1024 * 1024
SUFFIX = ".spool"
WAITING = b"+"
STORED = b"-"


@dataclass(eq=False)
class Segment:
    """One spool file of this process and how many of its records are not stored yet."""

    path: Path
    fd: int
    size: int = 0
    outstanding: int = 0


@dataclass(frozen=True, slots=True)
class Kept:
    """Where one record is in the spool: its segment and the offset of its mark."""

    segment: Segment
    offset: int


@dataclass(frozen=True)
class SpooledRecord:
    """A record found in a dead process's spool, now in this process's."""

    msg_id: str
    subject: str
    data: bytes
    command_id: str
    kept: Kept



def log_unkept(folder: Path, exc: OSError) -> None:
    """Say once that records cannot be kept in ``folder``: they are still sent, only not
    protected against this process's death."""
    log.error("audit records cannot be kept on disk until stored (%s: %s); they are still sent, "
              "but a crash of this process may lose the unacknowledged ones",
              folder, exc.strerror or type(exc).__name__)

class AuditSpool:
    """The unacknowledged audit records of one process, on disk under ``folder``.

    Not thread-safe: used from the event loop only (each call is one small write).
    """

    def __init__(self, folder: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._own: dict[Path, Segment] = {}
        self._current: Segment | None = self._new_segment()
        self._failed = False  # a write failed (disk full): logged once, records still sent

    def _new_segment(self) -> Segment:
        path = self.folder / f"{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        # Not O_APPEND: Linux's pwrite appends on such a file, and the marks go in place.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        segment = self._own[path] = Segment(path, fd)
        return segment

    def append(self, msg_id: str, subject: str, data: bytes) -> Kept | None:
        """Keep one record until :meth:`settle`; None if it could not be written (the
        record is still sent, only not protected against this process's death)."""
        segment = self._current
        if segment is None:
            return None
        line = b"+ %s %s %s\n" % (msg_id.encode(), subject.encode(), data)
        try:
            if segment.size >= self.segment_bytes:
                full, segment = segment, self._new_segment()
                self._current = segment
                if full.outstanding == 0:  # all stored: nothing left to delete it later
                    self._drop(full)
            # At the end of what is written: a short write's remains are overwritten.
            written = os.pwrite(segment.fd, line, segment.size)
            if written != len(line):  # a regular file writes all or fails, unless the disk filled
                raise OSError(errno.ENOSPC, "short write")
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log_unkept(self.folder, exc)
            return None
        self._failed = False
        kept = Kept(segment, segment.size)
        segment.size += written
        segment.outstanding += 1
        return kept

    def settle(self, kept: Kept | None) -> None:
        """One record no longer needs keeping (stored, or given up on): marked so, and
        its segment deleted once none of it waits (unless it is the one written to)."""
        if kept is None or self._current is None:  # closed: what remains stays on disk
            return
        segment = kept.segment
        segment.outstanding -= 1
        try:
            if segment.outstanding > 0 or segment is self._current:
                os.pwrite(segment.fd, STORED, kept.offset)
            else:
                self._drop(segment)
        except OSError as exc:
            log.warning("could not tidy the audit spool %s: %s", segment.path, exc.strerror)

    def _drop(self, segment: Segment) -> None:
        del self._own[segment.path]
        segment.path.unlink(missing_ok=True)
        os.close(segment.fd)

    def adopt(self) -> list[SpooledRecord]:
        """Move the records of segments left by dead processes into this spool.

        They are written to this process's segment before the old file is deleted, so a
        death in between leaves them in one of the two, never in neither.
        """
        found: list[SpooledRecord] = []
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            if path in self._own:
                continue
            lines = self._claim(path)
            if lines is None:
                continue
            for line in lines:
                parsed = _parse(line)
                if parsed is None:
                    continue
                msg_id, subject, data, command_id = parsed
                kept = self.append(msg_id, subject, data)
                if kept is None:
                    return found  # could not keep it: leave the old file for a later start
                found.append(SpooledRecord(msg_id, subject, data, command_id, kept))
            path.unlink(missing_ok=True)
        if found:
            log.warning("sending %d audit records again that a stopped process had not had stored",
                        len(found))
        return found

    @staticmethod
    def _claim(path: Path) -> list[bytes] | None:
        """The lines of ``path`` if its writer is gone (its lock is free), else None."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None  # its process lives
            try:
                if os.stat(path).st_ino != os.fstat(fd).st_ino:
                    return None  # adopted and deleted by another process meanwhile
            except FileNotFoundError:
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read().split(b"\n")[:-1]  # the last piece is "" or a torn line
        finally:
            os.close(fd)

    def close(self, keep: bool) -> None:
        """Release this process's segments: deleted unless ``keep`` (records remain that
        the stream did not store; the next process on this home sends them)."""
        for segment in self._own.values():
            if not keep:
                segment.path.unlink(missing_ok=True)
            os.close(segment.fd)
        self._current = None
        self._own.clear()


def _parse(line: bytes) -> tuple[str, str, bytes, str] | None:
    """A waiting record's parts; None for a stored record or a torn line."""
    if line[:2] == WAITING + b" ":
        line = line[2:]
    elif line[:2] == STORED + b" ":
        return None
    parts = line.split(b" ", 2)
    if len(parts) != 3:
        return None
    try:
        record = json.loads(parts[2])
        return parts[0].decode(), parts[1].decode(), parts[2], str(record["id"])
    except (ValueError, KeyError, TypeError):
        return None
