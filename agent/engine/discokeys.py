"""Disco keys in static-config mode (no coordinator).

A node's disco key pair IS its WireGuard node key pair: `static_disco_private(node_private)`
for us, `static_disco_public(peer_public_key)` for each peer that speaks DISCO. Both are X25519
keys, so the peer's public key from the config authenticates its DISCO boxes with nothing else
to configure, from the first packet, over UDP or any relay.

Weighed against:
  * a second key per peer in the config: what the issue rules out; error-prone by hand.
  * trust on first use of the sender key seen over DERP (the relay authenticates the frame's
    source node key): rests on the relay operator being honest (a relay could substitute keys
    and steer our path choice), and rotation makes re-binding silent, i.e. no check at all.
  * sending a random disco key inside the WireGuard tunnel once it is up: the best privacy,
    but it needs an in-tunnel control channel and a handshake over DERP before any probing,
    which delays the first hole punch; a possible later addition.
  * deriving the disco key from the node key by a public tweak: no privacy gain (anyone can
    apply the tweak) and non-standard curve arithmetic.
Costs accepted: (1) privacy: every DISCO packet carries the sender's disco public key in
clear, so an on-path observer of direct UDP sees the node's long-term public key and can link it
across networks (WireGuard itself never sends a static key in clear; the DERP relay sees node
keys anyway). (2) key reuse across protocols: the same X25519 secret feeds WireGuard's Noise
handshake (static-static DH mixed into a BLAKE2s HKDF chain with ephemeral DHs) and NaCl
crypto_box (HSalsa20 of the DH, random 24-byte nonces). The derivations differ, the plaintexts
are disjoint formats, and the DISCO receiver is no decryption or signing oracle for anything
WireGuard uses; Tailscale's own DERP login already boxes with the node key. The engine takes the
disco private key and each peer's disco public key as parameters, so a coordinator can hand out
random per-boot disco keys (as tailscaled's control plane does) without changing the engine.
Which peers speak DISCO is the daemon's call: a peer given a `derp_region` (one of ours), not a
plain WireGuard peer configured with only an endpoint.
"""

from __future__ import annotations

from agent.keys import DiscoPrivate, DiscoPublic, NodePrivate, NodePublic

__all__ = ["static_disco_private", "static_disco_public"]


def static_disco_private(node_private: NodePrivate) -> DiscoPrivate:
    """Our disco private key in static-config mode: the node private key (module docstring)."""
    return DiscoPrivate(node_private.raw)


def static_disco_public(node_public: NodePublic) -> DiscoPublic:
    """A peer's disco public key in static-config mode: its node public key."""
    return DiscoPublic(node_public.raw)
