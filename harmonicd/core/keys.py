"""ed25519 keys and signatures, with a domain tag per use so a signature made
for one purpose (a release, a pack) can never be replayed as another."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PREFIX = "ed25519:"
SIG_LEN = 64
KEY_LEN = 32

TAG_RELEASE = b"harmonic/release/v1\x00"
TAG_PACK = b"harmonic/pack/v1\x00"
TAG_BUNDLE = b"harmonic/bundle/v1\x00"  # a bootstrap bundle, signed by the master (core/bundle.py)
TAG_REVOCATIONS = b"harmonic/revocations/v1\x00"  # the master's list of revoked school servers
TAG_LEASE = b"harmonic/lease/v1\x00"  # a laptop's anti-theft lease, signed by the master (core/lease.py)
TAG_CHAIN = b"harmonic/chain/v1\x00"  # a link of the master's key chain, signed by two root keys (core/trust.py)


class SigningKey:
    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("an ed25519 seed is 32 bytes")
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.public = self._key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate().private_bytes_raw())

    def seed(self) -> bytes:
        return self._key.private_bytes_raw()

    def sign(self, tag: bytes, message: bytes) -> bytes:
        return self._key.sign(tag + message)


def verify(public: bytes, tag: bytes, message: bytes, signature: bytes) -> bool:
    if len(public) != KEY_LEN or len(signature) != SIG_LEN:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, tag + message)
    except (InvalidSignature, ValueError):
        return False
    return True


def format_key(public: bytes) -> str:
    return PREFIX + public.hex()


def parse_key(text: str) -> bytes:
    """Parse a key as `harmonicctl key` prints it; ValueError names what is wrong."""
    text = text.strip()
    if not text.startswith(PREFIX):
        raise ValueError(f"key {text[:20]!r} does not start with {PREFIX!r}")
    try:
        raw = bytes.fromhex(text[len(PREFIX):])
    except ValueError as exc:
        raise ValueError(f"key {text[:20]!r}… is not hex") from exc
    if len(raw) != KEY_LEN:
        raise ValueError(f"key {text[:20]!r}… is not {KEY_LEN} bytes")
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ValueError(f"key {text[:20]!r}… is not a valid ed25519 key") from exc
    return raw
