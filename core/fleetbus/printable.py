"""Text from elsewhere made safe to show on a terminal.

Strings that come from servers, agents and other requesters (an agent's version, a host
name, a description, an error message) may hold terminal control sequences:
``ESC ] 0 ; ... BEL`` sets the window title, ``ESC [ 2 J`` clears the screen, and some
terminals answer queries by typing into their own input. :func:`printable` shows every
control character as a visible escape instead. Standard library only: the CLI imports
it without building any model.
"""

from __future__ import annotations

import re

__all__ = ["printable"]

# C0 controls, DEL, C1 controls (0x9b is CSI on its own), and the bidirectional overrides
# and isolates that make text display in another order than it is stored.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with each control character written as ``\\xNN`` (``\\uNNNN``)."""
    return _CONTROLS.sub(_escape, text)
