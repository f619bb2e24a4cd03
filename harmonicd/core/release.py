"""Signed releases: the only statements an owner makes about its collections.

A release binds ``(collection, owner, seq, root)``; ``for`` names the one
school a master collection is meant for (anti-theft leases). The owner signs
the canonical msgpack encoding of the record. A replica accepts a release
only if it verifies against the owner's pinned key, and only with a seq
higher than the one it holds (no rollback); the same seq with another root
is an equivocation and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from harmonicd.core import keys
from harmonicd.core.codec import pack_msg, unpack_msg
from harmonicd.core.objects import ID_LEN, ObjectId, short
from harmonicd.errors import BadSignature, CorruptPack

MAX_RELEASE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Release:
    collection: str
    owner: str
    seq: int
    root: ObjectId
    created: int  # unix seconds, by the owner's clock (informative only)
    size: int  # bytes of file content in the tree
    files: int
    target: str | None = None  # the one school this release is for, or None for all

    def encode(self) -> bytes:
        return pack_msg(
            {
                "v": 1,
                "collection": self.collection,
                "owner": self.owner,
                "seq": self.seq,
                "root": self.root,
                "created": self.created,
                "size": self.size,
                "files": self.files,
                "for": self.target,
            }
        )

    def label(self) -> str:
        return f"{self.owner}/{self.collection} release {self.seq} ({short(self.root)})"


@dataclass(frozen=True, slots=True)
class SignedRelease:
    release: Release
    body: bytes
    signature: bytes

    def verify(self, owner_key: bytes) -> None:
        if not keys.verify(owner_key, keys.TAG_RELEASE, self.body, self.signature):
            raise BadSignature(f"{self.release.label()}: signature does not verify against the owner's key")


def sign(release: Release, key: keys.SigningKey) -> SignedRelease:
    body = release.encode()
    return SignedRelease(release, body, key.sign(keys.TAG_RELEASE, body))


def _str(d: dict[str, object], k: str, limit: int = 128) -> str:
    v = d.get(k)
    if not isinstance(v, str) or not 0 < len(v) <= limit:
        raise CorruptPack(f"release record: field {k!r} is missing or not short text")
    return v


def _int(d: dict[str, object], k: str) -> int:
    v = d.get(k)
    if type(v) is not int or not 0 <= v < 1 << 63:
        raise CorruptPack(f"release record: field {k!r} is missing or not a non-negative integer")
    return v


def decode(body: bytes, signature: bytes) -> SignedRelease:
    """Parse a signed release from untrusted bytes (the signature is checked by the caller)."""
    if len(body) > MAX_RELEASE_BYTES:
        raise CorruptPack("release record is too large")
    if not isinstance(signature, bytes) or len(signature) != keys.SIG_LEN:
        raise CorruptPack("release record: signature is not 64 bytes")
    d = unpack_msg(body, max_items=32, what="release record")
    if not isinstance(d, dict) or d.get("v") != 1:
        raise CorruptPack("release record: unknown version")
    root = d.get("root")
    if not isinstance(root, bytes) or len(root) != ID_LEN:
        raise CorruptPack("release record: root is not a 32-byte id")
    target = d.get("for")
    if target is not None and not isinstance(target, str):
        raise CorruptPack("release record: 'for' is not text")
    from harmonicd.core.ident import check_collection, check_server_id

    rel = Release(
        collection=check_collection(_str(d, "collection"), exc=CorruptPack),
        owner=check_server_id(_str(d, "owner"), exc=CorruptPack),
        seq=_int(d, "seq"),
        root=root,
        created=_int(d, "created"),
        size=_int(d, "size"),
        files=_int(d, "files"),
        target=None if target is None else check_server_id(target, exc=CorruptPack),
    )
    if rel.seq < 1:
        raise CorruptPack("release record: seq must be at least 1")
    return SignedRelease(rel, body, signature)
