"""Registers both agent transports through one ``fleetbus.plugins`` entry point (``agents``).

``agent-outbound`` (the TLS gateway agents dial into) and ``agent-inbound`` (fleetbus
connects to a listening agent) share the link (:mod:`fleetbus_agents.link`), so they
ship as one plugin; ``fleetbus plugins`` lists each transport with this plugin's name.
"""

from fleetbus.hookspecs import hookimpl


@hookimpl
def fleetbus_transports():
    from .inbound.transport import InboundTransport
    from .outbound.gateway import GatewayTransport

    return [GatewayTransport, InboundTransport]


@hookimpl
def fleetbus_cli(cli):
    from .inbound.cli import add_cli as add_inbound
    from .outbound.cli import add_cli as add_outbound

    add_outbound(cli)
    add_inbound(cli)
