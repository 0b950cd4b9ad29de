"""Self-signed TLS certificates: `agent derper --certmode self-signed` and `agent coordinator`."""

from __future__ import annotations

import datetime
import ipaddress
import re
from pathlib import Path

__all__ = ["make_self_signed"]


def make_self_signed(
    cert_dir: Path, hostname: str, *, program: str = "agent derper"
) -> tuple[Path, Path]:
    """(cert, key) paths `<cert_dir>/<hostname>.crt|.key`, generated once and reused after.

    The subject names `program` beside the hostname: a relay and a coordinator on one host
    both have certificates for its name, and a client trusting both in one CA file must not
    find the one when it looks for the issuer of the other (OpenSSL looks issuers up by
    subject; the key identifiers then tell the rest).

    The hostname keeps only [A-Za-z0-9.-] in file names, as derper's manual cert mode does
    (tailscale cmd/derper/cert.go).
    The certificate is an ECDSA P-256 self-signed leaf for `hostname` (IP or DNS SAN), valid a year.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    safe = re.sub(r"[^A-Za-z0-9.-]", "", hostname) or "derper"
    cert_path, key_path = cert_dir / f"{safe}.crt", cert_dir / f"{safe}.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    cert_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        san = x509.DNSName(hostname)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, program),
            x509.NameAttribute(NameOID.COMMON_NAME, hostname),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    key_path.touch(mode=0o600)
    key_path.write_bytes(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
