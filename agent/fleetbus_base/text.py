"""Quoting outside text in a one-line message: the one helper that shortens a string.

A message quotes what it did not write (a path, a peer's error, a library's exception
text), so it must stay one bounded line whatever that text holds. The agent, the
operations, the core and the plugins all cut such text here, the same way; this module
is standard library only (and Python 3.9), like the rest of the package, so the agent
can use it too. Each caller says what it quotes and how much of it fits.
"""

from __future__ import annotations

#: What marks text that was cut.
ELLIPSIS = "..."


def shorten(text: str, limit: int) -> str:
    """``text`` as is when it has at most ``limit`` characters, else its start ending in
    ``...``, ``limit`` characters in all."""
    if len(text) <= limit:
        return text
    return text[: max(limit - len(ELLIPSIS), 0)] + ELLIPSIS


def readable(text: str) -> str:
    """``text`` as is, or its ``repr`` (quoted, escaped) when it holds control characters,
    so a newline or an escape sequence in a name cannot break or forge a message line."""
    return text if text.isprintable() else repr(text)


def one_line(text: object) -> str:
    """``str(text)`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return (str(exc).splitlines() or [""])[0] or type(exc).__name__
