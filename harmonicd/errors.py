"""The one error tree of Harmonic.

Every failure a user can meet is a :class:`HarmonicError`; the CLI prints
``str(error)`` as the single line on stderr and exits with ``exit_code``.
Nothing else should escape to the user as a traceback.

    HarmonicError                    exit 1
    ├── UsageError                   exit 2   wrong arguments or command for this role
    ├── DaemonNotRunning             exit 3
    ├── ConfigError                  exit 1   config file missing, unreadable or invalid (names the key)
    ├── StartupError                 exit 1   the daemon cannot start here (socket path taken)
    ├── StoreError                   exit 1   local state
    │   ├── IntegrityError                    an object or deployed file does not match its hash
    │   ├── DiskFullError                     ENOSPC: says how much space is needed
    │   │   └── NoRoom                        a pack's header alone would exceed its budget: nothing written
    │   └── StateError                        state folder missing, wrong format version, …
    ├── PackError                    exit 1   a pack (file on a stick, or HTTP body) is refused
    │   ├── Misaddressed                      for another server (left alone)
    │   ├── TruncatedPack                     cut short (stick pulled mid-write)
    │   ├── CorruptPack                       checksum, hash, framing or size limits violated
    │   ├── UntrustedPack                     signed by a key this server does not trust
    │   │   └── EnrollmentRefused             a first contact whose enrollment token is refused
    │   ├── ReplayedRequest                   an online request already answered (a copy sent again)
    │   └── UnsafeName                        a tree name that could escape or collide
    ├── StickError                   exit 1   the stick itself failed the visit
    │   ├── NotPrepared                       no HARMONIC/ folder and no consent: nothing written
    │   ├── StickRemoved                      gone mid-visit (ENOTCONN, EIO, ENODEV, ...)
    │   └── StickUnreliable                   read-back differs from what was written
    ├── TrustError                   exit 1   a release that must not be accepted
    │   ├── BadSignature
    │   ├── Equivocation                      same seq, other content
    │   ├── ChainError                        the master's key chain refused (core/trust.py)
    │   │   ├── ChainGap                      a link missing ("link N missing")
    │   │   ├── ChainSignature                a link not signed by the previous root, or not by its own
    │   │   ├── ChainFork                     a link other than the one held for that version
    │   │   └── ChainRollback                 signed by a retired signing key
    │   └── LeaseError                        a laptop's lease refused (core/lease.py)
    ├── BundleError                  exit 1   a bootstrap bundle refused (tampered, expired, not ours)
    └── (RollbackIgnored is a warning, not an error: see exchange)

The daemon (harmonicd) exits 78 (EX_CONFIG) instead for ConfigError,
StartupError and StateError at start-up, so systemd does not restart it in
a loop (RestartPreventExitStatus=78 in the unit).

Messages are built where the error is raised, so they can name the file and
the reason; the class says which family it is for callers and tests.
"""

from __future__ import annotations


class HarmonicError(Exception):
    """Harmonic failed."""

    exit_code = 1


class UsageError(HarmonicError):
    """Wrong usage."""

    exit_code = 2


class DaemonNotRunning(HarmonicError):
    """The daemon is needed and is not running."""

    exit_code = 3


class ConfigError(HarmonicError):
    """The configuration is missing or invalid."""


class StartupError(HarmonicError):
    """The daemon cannot start here (its socket path is taken, say): retrying will not help."""


class StoreError(HarmonicError):
    """The local store could not do what was asked."""


class IntegrityError(StoreError):
    """Stored data does not match its hash."""


class DiskFullError(StoreError):
    """The disk is full."""


class NoRoom(DiskFullError):
    """Not even a pack's header fits in the room it was given: nothing was written."""


class StateError(StoreError):
    """The state folder is missing or in an unexpected format."""


class PackError(HarmonicError):
    """A pack was refused."""


class Misaddressed(PackError):
    """The pack is for another server (left alone, not an error in a shared folder)."""


class TruncatedPack(PackError):
    """The pack is incomplete."""


class CorruptPack(PackError):
    """The pack is damaged."""


class UntrustedPack(PackError):
    """The pack is signed by a key this server does not trust."""


class EnrollmentRefused(UntrustedPack):
    """A school's first pack proves no live enrollment token for its id and key."""


class ReplayedRequest(PackError):
    """An online request pack that was taken before: a copy, not a new sync."""


class UnsafeName(PackError):
    """A file name is unsafe."""


class StickError(HarmonicError):
    """A visit of a stick failed because of the stick."""


class NotPrepared(StickError):
    """The stick holds no HARMONIC/ folder and nobody consented to writing one."""

    def __init__(self, folder: str) -> None:
        super().__init__(f"{folder}: not prepared for Harmonic; nothing written "
                         f"(`harmonicctl stick prepare {folder}`, or [media] adopt_blank = true)")


class StickRemoved(StickError):
    """The stick went away during the visit: nothing in flight was marked done."""

    def __init__(self, during: str) -> None:
        super().__init__(f"the stick was removed during {during}; nothing was marked done: insert it again")


class StickUnreliable(StickError):
    """Read back past the page cache, the stick did not return what was written to it."""


class TrustError(HarmonicError):
    """A release was refused."""


class BadSignature(TrustError):
    """A signature does not verify."""


class Equivocation(TrustError):
    """Two different releases carry the same sequence number."""


class ChainError(TrustError):
    """The master's key chain offered is refused (core/trust.py): not for this
    master, malformed, or too long."""


class ChainGap(ChainError):
    """A link of the key chain is missing between the version held and the newest offered."""


class ChainSignature(ChainError):
    """A link is not signed by the previous root key, or not by its own new root key."""


class ChainFork(ChainError):
    """A link differs from the one held for the same version (or from another offered)."""


class ChainRollback(ChainError):
    """Signed by a signing key the chain has retired: older than what this server trusts."""


class LeaseError(TrustError):
    """A laptop's lease is not one to serve or accept: unreadable, not signed by
    the master's current key, for another school or laptop, or not valid now.
    ``reason``: a code for programs (docs/http-api.md, GET /v1/lease/SERIAL)."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class BundleError(HarmonicError):
    """A bootstrap bundle is refused: damaged, tampered with, expired, or not for this use."""
