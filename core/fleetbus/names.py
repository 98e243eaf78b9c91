"""Validation of the names that end up in NATS subjects and KV keys.

A server name is one NATS subject token and one KV key, so it must not contain dots,
wildcards or spaces; we follow DNS labels (lowercase letters, digits, hyphens) because
operators already think of servers that way and it keeps subjects readable.
"""

from __future__ import annotations

import re

from fleetbus_base.text import shorten

from .errors import InvalidRequest

SERVER_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
CREDENTIAL_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?$")
COMMAND_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LABEL_KEY_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]{0,61}[a-z0-9])?$")
#: An nkey user's public key: 'U' and 55 more base32 characters (users.is_user_key also
#: checks the checksum). Here, not in users.py, because subjects.py needs it for a
#: user's inbox prefix and users.py imports subjects.py (through messages.py).
USER_KEY_RE = re.compile(r"^U[A-Z2-7]{55}$")


def _shown(value: object) -> str:
    return shorten(repr(value), 80)


def check_server_name(name: str) -> str:
    if not isinstance(name, str) or not SERVER_NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"invalid server name {_shown(name)}: use 1-63 lowercase letters, digits and "
            "hyphens, starting and ending with a letter or digit"
        )
    return name


def check_credential_name(name: str) -> str:
    if not isinstance(name, str) or not CREDENTIAL_NAME_RE.fullmatch(name):
        raise InvalidRequest(
            f"invalid credential name {_shown(name)}: use 1-63 lowercase letters, digits, "
            "hyphens and underscores, starting and ending with a letter or digit"
        )
    return name


def check_command_id(value: str) -> str:
    if not isinstance(value, str) or not COMMAND_ID_RE.fullmatch(value):
        raise InvalidRequest(
            f"invalid command id {_shown(value)}: use 1-64 letters, digits, '-' or '_'"
        )
    return value
