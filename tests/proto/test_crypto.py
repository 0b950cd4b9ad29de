"""Known-answer tests for agent.proto.wireguard.crypto: BLAKE2s, HMAC/KDF, AEADs, X25519, TAI64N."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from agent.proto.errors import AuthenticationFailed, RemoteProtocolError
from agent.proto.wireguard import crypto

VECTORS = Path(__file__).resolve().parent.parent / "vectors"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def wycheproof_cases(name: str, iv_bits: int | None = None) -> list[dict[str, Any]]:
    data = load(name)
    return [
        case
        for group in data["testGroups"]
        if iv_bits is None or group["ivSize"] == iv_bits
        for case in group["tests"]
    ]


# --- BLAKE2s ------------------------------------------------------------------------------------

BLAKE2S_KAT = load("blake2s/blake2s-kat.json")
UNKEYED = [v for v in BLAKE2S_KAT if v["hash"] == "blake2s" and v["key"] == ""]
KEYED = [v for v in BLAKE2S_KAT if v["hash"] == "blake2s" and v["key"] != ""]


def test_blake2s_kat_has_all_entries() -> None:
    assert len(UNKEYED) == 256
    assert len(KEYED) == 256


@pytest.mark.parametrize("vector", UNKEYED, ids=lambda v: f"len{len(v['in']) // 2}")
def test_hash_matches_unkeyed_kat(vector: dict[str, str]) -> None:
    data = bytes.fromhex(vector["in"])
    expected = bytes.fromhex(vector["out"])
    assert crypto.hash_(data) == expected
    # The same digest whatever way the input is split into parts.
    cut = len(data) // 3
    assert crypto.hash_(data[:cut], data[cut : 2 * cut], data[2 * cut :]) == expected


def test_hash_of_no_parts_is_hash_of_empty() -> None:
    assert crypto.hash_() == bytes.fromhex(UNKEYED[0]["out"])
    assert crypto.hash_(b"", b"") == crypto.hash_()


@pytest.mark.parametrize("vector", KEYED[::17], ids=lambda v: f"len{len(v['in']) // 2}")
def test_keyed_blake2s_backend_matches_kat(vector: dict[str, str]) -> None:
    # mac() is keyed BLAKE2s with a 16-byte digest; the KAT pins the keyed 32-byte backend it uses.
    key = bytes.fromhex(vector["key"])
    got = hashlib.blake2s(bytes.fromhex(vector["in"]), key=key).digest()
    assert got == bytes.fromhex(vector["out"])


def test_mac_is_16_byte_keyed_blake2s() -> None:
    key = bytes(range(32))
    out = crypto.mac(key, b"abc")
    assert len(out) == 16
    assert out == hashlib.blake2s(b"abc", key=key, digest_size=16).digest()
    # A 16-byte digest is a different parameter block, not a truncated 32-byte digest.
    assert out != hashlib.blake2s(b"abc", key=key).digest()[:16]
    assert crypto.mac(key, memoryview(b"abc")) == out


# --- HMAC and KDF -------------------------------------------------------------------------------


@given(key=st.binary(max_size=130), data=st.binary(max_size=300))
def test_hmac_blake2s_matches_stdlib_hmac(key: bytes, data: bytes) -> None:
    assert crypto.hmac_blake2s(key, data) == hmac.new(key, data, hashlib.blake2s).digest()


KDF_VECTORS = load("wireguard/wireguard-go-kdf.json")["vectors"]


@pytest.mark.parametrize("vector", KDF_VECTORS, ids=lambda v: v["key"] or "empty")
def test_kdf_vectors(vector: dict[str, str]) -> None:
    key = bytes.fromhex(vector["key"])
    data = bytes.fromhex(vector["input"])
    t0, t1, t2 = (bytes.fromhex(vector[k]) for k in ("t0", "t1", "t2"))
    assert crypto.kdf1(key, data) == t0
    assert crypto.kdf2(key, data) == (t0, t1)
    assert crypto.kdf3(key, data) == (t0, t1, t2)


# --- ChaCha20-Poly1305 --------------------------------------------------------------------------

CHACHA_FILE = "chacha20poly1305/wycheproof-chacha20_poly1305_test.json"
CHACHA_12 = wycheproof_cases(CHACHA_FILE, 96)
# Cases whose nonce has WireGuard's form: 4 zero bytes || little-endian u64 counter.
CHACHA_COUNTER_FORM = [c for c in CHACHA_12 if c["iv"].startswith("00000000")]


def test_chacha_vector_counts() -> None:
    assert len(CHACHA_12) == 316
    assert len(CHACHA_COUNTER_FORM) == 10
    assert CHACHA_12[0]["tcId"] == 1  # RFC 8439 §2.8.2


@pytest.mark.parametrize("case", CHACHA_12, ids=lambda c: str(c["tcId"]))
def test_wycheproof_chacha20poly1305_backend(case: dict[str, Any]) -> None:
    aead = ChaCha20Poly1305(bytes.fromhex(case["key"]))
    iv, aad = bytes.fromhex(case["iv"]), bytes.fromhex(case["aad"])
    sealed = bytes.fromhex(case["ct"] + case["tag"])
    msg = bytes.fromhex(case["msg"])
    if case["result"] == "valid":
        assert aead.encrypt(iv, msg, aad) == sealed
        assert aead.decrypt(iv, sealed, aad) == msg
    else:
        with pytest.raises(InvalidTag):
            aead.decrypt(iv, sealed, aad)


@pytest.mark.parametrize("case", CHACHA_COUNTER_FORM, ids=lambda c: str(c["tcId"]))
def test_wycheproof_through_counter_nonce(case: dict[str, Any]) -> None:
    key = bytes.fromhex(case["key"])
    counter = int.from_bytes(bytes.fromhex(case["iv"])[4:], "little")
    aad, msg = bytes.fromhex(case["aad"]), bytes.fromhex(case["msg"])
    sealed = bytes.fromhex(case["ct"] + case["tag"])
    assert case["result"] == "valid"
    assert crypto.aead_encrypt(key, counter, msg, aad) == sealed
    assert crypto.aead_decrypt(key, counter, sealed, aad) == msg
    for bad in (
        sealed[:-1] + bytes([sealed[-1] ^ 1]),  # tag
        bytes([sealed[0] ^ 0x80]) + sealed[1:],  # ciphertext
    ):
        with pytest.raises(AuthenticationFailed):
            crypto.aead_decrypt(key, counter, bad, aad)
    with pytest.raises(AuthenticationFailed):
        crypto.aead_decrypt(key, counter + 1, sealed, aad)
    with pytest.raises(AuthenticationFailed):
        crypto.aead_decrypt(key, counter, sealed, aad + b"x")


def test_aead_nonce_layout() -> None:
    key = bytes(range(32))
    counter = 0x0102030405060708
    nonce = b"\0\0\0\0" + counter.to_bytes(8, "little")
    expected = ChaCha20Poly1305(key).encrypt(nonce, b"payload", b"ad")
    assert crypto.aead_encrypt(key, counter, b"payload", b"ad") == expected


def test_aead_short_input_is_authentication_failure() -> None:
    with pytest.raises(AuthenticationFailed):
        crypto.aead_decrypt(bytes(32), 0, b"short", b"")


# --- XChaCha20-Poly1305 -------------------------------------------------------------------------

XCHACHA_24 = wycheproof_cases("chacha20poly1305/wycheproof-xchacha20_poly1305_test.json", 192)


@pytest.mark.parametrize("case", XCHACHA_24[::3], ids=lambda c: str(c["tcId"]))
def test_wycheproof_xchacha20poly1305(case: dict[str, Any]) -> None:
    key, nonce = bytes.fromhex(case["key"]), bytes.fromhex(case["iv"])
    aad, msg = bytes.fromhex(case["aad"]), bytes.fromhex(case["msg"])
    sealed = bytes.fromhex(case["ct"] + case["tag"])
    if case["result"] == "valid":
        assert crypto.xaead_encrypt(key, nonce, msg, aad) == sealed
        assert crypto.xaead_decrypt(key, nonce, sealed, aad) == msg
    else:
        with pytest.raises(AuthenticationFailed):
            crypto.xaead_decrypt(key, nonce, sealed, aad)


def test_xchacha_invalid_cases_all_fail() -> None:
    invalid = [c for c in XCHACHA_24 if c["result"] == "invalid"]
    assert len(invalid) == 60
    for case in invalid:
        with pytest.raises(AuthenticationFailed):
            crypto.xaead_decrypt(
                bytes.fromhex(case["key"]),
                bytes.fromhex(case["iv"]),
                bytes.fromhex(case["ct"] + case["tag"]),
                bytes.fromhex(case["aad"]),
            )


@given(data=st.binary(max_size=80))
def test_xaead_decrypt_garbage_raises_only_authentication_failed(data: bytes) -> None:
    with pytest.raises(AuthenticationFailed):
        crypto.xaead_decrypt(bytes(32), bytes(24), data, b"ad")


# --- X25519 -------------------------------------------------------------------------------------


def test_rfc7748_example() -> None:
    v = load("x25519/rfc7748-6.1.json")
    a_priv, b_priv = bytes.fromhex(v["alice_private"]), bytes.fromhex(v["bob_private"])
    a_pub, b_pub = bytes.fromhex(v["alice_public"]), bytes.fromhex(v["bob_public"])
    assert crypto.public_from_private(a_priv) == a_pub
    assert crypto.public_from_private(b_priv) == b_pub
    shared = bytes.fromhex(v["shared"])
    assert crypto.dh(a_priv, b_pub) == shared
    assert crypto.dh(b_priv, a_pub) == shared


X25519_CASES = wycheproof_cases("x25519/wycheproof-x25519_test.json")
ZERO_SHARED = [c for c in X25519_CASES if c["shared"] == "00" * 32]


def test_x25519_vector_counts() -> None:
    assert len(X25519_CASES) == 518
    assert len(ZERO_SHARED) >= 10


@pytest.mark.parametrize("case", X25519_CASES, ids=lambda c: str(c["tcId"]))
def test_wycheproof_x25519_through_dh(case: dict[str, Any]) -> None:
    private, public = bytes.fromhex(case["private"]), bytes.fromhex(case["public"])
    shared = bytes.fromhex(case["shared"])
    if shared == bytes(32):
        with pytest.raises(AuthenticationFailed):
            crypto.dh(private, public)
    else:
        assert crypto.dh(private, public) == shared


def test_generate_private_is_clamped_and_uses_randbytes() -> None:
    calls: list[int] = []

    def randbytes(n: int) -> bytes:
        calls.append(n)
        return b"\xff" * n

    key = crypto.generate_private(randbytes)
    assert calls == [32]
    assert key[0] == 0xF8
    assert key[31] == 0x7F
    assert key[1:31] == b"\xff" * 30


def test_all_zero_dh_error_is_a_remote_protocol_error() -> None:
    with pytest.raises(RemoteProtocolError):
        crypto.dh(bytes(range(32)), bytes(32))


# --- TAI64N -------------------------------------------------------------------------------------

TAI64N_VECTORS = load("tai64n/wireguard-tai64n.json")["vectors"]


@pytest.mark.parametrize("vector", TAI64N_VECTORS, ids=lambda v: str(v["unix_seconds"]))
def test_tai64n_from_parts(vector: dict[str, Any]) -> None:
    got = crypto.tai64n_from_parts(vector["unix_seconds"], vector["nanoseconds_in"])
    assert got.hex() == vector["tai64n_hex"]


@pytest.mark.parametrize(
    ("wall", "expected"),
    [
        (0.0, "400000000000000a00000000"),
        (0.123456789, "400000000000000a07000000"),
        (1767225600.0, "400000006955b90a00000000"),
        (1767225600.5, "400000006955b90a1d000000"),  # 500 ms = 0x1dcd6500 -> 0x1d000000
        (1767225600.999999, "400000006955b90a3b000000"),
    ],
)
def test_tai64n_from_wall_clock(wall: float, expected: str) -> None:
    got = crypto.tai64n(wall)
    assert len(got) == 12
    assert got.hex() == expected


def test_tai64n_is_monotonic_in_coarse_steps() -> None:
    base = 1_700_000_000.0
    stamps = [crypto.tai64n(base + i * 0.02) for i in range(100)]
    assert stamps == sorted(stamps)
    # Whitening: 2**24 ns is about 16.8 ms, so 20 ms steps always produce a newer stamp.
    assert len(set(stamps)) == len(stamps)
    assert crypto.tai64n(base + 0.001) == crypto.tai64n(base)
