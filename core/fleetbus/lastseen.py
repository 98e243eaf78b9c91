"""When a server was last seen, said for a person: "last seen 2026-12-07 15:02:11 UTC, 4 min ago".

Messages for a server nobody serves (the client's, a job's) say it the same way, from
the server's status record.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any


def last_seen(status: Mapping[str, Any] | None) -> str:
    """When whoever served the server last saw it, from its status, for a message."""
    seen = (status or {}).get("last_seen")
    age = age_s(seen)
    if seen is None or age == float("inf"):
        return "never seen"
    then = datetime.fromisoformat(str(seen)).astimezone(UTC)
    return f"last seen {then:%Y-%m-%d %H:%M:%S} UTC, {ago(age)}"


def ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def age_s(created: Any) -> float:
    """Seconds since an ISO-8601 ``created`` time; infinite when it cannot be read."""
    try:
        then = datetime.fromisoformat(str(created))  # 3.11 reads a trailing Z too
    except ValueError:
        return float("inf")
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    return (datetime.now(UTC) - then).total_seconds()
