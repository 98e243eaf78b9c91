"""The program ``local`` runs as its configured user to open files for ``get`` and ``put``.

fleetbus starts it as ``python -I -S -X utf8 -c <this file's source>``, already switched
to the user (groups, gid, uid set between fork and exec), so the kernel checks every
path lookup, open, create and rename here against that user: its permissions, ACLs,
sticky directories, read-only mounts, whatever applies. It imports nothing of fleetbus,
so the user need not be able to read fleetbus's installation.

It talks to fleetbus over the ``SOCK_SEQPACKET`` socket on its fd 0, one JSON message
at a time; an opened file's descriptor goes back attached to the answer (SCM_RIGHTS),
and fleetbus reads or writes the bytes through it itself, so no file content passes
through this process.

- ``{"op": "open", "path": P}``: answers ``{"ok": true}`` with the descriptor of P
  opened for reading, then exits.
- ``{"op": "create", "path": P, "mode": M or null, "make_parents": B}``: creates a
  temporary file beside P (mode 0600) and answers ``{"ok": true, "mode": M}`` with its
  descriptor; then waits for ``{"op": "commit"}`` (give the file its mode and, when it
  replaces a file, that file's owner if allowed; fsync; rename over P; fsync the
  directory; answer ``{"ok": true}``) or for anything else, end of file included
  (remove the temporary file).
- ``{"op": "chdir", "path": P}``: changes into P and answers ``{"ok": true}`` with a
  descriptor of it (``O_PATH``), then exits: the working directory of a command, which
  fleetbus's child enters through ``/proc/self/fd/N`` while it is still root.

A failure answers ``{"ok": false, "step": S, "errno": N, "strerror": T}``, or
``{"ok": false, "refused": "directory" | "not_regular"}`` for a path that is not a
regular file.
"""

import json
import os
import socket
import stat

TEMP_PREFIX = ".fleetbus-"  # as fleetbus_base.ops.files.TEMP_PREFIX
DEFAULT_MODE = 0o644  # as fleetbus_base.ops.files.DEFAULT_MODE
MAX_MESSAGE = 65536


class Refused(Exception):
    pass


def send(sock, fd=None, **fields):
    data = json.dumps(fields).encode()
    if fd is None:
        sock.send(data)
    else:
        socket.send_fds(sock, [data], [fd])


def receive(sock):
    data = sock.recv(MAX_MESSAGE)
    return json.loads(data) if data else None


def check_regular(st):
    if stat.S_ISDIR(st.st_mode):
        raise Refused("directory")
    if not stat.S_ISREG(st.st_mode):
        raise Refused("not_regular")


def open_for_reading(path):
    # stat before open: opening a device can have side effects and a FIFO blocks;
    # O_NONBLOCK in case the path became a FIFO in between.
    check_regular(os.stat(path))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        check_regular(os.fstat(fd))
    except Refused:
        os.close(fd)
        raise
    return fd


def create_temp(parent):
    while True:
        temp = os.path.join(parent, TEMP_PREFIX + os.urandom(6).hex())
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(temp, flags, 0o600), temp
        except FileExistsError:
            continue


def fsync_directory(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def serve_open(sock, request):
    step = "open"
    try:
        fd = open_for_reading(request["path"])
    except Refused as exc:
        return send(sock, ok=False, refused=str(exc))
    except OSError as exc:
        return send(sock, ok=False, step=step, errno=exc.errno, strerror=exc.strerror)
    send(sock, fd=fd, ok=True)


def serve_create(sock, request):
    path = request["path"]
    parent = os.path.dirname(path)
    mode = request["mode"]
    owner = None
    temp = None
    step = "stat"
    try:
        try:
            existing = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            existing = None
        if existing is not None:
            check_regular(existing)
            # Replacing a file keeps who may read it: its mode unless one is given,
            # and its owner where this user may give the file away.
            owner = (existing.st_uid, existing.st_gid)
            if mode is None:
                mode = stat.S_IMODE(existing.st_mode)
        if mode is None:
            mode = DEFAULT_MODE
        if request["make_parents"]:
            step = "makedirs"
            os.makedirs(parent, exist_ok=True)
        step = "create"
        fd, temp = create_temp(parent)
    except Refused as exc:
        return send(sock, ok=False, refused=str(exc))
    except OSError as exc:
        return send(sock, ok=False, step=step, errno=exc.errno, strerror=exc.strerror)
    try:
        send(sock, fd=fd, ok=True, mode=mode)
        command = receive(sock)
        if not command or command.get("op") != "commit":
            return
        step = "commit"
        try:
            if owner is not None and owner != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(fd, *owner)
                except PermissionError:
                    pass  # it stays this user's
            os.fchmod(fd, mode)  # after fchown, which clears the setuid and setgid bits
            os.fsync(fd)
            step = "rename"
            os.replace(temp, path)
            temp = None
            fsync_directory(parent)
        except OSError as exc:
            return send(sock, ok=False, step=step, errno=exc.errno, strerror=exc.strerror)
        send(sock, ok=True, mode=mode)
    finally:
        if temp is not None:
            try:
                os.unlink(temp)
            except OSError:
                pass


def serve_chdir(sock, request):
    try:
        # chdir checks what the kernel checks for this user: search permission on P
        # and on every folder above it.
        os.chdir(request["path"])
        fd = os.open(".", getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return send(sock, ok=False, step="chdir", errno=exc.errno, strerror=exc.strerror)
    send(sock, fd=fd, ok=True)


def main():
    sock = socket.socket(fileno=0)
    request = receive(sock)
    if request is None:
        return
    if request.get("op") == "open":
        serve_open(sock, request)
    elif request.get("op") == "create":
        serve_create(sock, request)
    elif request.get("op") == "chdir":
        serve_chdir(sock, request)


if __name__ == "__main__":
    main()
