"""The ``agent-outbound`` transport: the TLS gateway outbound agents dial into."""
