"""Raises on import, as a plugin with a missing dependency or a syntax slip would."""

raise RuntimeError("fleetbus-example-broken fails on import, on purpose")
