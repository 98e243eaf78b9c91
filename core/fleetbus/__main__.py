"""``python -m fleetbus``: the same as the ``fleetbus`` command."""

from .cli.main import main

main()
