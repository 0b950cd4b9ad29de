"""MagicDNS for the overlay: node names, the responder at 100.100.100.100, forwarding bookkeeping.

Sans-I/O like the rest of agent.proto: query bytes and `now` in, answer bytes (or "forward this")
out. `names` is pure naming (sanitising, unique assignment, reverse names); `responder` answers
from a live `NameTable`; `forwarding` tracks queries sent upstream. dnspython does the wire format.
"""
