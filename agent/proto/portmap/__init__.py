"""Port-mapping protocols a home router speaks, as sans-I/O codecs: NAT-PMP (`pmp`), PCP (`pcp`),
UPnP IGD discovery (`ssdp`), description and SOAP (`igd`) over one bounded HTTP exchange (`http`).

Layer rule: pure computation (struct, ipaddress, h11, defusedxml); no sockets, clocks or OS. Every
parser raises only RemoteProtocolError subclasses (`errors`). The client state machine using them
is agent.engine.portmap (a package); the sockets are agent.node.portmap_io.
"""
