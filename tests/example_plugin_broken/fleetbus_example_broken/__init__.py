"""A deliberately broken fleetbus plugin: importing its ``plugin`` module raises."""
