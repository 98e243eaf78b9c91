"""The built-in ``ssh`` transport plugin (agentless Linux/Unix servers over paramiko).

See :mod:`fleetbus_ssh.transport` for the server fields and settings it reads.
"""
