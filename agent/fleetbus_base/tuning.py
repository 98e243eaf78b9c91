"""Every process tweak and standard-library patch the agent makes, in one place.

The agent's entry points (``fleetbus-agent connect`` and ``listen``) call :func:`apply`
once, before the event loop starts; fleetbus's core processes call it too, through
:mod:`fleetbus.tuning`, for the parts they share (the agent protocol runs in the
gateway and the agent-inbound transport). Nothing on the data path applies a patch.

Each patch below names what it targets and why. Each checks the attributes it relies
on first: where they are missing (another Python, another C library) it is not applied
and says so in a debug log, never an error. ``FLEETBUS_TUNING=off`` turns every patch
off, and with it the heap policy of :mod:`fleetbus_base.heap` (trimming, keeping
large buffers), so a test run can show that none of them is needed for correctness.

Standard library only, Python 3.9+: this module ships in the agent's zipapp.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional

log = logging.getLogger("fleetbus_base.tuning")

ENV = "FLEETBUS_TUNING"
"""``off`` (or ``0``, ``false``, ``no``) turns every patch off; anything else leaves them on."""

_OFF = ("off", "0", "false", "no")

TLS_READ_BUFFER = 64 * 1024
"""The one read buffer per thread that every TLS connection shares (:func:`tls_read_buffer`)."""

TLS_READ_BUFFER_PATCH = "tls_read_buffer"
PIDFD_CHILD_WATCHER = "pidfd_child_watcher"
TRIM_AFTER_START = "trim_heap_after_start"
LARGE_BUFFERS = "large_buffers"

AGENT = (TLS_READ_BUFFER_PATCH, PIDFD_CHILD_WATCHER, TRIM_AFTER_START)
"""What the agent applies at start. Its heap policy for transfers (keep large buffers
while one runs, trim after) acts at run time, under the same switch."""

_applied: Dict[str, str] = {}


def enabled() -> bool:
    """Whether tuning is on in this process (``FLEETBUS_TUNING`` is not ``off``)."""
    return os.environ.get(ENV, "on").strip().lower() not in _OFF


def applied() -> Dict[str, str]:
    """The patches applied in this process so far: name -> what was done."""
    return dict(_applied)


def apply(names: Iterable[str] = AGENT) -> Dict[str, str]:
    """Apply the named patches (idempotent); return :func:`applied`.

    With ``FLEETBUS_TUNING=off`` nothing is applied. A patch whose target differs from
    what it expects is skipped with a debug log; a name no patch has raises ValueError.
    Call it before the event loop starts.
    """
    names = list(names)
    unknown = [name for name in names if name not in PATCHES]
    if unknown:  # a typo at an entry point, not a library that changed
        raise ValueError(f"no such tuning patch: {', '.join(unknown)}")
    if not enabled():
        log.debug("%s=off: no tuning applied", ENV)
        return applied()
    for name in names:
        if name in _applied:
            continue
        patch = PATCHES[name]
        try:
            done = patch()
        except Exception as exc:  # a library that changed must not stop the process
            log.debug("tuning %s not applied: %s: %s", name, type(exc).__name__, exc)
            continue
        if done is None:
            continue  # the patch logged why
        _applied[name] = done
        log.debug("tuning %s: %s", name, done)
    return applied()


def _not_applied(name: str, why: str) -> None:
    log.debug("tuning %s not applied: %s", name, why)


# --- asyncio's TLS read buffer (CPython 3.11-3.13 asyncio.sslproto) ---------------------

_tls_read = threading.local()


def _tls_read_view(size: int) -> memoryview:
    view: Optional[memoryview] = getattr(_tls_read, "view", None)
    if view is None or len(view) < size:
        view = _tls_read.view = memoryview(bytearray(size))
    return view


def tls_read_buffer() -> Optional[str]:
    """Make asyncio's TLS connections share one read buffer per thread.

    Targets ``asyncio.sslproto.SSLProtocol`` of CPython 3.11-3.13 (written against 3.11;
    checked on the Python this project pins). It gives every TLS connection its own read
    buffer of ``max_size`` (256 KiB), allocated and zero-filled when the connection is
    made: 1.25 GiB for 5,000 agents on a gateway before a byte arrives. The buffer only
    holds bytes between the socket's ``recv_into()`` and ``buffer_updated()``, which
    copies them into the TLS object's incoming BIO in the same callback; no two
    connections of one event loop (one thread) can be in between at once, so one buffer
    per thread serves all of them. TLS records are at most 16 KiB, so 64 KiB per recv
    loses no throughput.

    Where ``_do_read__copied`` exists, the read loop also stops once nothing is left to
    decrypt, instead of on one ``SSLWantReadError`` per received chunk.

    Replaces the class process-wide: ``base_events``, ``selector_events`` and
    ``proactor_events`` all look it up in ``asyncio.sslproto`` at each use. Python 3.9
    and 3.10 read into a fresh bytes object instead and have nothing to share.
    """
    from asyncio import sslproto

    base = sslproto.SSLProtocol
    if getattr(base, "_fleetbus_shared_buffer", False):
        return "already shared"
    if not isinstance(getattr(base, "max_size", None), int) or not hasattr(base, "get_buffer"):
        return _not_applied(TLS_READ_BUFFER_PATCH, "SSLProtocol has no max_size/get_buffer (Python < 3.11)")

    again = getattr(sslproto, "SSLAgainErrors", None)
    fast_read = again is not None and hasattr(base, "_do_read__copied")

    class SharedBufferSSLProtocol(base):  # type: ignore[misc, valid-type]
        _fleetbus_shared_buffer = True
        max_size = min(base.max_size, TLS_READ_BUFFER)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # The base allocates bytearray(self.max_size) as this connection's own
            # buffer; shadowing max_size while it runs makes that an empty one.
            self.max_size = 0
            try:
                super().__init__(*args, **kwargs)
            finally:
                del self.max_size

        def get_buffer(self, n: int) -> memoryview:
            # buffer_updated() reads from _ssl_buffer_view: point it at the shared one.
            view = self._ssl_buffer_view = _tls_read_view(self.max_size)
            return view

        if fast_read:

            def _do_read__copied(self) -> None:
                # The base reads until the TLS object raises SSLWantReadError: one
                # exception per chunk received, almost always after the chunk's only
                # record (a command is one small frame each way). Stop instead once
                # neither the incoming BIO nor the TLS object holds another byte; a
                # partial record still ends in the exception, a close_notify still
                # reads as b"". Otherwise the base's logic, unchanged.
                incoming, sslobj = self._incoming, self._sslobj
                chunks: List[bytes] = []
                chunk = b"1"
                try:
                    while True:
                        chunk = sslobj.read(self.max_size)
                        if not chunk:
                            break
                        chunks.append(chunk)
                        if not incoming.pending and not sslobj.pending():
                            break
                except again:
                    pass
                if chunks:
                    self._app_protocol.data_received(
                        chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    )
                if not chunk:  # close_notify
                    self._call_eof_received()
                    self._start_shutdown()

    sslproto.SSLProtocol = SharedBufferSSLProtocol  # type: ignore[misc]
    what = f"one {TLS_READ_BUFFER // 1024} KiB TLS read buffer per thread"
    return what + (", reads stop when nothing is left" if fast_read else "")


# --- asyncio's child watcher (CPython 3.9-3.11) -----------------------------------------

def pidfd_child_watcher() -> Optional[str]:
    """Use asyncio's ``PidfdChildWatcher`` on Python 3.9-3.11 when the kernel has pidfds.

    Before 3.12 asyncio's default child watcher starts a thread for every child process
    and joins it on exit; ``PidfdChildWatcher`` waits on a pidfd in the event loop
    instead, without a thread per spawn (docs/performance.md has the figures). It serves
    every process started with asyncio (the embedded nats-server, for one; ``exec``
    itself does not go through asyncio, :mod:`fleetbus_base.ops.child`). Python 3.12+
    uses pidfds already and deprecates choosing a watcher: nothing to do there. Not
    applied under another event loop policy (uvloop watches children itself).
    """
    from .ops.childwatch import pidfd_usable

    if sys.version_info >= (3, 12):
        return _not_applied(PIDFD_CHILD_WATCHER, "Python 3.12+ watches children with pidfds itself")
    if not hasattr(asyncio, "PidfdChildWatcher"):
        return _not_applied(PIDFD_CHILD_WATCHER, "asyncio has no PidfdChildWatcher")
    if not pidfd_usable():
        return _not_applied(PIDFD_CHILD_WATCHER, "this kernel does not let us open a pidfd")
    policy = asyncio.get_event_loop_policy()
    if not isinstance(policy, asyncio.DefaultEventLoopPolicy):
        return _not_applied(PIDFD_CHILD_WATCHER, f"event loop policy is {type(policy).__name__}")
    # PidfdChildWatcher keeps no loop of its own: it registers each pidfd with the loop
    # running at spawn time, so one instance serves every loop in the process.
    policy.set_child_watcher(asyncio.PidfdChildWatcher())
    return "PidfdChildWatcher"


# --- the C heap (glibc malloc) -----------------------------------------------------------

def trim_heap_after_start() -> Optional[str]:
    """Return what compiling the agent's modules left in the heap (glibc ``malloc_trim``).

    Python compiles every module from source when the agent runs from its zipapp or
    without cached bytecode, and that memory stays below later allocations, out of
    reach of glibc's automatic trim (:mod:`fleetbus_base.heap`). Only after a compile.
    """
    from . import heap

    module = sys.modules.get("fleetbus_base.wire.connection")
    if module is None or not heap.compiled_from_source(module):
        return _not_applied(TRIM_AFTER_START, "modules came from cached bytecode: little to release")
    if not heap.trim_heap():
        return _not_applied(TRIM_AFTER_START, "no malloc_trim here (not glibc)")
    return "trimmed once"


def large_buffers() -> Optional[str]:
    """Serve the 1 MiB buffers of a transfer from glibc's heap for the rest of the process.

    For processes that move files (fleetbus workers, the CLI's ``put`` and ``get``):
    glibc's mallopt ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` (glibc 2.x), raised
    so each chunk stops costing an ``mmap``, 256 page faults and the zeroing of a MiB
    (:mod:`fleetbus_base.heap` says why).
    """
    from . import heap

    if not heap.keep_large_buffers():
        return _not_applied(LARGE_BUFFERS, "no mallopt here (not glibc)")
    return f"mmap threshold {heap.MMAP_THRESHOLD >> 20} MiB, trim threshold {heap.TRIM_THRESHOLD >> 20} MiB"


PATCHES: Dict[str, Callable[[], Optional[str]]] = {
    TLS_READ_BUFFER_PATCH: tls_read_buffer,
    PIDFD_CHILD_WATCHER: pidfd_child_watcher,
    TRIM_AFTER_START: trim_heap_after_start,
    LARGE_BUFFERS: large_buffers,
}
"""Every patch this module knows, by name."""
