"""Access control: Tailscale-syntax policy files, compiled per node, enforced per packet.

Layer rule: pure computation only (text, nodes and packet bytes in; values out). Nothing here
reads a clock, a file or a socket; `now` is a parameter. tests/policy checks the imports.
"""
