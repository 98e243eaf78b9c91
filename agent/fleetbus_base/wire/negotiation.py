"""The one negotiation every handshake variant runs: versions, receive limits, heartbeat.

Whichever side dials and however the key is checked, the two sides agree on the same
terms: the highest protocol version both speak, each side's receive limits
(``max_body``, ``window``) and one heartbeat interval. :class:`Negotiation` holds this
side's offer, checks what the peer sent and produces the agreed :class:`Terms`; the
four exchanges in :mod:`.handshake` differ only in the order of frames and in
how the key is proven.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from .frames import (
    DEFAULT_MAX_BODY,
    DEFAULT_WINDOW,
    MAX_ANNOUNCED_BODY,
    MAX_ANNOUNCED_WINDOW,
    MIN_LIMIT,
    ProtocolError,
)
from .peer import is_int

MAX_OFFERED_VERSIONS = 64
"""A peer offering more versions than this is refused before they are compared."""

MAX_HEARTBEAT_S = 3600.0


@dataclass(frozen=True)
class Terms:
    """What both sides agreed on; :class:`~.handshake.Welcome` and
    :class:`~.handshake.Accepted` carry these fields."""

    version: int
    heartbeat_s: float
    peer_max_body: int
    peer_window: int
    max_body: int
    window: int

    def fields(self) -> Dict[str, Any]:
        """The terms as keyword arguments for ``Welcome`` or ``Accepted``."""
        return {
            "version": self.version,
            "heartbeat_s": self.heartbeat_s,
            "peer_max_body": self.peer_max_body,
            "peer_window": self.peer_window,
            "max_body": self.max_body,
            "window": self.window,
        }


def check_heartbeat(heartbeat_s: float) -> None:
    """Refuse (ValueError) a heartbeat interval this side was asked to propose."""
    if not 0 < heartbeat_s <= MAX_HEARTBEAT_S:
        raise ValueError(f"heartbeat_s must be in (0, {MAX_HEARTBEAT_S:g}]")


class Negotiation:
    """This side's offer, and the checks of the peer's half of the negotiation.

    Built before any I/O: bad limits are the caller's ValueError. Every check of a
    peer's frame raises :class:`ProtocolError` (``invalid_request``, or
    ``unsupported_version``), which the handshake turns into an ``error`` frame.
    """

    def __init__(self, side: str, versions: Sequence[int], max_body: int, window: int) -> None:
        """``side`` is ours (``"agent"`` or ``"controller"``), for refusals such as
        "the controller speaks [1, 2]"."""
        if not MIN_LIMIT <= max_body <= MAX_ANNOUNCED_BODY:
            raise ValueError(f"max_body must be between {MIN_LIMIT} and {MAX_ANNOUNCED_BODY}")
        if not MIN_LIMIT <= window <= MAX_ANNOUNCED_WINDOW:
            raise ValueError(f"window must be between {MIN_LIMIT} and {MAX_ANNOUNCED_WINDOW}")
        self.side = side
        self.versions: List[int] = list(versions)
        self.max_body = max_body
        self.window = window

    # -- what this side sends

    def offer(self) -> Dict[str, Any]:
        """The fields of the frame that opens the negotiation (``hello`` or ``challenge``)."""
        return {"versions": list(self.versions), "max_body": self.max_body, "window": self.window}

    def limits(self) -> Dict[str, Any]:
        """Our receive limits, as every later frame of the handshake repeats them."""
        return {"max_body": self.max_body, "window": self.window}

    # -- checking what the peer sent

    def choose_version(self, header: Dict[str, Any], what: str) -> int:
        """The highest version both speak, from the peer's ``versions`` offer."""
        offered = header.get("versions")
        if (
            not isinstance(offered, list)
            or not offered
            or len(offered) > MAX_OFFERED_VERSIONS
            or not all(is_int(v) for v in offered)
        ):
            raise ProtocolError(f'{what} needs "versions", a non-empty list of integers')
        common = set(offered) & set(self.versions)
        if not common:
            raise ProtocolError(
                f"no common protocol version: the {self.side} speaks {sorted(set(self.versions))}",
                "unsupported_version",
            )
        return max(common)

    def chosen_version(self, header: Dict[str, Any], what: str) -> int:
        """The version the peer chose, which must be one we offered."""
        version = header.get("version")
        if not is_int(version):
            raise ProtocolError(f'{what} needs an integer "version"')
        if version not in self.versions:
            raise ProtocolError(
                f"{what} names a version not offered: the {self.side} speaks "
                f"{sorted(set(self.versions))}",
                "unsupported_version",
            )
        return int(version)

    @staticmethod
    def peer_limits(
        header: Dict[str, Any], default_body: int = DEFAULT_MAX_BODY, default_window: int = DEFAULT_WINDOW
    ) -> Tuple[int, int]:
        """The peer's receive limits (``max_body``, ``window``); absent ones take the defaults."""
        return (
            _limit(header, "max_body", default_body, MAX_ANNOUNCED_BODY),
            _limit(header, "window", default_window, MAX_ANNOUNCED_WINDOW),
        )

    @staticmethod
    def heartbeat(header: Dict[str, Any], what: str) -> float:
        """The heartbeat interval the peer proposed or confirmed."""
        heartbeat_s = header.get("heartbeat_s")
        if (
            not isinstance(heartbeat_s, (int, float))
            or isinstance(heartbeat_s, bool)
            or not 0 < heartbeat_s <= MAX_HEARTBEAT_S
        ):
            raise ProtocolError(f'{what} has no valid "heartbeat_s"')
        return float(heartbeat_s)

    @staticmethod
    def check_description(header: Dict[str, Any], what: str) -> None:
        """The agent's description of itself (``agent``, ``facts``), when it sends one."""
        if not isinstance(header.get("facts", {}), dict):
            raise ProtocolError(f'{what} "facts" must be an object')
        if not isinstance(header.get("agent", ""), str):
            raise ProtocolError(f'{what} "agent" must be a string')

    def terms(self, version: int, heartbeat_s: float, peer_limits: Tuple[int, int]) -> Terms:
        """The agreed terms, from the version, the heartbeat and the peer's limits."""
        return Terms(
            version=version,
            heartbeat_s=float(heartbeat_s),
            peer_max_body=peer_limits[0],
            peer_window=peer_limits[1],
            max_body=self.max_body,
            window=self.window,
        )


def _limit(header: Dict[str, Any], name: str, default: int, high: int) -> int:
    value = header.get(name, default)
    if not is_int(value) or not MIN_LIMIT <= value <= high:
        raise ProtocolError(f'"{name}" must be an integer between {MIN_LIMIT} and {high}')
    return int(value)
