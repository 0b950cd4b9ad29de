"""`agent coordinator`: the coordination server and its admin CLI.

Nodes join with a pre-auth key, report their node key, disco key, hostname, endpoints and home
DERP region, get overlay addresses (IPv4 from 100.64.0.0/10, IPv6 at the same host offset in
fd7a:115c:a1e0::/48, both configurable) and receive the network map: every other live node's keys,
addresses, endpoints and home region, plus the DERP map. Our own JSON-over-HTTPS API (not
Tailscale's control protocol):

    GET  /api/v1/key                    -> {"public_key": B64, "time": UNIX}            no auth
    POST /api/v1/register               {"node_key", "nonce", "sealed"} -> {"nonce", "sealed"}
         sealed = NaCl box (node private key -> coordinator public key) of
                  {"auth_key", "disco_key", "hostname", "endpoints", "home_region", "timestamp"}
         answer = box back (coordinator -> node) of
                  {"node": NODE, "token", "ipv4_range", "ipv6_range", "derp"}
    POST /api/v1/update                 {"disco_key", "endpoints", "home_region"} -> {"changed"}
    GET  /api/v1/netmap[?since=V]       -> {"version", "self": NODE, "peers": [NODE...],
                                            "packet_filter", "dns_domain",
                                            "ipv4_range", "ipv6_range", "derp"}
    NODE = {"id", "name", "node_key", "disco_key", "addresses": [V4, V6], "endpoints":
            ["IP:PORT"...], "home_region", "key_expiry", "user", "tags"}

Access control (`agent coordinator policy set`, Tailscale's policy syntax): `peers` holds only
the nodes this node may exchange traffic with in either direction, and `packet_filter` the
compiled rules whose destination is this node; without a policy every other node is a peer and
`packet_filter` is null (allow all). A node belongs to its auth key's user, or is tagged
(identity.py); `user` is null for a tagged node.

Authentication. Register proves possession of the node key: only its holder can seal the box
the coordinator opens with its own private key (kept in the database, so every instance and every
restart has the same one), and only it can open the answer, which carries a fresh per-node bearer
token (32 random bytes, hex; the database keeps its SHA-256). The timestamp is the coordinator's
clock as read from /key plus the time since: it must be within MAX_SKEW (60 s) of the
coordinator's clock and newer than the node's previous registration, so a replayed request is
refused (409). update and netmap need `Authorization: Bearer TOKEN` and act on that node only:
no request names another node. A new node key needs a valid auth key; a node key that is
registered and unexpired may register again without one (a restarted agent gets a new token and
keeps its id, name and addresses). An expired node needs a new auth key (and keeps its
addresses); a removed node is forgotten.

Netmap long-poll: without `since` the answer is immediate; with it the coordinator answers as soon
as the network's version differs from `since`, else after LONG_POLL (25 s) with the same version.
The version is a counter in the database bumped in the same transaction as every change a netmap
can show (register, update that changed something, removal, expiry, a key expiry time passing);
each server polls it every 0.5 s, so changes made by `agent coordinator nodes remove` in another
process, or by another coordinator instance on the same PostgreSQL, reach waiting nodes within
about a second.

Errors are `{"error": CODE, "message": TEXT}`:
    400 bad_request, bad_timestamp        401 unauthorized (no/unknown token: removed node),
    401 bad_seal, invalid_auth_key, auth_key_used, auth_key_expired, auth_key_revoked
    403 node_expired                      404 not_found    405 method_not_allowed   409 replayed
    413 too_large                         503 unavailable, addresses_exhausted

Modules: store (auth keys, nodes, policy, snapshots) on registration (who joins, names,
addresses), records (what the store hands out), identity (users, tags, tagOwners), schema (tables,
migrations) and database (SQLite/PostgreSQL, transactions); service (request handling), netmaps
(per-node netmaps of a snapshot), server (asyncio HTTPS shell, h11), config (coordinator.conf),
admin and policy_admin (CLI). The wire messages are agent/proto/
coordinator_messages.py and the agent's side is agent/node/coordinator_client.py: the coordinator
never imports the node, nor the node the coordinator.
"""
