"""I/O the three programs (node, relay, coordinator) share: TLS streams, certificates, the DERP
dial and upgrade, Prometheus text and systemd's readiness message.

Imports only proto, keys and log; never a program.
"""
