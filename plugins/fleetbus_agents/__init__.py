"""The fleetbus agent transports, one plugin: the agent dials out or listens.

- :mod:`.link`: a :class:`fleetbus.transport.Session` over an agent protocol connection,
  shared by both transports;
- :mod:`.outbound`: ``agent-outbound``, the TLS gateway agents dial into (``gateway``),
  several gateways on one deployment (``cluster``), the live connections (``links``),
  its CLI (``cli``);
- :mod:`.inbound`: ``agent-inbound``, fleetbus connects to a listening agent
  (``transport``) and its CLI (``cli``);
- :mod:`.plugin`: the entry point's hooks.
"""
