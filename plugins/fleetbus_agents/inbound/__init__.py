"""The ``agent-inbound`` transport: fleetbus connects to an agent listening on its server."""
