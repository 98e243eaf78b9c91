"""The standard-library layer every fleetbus process stands on.

The core, the transports and the agent all import it; it imports nothing outside the
standard library and runs on Python 3.9+, because the agent ships it to servers in its
zipapp.

* :mod:`fleetbus_base.wire`: the agent wire protocol (frames, handshake, streams,
  connection), spoken by the agent and by fleetbus's gateway and inbound transport.
* :mod:`fleetbus_base.ops`: what a server does for a command (run a process, write or
  read a file, report its facts), used by the agent and the ``local`` transport.
* Beside them, what the processes share: :mod:`~fleetbus_base.heap` and
  :mod:`~fleetbus_base.pagecache` (memory and page cache during transfers),
  :mod:`~fleetbus_base.admission`, :mod:`~fleetbus_base.throttle` and
  :mod:`~fleetbus_base.fdbudget` (listeners facing unauthenticated peers),
  :mod:`~fleetbus_base.ownenv` (secrets taken from the environment),
  :mod:`~fleetbus_base.digests`, :mod:`~fleetbus_base.text` and
  :mod:`~fleetbus_base.tuning` (every process tweak, and the switch that turns them off).
"""

__version__ = "0.1.0"
