"""Which user ``local`` runs commands and file operations as (the ``user`` setting).

As fleetbus's own user, a ``local`` command can do anything fleetbus can: read
``master.key`` and ``nats.token`` in the home folder, and with the credential records
on the bus open every secret in the vault. When fleetbus runs as root that is the whole
machine, so the default then is an unprivileged user, never root itself:

- ``user`` set (a name or a uid): that user. Our own user means no switch at all
  (``local.user=root`` is how a root fleetbus keeps running ``local`` as root).
- unset, fleetbus not root: fleetbus's own user (it cannot switch anyway).
- unset, fleetbus root: ``fleetbus-local`` if that user exists, else ``nobody``.

Anything that cannot be honoured (no such user; another user while fleetbus is not
root; root with neither default user) stops fleetbus at start with one line, rather
than running commands with more privilege than the operator asked for.
"""

from __future__ import annotations

import os

from fleetbus.errors import InvalidRequest
from fleetbus_base.ops.runas import RunAs

SETTING = "user"
DEFAULT_USERS = ("fleetbus-local", "nobody")
"""Tried in order when fleetbus runs as root and no ``user`` is set."""


def local_user(setting: object, euid: int | None = None) -> RunAs | None:
    """The user ``local`` must switch to for ``setting`` (the ``user`` transport setting,
    None when unset), or None to run as ourselves. ``euid`` defaults to ours.

    Raises InvalidRequest with a one-line reason when the setting cannot be honoured.
    """
    euid = os.geteuid() if euid is None else euid
    if setting is None or setting == "":
        if euid != 0:
            return None
        for name in DEFAULT_USERS:
            try:
                return RunAs.lookup(name)
            except KeyError:
                continue
        raise InvalidRequest(
            "fleetbus runs as root and no local user is set, but neither "
            f"{' nor '.join(DEFAULT_USERS)} exists: create a {DEFAULT_USERS[0]} user, or "
            "pass --local-user NAME (--local-user root runs local commands as root)"
        )
    if isinstance(setting, bool) or not isinstance(setting, (str, int)):
        raise InvalidRequest(f"local transport setting {SETTING!r} must be a user name or uid, "
                             f"not {setting!r}")
    try:
        user = RunAs.lookup(setting)
    except KeyError as exc:
        raise InvalidRequest(f"local transport setting {SETTING!r}: {exc.args[0]}") from None
    if user.uid == euid:
        return None
    if euid != 0:
        raise InvalidRequest(
            f"local transport setting {SETTING!r} is {user.name}, but only fleetbus running "
            "as root can run commands as another user"
        )
    return user
