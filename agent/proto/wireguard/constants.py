"""WireGuard protocol constants, named as in the whitepaper and wireguard-go `device/constants.go`.

Timings are seconds; they are defaults for `Timings` and never mutated at run time.
"""

from __future__ import annotations

from typing import Final

# Noise construction and identifiers (whitepaper §5.4).
CONSTRUCTION: Final = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER: Final = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1: Final = b"mac1----"
LABEL_COOKIE: Final = b"cookie--"

# Message types (first byte; the next three are zero) and exact sizes.
MSG_INITIATION: Final = 1
MSG_RESPONSE: Final = 2
MSG_COOKIE_REPLY: Final = 3
MSG_TRANSPORT: Final = 4
INITIATION_SIZE: Final = 148
RESPONSE_SIZE: Final = 92
COOKIE_REPLY_SIZE: Final = 64
TRANSPORT_HEADER_SIZE: Final = 16
TRANSPORT_MIN_SIZE: Final = 32  # header + empty (keepalive) payload + 16-byte tag
AEAD_TAG_SIZE: Final = 16
PADDING_MULTIPLE: Final = 16

# Timers (whitepaper §6.1, wireguard-go constants.go).
REKEY_AFTER_MESSAGES: Final = 1 << 60
REJECT_AFTER_MESSAGES: Final = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME: Final = 120.0
REKEY_ATTEMPT_TIME: Final = 90.0
REKEY_TIMEOUT: Final = 5.0
MAX_TIMER_HANDSHAKES: Final = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)  # 18
REKEY_TIMEOUT_JITTER_MAX: Final = 0.334
REJECT_AFTER_TIME: Final = 180.0
KEEPALIVE_TIMEOUT: Final = 10.0
COOKIE_REFRESH_TIME: Final = 120.0
HANDSHAKE_INITIATION_RATE: Final = 1.0 / 50  # min spacing of accepted initiations per peer
PADDING_ZEROES: Final = bytes(PADDING_MULTIPLE)

# Replay window (RFC 6479 style bitmap), as wireguard-go `replay/replay.go`.
REPLAY_WINDOW_SIZE: Final = 8192 - 64

# Staged packets per peer while a handshake is pending (wireguard-go QueueStagedSize = 128).
MAX_STAGED_PACKETS: Final = 128

# Handshake load: above this many handshake messages per second the device wants mac2 (cookie).
UNDER_LOAD_HANDSHAKES_PER_SECOND: Final = 1000
# Per source address when under load (wireguard-go ratelimiter: 20/s, burst 5).
RATELIMIT_PACKETS_PER_SECOND: Final = 20
RATELIMIT_BURST: Final = 5
