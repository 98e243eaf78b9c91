"""Test helpers for transport authors: a fake host context, output sinks, a conformance suite.

Use them from your plugin's own pytest suite::

    from fleetbus.testing import CollectingSink, FakeContext, TransportConformance

- :class:`FakeContext` stands in for the plugin host's ``TransportContext`` (a real
  bounded thread pool, a logger, settings, servers and credentials from dicts, recorded
  ``serve``/``unserve`` calls, a small fake of the core services).
- :class:`CollectingSink` records what a session writes to its ``OutputSink``;
  :class:`SlowSink` is a consumer that takes its time, to prove back-pressure.
- :class:`TransportConformance` is a base class of pytest tests: subclass it, give it a
  ``session`` fixture (and a ``scratch`` folder), and your transport is checked against
  the contract in :mod:`fleetbus.transport`. See docs/plugin-testing.md.

The package imports pytest (for the suite); import it only from tests.
"""

from __future__ import annotations

from .conformance import TransportConformance, chunks_of
from .context import FakeContext, FakeServices
from .sinks import CollectingSink, SlowSink

__all__ = [
    "CollectingSink",
    "FakeContext",
    "FakeServices",
    "SlowSink",
    "TransportConformance",
    "chunks_of",
]
