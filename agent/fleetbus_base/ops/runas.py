"""Another user for the processes an operation starts (``exec`` as an unprivileged user).

A process that runs as root can start a child as any user: the child sets its groups,
gid and uid between fork and exec (``subprocess.Popen``'s ``extra_groups``, ``group``,
``user``), and from then on the kernel checks everything it does against that user.
Nothing here changes the identity of the calling process itself: ``setresuid`` and
friends apply to every thread of a process (glibc makes them), so switching back and
forth in a threaded server would race with every other thread.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from typing import Any, Dict, Tuple, Union


@dataclass(frozen=True)
class RunAs:
    """A user to run processes as: ids, supplementary groups and home, as looked up once.

    Build it with :meth:`lookup`. ``groups`` are the user's supplementary groups as
    ``initgroups`` would set them; a child must get these and only these, or it would
    keep ours (root's).
    """

    name: str
    uid: int
    gid: int
    groups: Tuple[int, ...]
    home: str

    @classmethod
    def lookup(cls, user: Union[str, int]) -> RunAs:
        """The user named ``user``, or with that uid (an int, or a string of digits).

        Raises KeyError naming the user when there is no such user.
        """
        try:
            if isinstance(user, int) or (isinstance(user, str) and user.isascii() and user.isdigit()):
                entry = pwd.getpwuid(int(user))
            else:
                entry = pwd.getpwnam(user)
        except (KeyError, OverflowError):
            raise KeyError(f"no user {user!r} on this host") from None
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, groups, entry.pw_dir)

    def popen_options(self) -> Dict[str, Any]:
        """``subprocess.Popen`` options that start the child as this user."""
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def environment(self) -> Dict[str, str]:
        """What a login as this user would set that ours would get wrong (HOME, USER,
        LOGNAME); a request's own ``env`` still wins over these."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    def default_cwd(self) -> str:
        """Where a command without a ``cwd`` starts: the user's home if it is a
        directory, else ``/``; never our own working directory, which the user may not
        be allowed to enter."""
        return self.home if os.path.isdir(self.home) else "/"

    def __str__(self) -> str:
        return f"{self.name} (uid {self.uid})"
