"""fleetbus-example-echo: an example fleetbus transport whose servers are in-memory fakes.

The version lives here once; pyproject.toml reads it (``[tool.setuptools.dynamic]``) and
the transport reports it as ``EchoTransport.version``.
"""

__version__ = "0.2.0"
