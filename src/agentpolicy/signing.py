"""Approvers' Ed25519 keys and signed votes (the ``signing`` extra: ``cryptography``).

An approver keeps a private key in a file (:class:`SigningKey`); the store
keeps only public keys (``ed25519:<base64url of 32 bytes>``), so nothing in
it can forge a vote. A signed vote is a signature over :func:`vote_message`,
a short text that names the store, the approval, the approver, the decision,
the time and the comment, so it can never be used for another of any of them.

Importing this module imports no cryptography library: the key classes and
:func:`verify_vote` load ``cryptography`` on first use, and say which extra
to install when it is missing. Formats are described in ``docs/approvals.md``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentpolicy._checks import person, type_name
from agentpolicy.errors import ErrorCode, PolicyError, PolicyValidationError, Problem

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "PUBLIC_KEY_PREFIX",
    "SIGNATURE_WINDOW",
    "SIGNING_EXTRA",
    "VOTE_DOMAIN",
    "SigningKey",
    "normal_public_key",
    "public_key_problems",
    "signature_problems",
    "verify_vote",
    "vote_message",
]

PUBLIC_KEY_PREFIX = "ed25519:"
"""How a public key's text starts; the rest is the base64url of its 32 bytes."""

SIGNATURE_WINDOW = timedelta(minutes=5)
"""How far a signed vote's timestamp may be from the engine's clock, either way."""

VOTE_DOMAIN = "agentpolicy-vote-v1"
"""The first line of every vote message: no signature made for anything else matches."""

SIGNING_EXTRA = "pip install 'agentpolicy[signing]'"
"""What to run when the ``cryptography`` library is missing."""

_MAX_SIGNATURE = 128
_MAX_KEY_FILE = 64 * 1024  # an Ed25519 PEM is about 120 bytes
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _unbase64(text: str) -> bytes | None:
    """base64url (or standard base64), with or without padding; ``None`` if it is not."""
    if not text or len(text) > 4 * _MAX_SIGNATURE:
        return None
    core = text.rstrip("=")
    try:
        return base64.b64decode(core + "=" * (-len(core) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        try:
            return base64.b64decode(core + "=" * (-len(core) % 4), validate=True)
        except (binascii.Error, ValueError):
            return None


def _base64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def public_key_problems(text: object, path: str) -> list[Problem]:
    """Problems of a public key's text (``ed25519:`` and the base64url of 32 bytes)."""
    if not isinstance(text, str):
        return [Problem(path, f"must be a string, not {type_name(text)}")]
    raw = _unbase64(text[len(PUBLIC_KEY_PREFIX) :]) if text.startswith(PUBLIC_KEY_PREFIX) else None
    if raw is None or len(raw) != 32:
        return [
            Problem(
                path,
                "must be an Ed25519 public key: 'ed25519:' and the base64url of its 32 bytes "
                "(as `agentpolicy approver keygen` prints it)",
            )
        ]
    if not _sound_point(raw):
        return [
            Problem(
                path,
                "is not an Ed25519 public key anyone holds the private key of (not a point of "
                "the curve in its one encoding, or of small order: a signature made without "
                "any key would verify with it)",
            )
        ]
    return []


_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _sound_point(raw: bytes) -> bool:
    """Whether ``raw`` encodes a curve point canonically, and not one of the 8 of small order.

    OpenSSL verifies against a small-order key: with the identity point, one
    fixed signature (R the identity, S zero) verifies for every message, so
    whoever registered such a key could be voted for by anyone. Decoding
    follows RFC 8032, 5.1.3; a point of small order is one that 8 times
    itself (three doublings) makes the identity.
    """
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= _P:  # a second encoding of y - p
        return False
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return False  # not on the curve
    if x == 0 and sign:
        return False  # a second encoding of x = 0
    if x & 1 != sign:
        x = _P - x
    for _ in range(3):  # (x, y) doubled: -x^2 + y^2 = 1 + d x^2 y^2
        xy = x * y % _P
        dxxyy = _D * xy * xy % _P
        x, y = (
            2 * xy * pow(1 + dxxyy, _P - 2, _P) % _P,
            (y * y + x * x) * pow(1 - dxxyy, _P - 2, _P) % _P,
        )
    return (x, y) != (0, 1)


def normal_public_key(text: str, path: str = "$.publicKey") -> str:
    """The canonical text of a public key (unpadded base64url); raises ``INVALID_INPUT``."""
    problems = public_key_problems(text, path)
    if problems:
        raise PolicyValidationError(problems)
    raw = _unbase64(text[len(PUBLIC_KEY_PREFIX) :])
    assert raw is not None  # noqa: S101 - checked just above
    return PUBLIC_KEY_PREFIX + _base64(raw)


def signature_problems(text: object, path: str) -> list[Problem]:
    """Problems of a signature's text (the base64url of 64 bytes)."""
    if not isinstance(text, str):
        return [Problem(path, f"must be a string, not {type_name(text)}")]
    raw = _unbase64(text) if len(text) <= _MAX_SIGNATURE else None
    if raw is None or len(raw) != 64:
        return [Problem(path, "must be an Ed25519 signature: the base64url of 64 bytes")]
    return []


def vote_message(
    *,
    store: str,
    approval_id: str,
    approver: str,
    decision: str,
    signed_at: datetime,
    comment: str | None = None,
) -> bytes:
    r"""The exact bytes an approver signs to vote (UTF-8, lines joined by ``\n``)::

        agentpolicy-vote-v1
        store:<the store's id>
        approval:<approval id>
        approver:<approver name, case-folded>
        decision:<approve or deny>
        at:<signed_at as whole Unix seconds>
        comment:<hex SHA-256 of the comment's UTF-8 bytes, or - without one>

    No field can hold a line break (ids and names are identifiers), so the
    message is unambiguous.
    """
    if signed_at.utcoffset() is None:
        raise PolicyValidationError.single("$.signedAt", "must be a timezone-aware instant")
    try:
        digest = "-" if comment is None else hashlib.sha256(comment.encode()).hexdigest()
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" in JSON) has no UTF-8 bytes
        found = ord(exc.object[exc.start])
        raise PolicyValidationError.single(
            "$.comment",
            f"must be text that UTF-8 can encode, to be signed (found U+{found:04X}, half of a "
            "surrogate pair)",
        ) from None
    lines = (
        VOTE_DOMAIN,
        f"store:{store}",
        f"approval:{approval_id}",
        f"approver:{person(approver)}",
        f"decision:{decision}",
        f"at:{(signed_at - _EPOCH) // timedelta(seconds=1)}",
        f"comment:{digest}",
    )
    return "\n".join(lines).encode()


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: PLC0415
    except ImportError:
        raise PolicyError(
            f"approvers' keys and signed votes need the signing extra: {SIGNING_EXTRA}",
            code=ErrorCode.EXTRA_NOT_INSTALLED,
        ) from None
    return ed25519


def verify_vote(public_key: str, message: bytes, signature: str) -> bool:
    """Whether ``signature`` is the Ed25519 signature of ``message`` by ``public_key``.

    ``public_key`` and ``signature`` are in their text forms; any malformed
    one simply does not verify.
    """
    if public_key_problems(public_key, "$") or signature_problems(signature, "$"):
        return False
    ed25519 = _crypto()
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - with the extra

    raw_key = _unbase64(public_key[len(PUBLIC_KEY_PREFIX) :])
    raw_signature = _unbase64(signature)
    assert raw_key is not None  # noqa: S101 - checked above
    assert raw_signature is not None  # noqa: S101 - checked above
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(raw_key).verify(raw_signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


class SigningKey:
    """An approver's Ed25519 private key, kept in a file readable by its owner only.

    Files are PEM, PKCS#8, unencrypted (what ``openssl genpkey -algorithm
    ed25519`` writes). The key never appears in a repr.
    """

    __slots__ = ("_key",)

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        """A new random key."""
        return cls(_crypto().Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes, path: str = "$.key") -> SigningKey:
        """Read a PEM (PKCS#8) Ed25519 private key; anything else is ``INVALID_INPUT``."""
        ed25519 = _crypto()
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            why = "it is encrypted" if "encrypted" in str(exc).lower() else "not a PEM key"
            raise PolicyValidationError.single(
                path, f"is not an unencrypted Ed25519 private key ({why})"
            ) from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise PolicyValidationError.single(path, "is not an Ed25519 private key")
        return cls(key)

    @classmethod
    def load(cls, file: str | os.PathLike[str], path: str = "$.keyFile") -> SigningKey:
        """Read a key file; refuse one that others may read or write (as ssh does)."""
        where = Path(file)
        try:
            info = where.stat()
            if not stat.S_ISREG(info.st_mode):  # a pipe or a device could block or never end
                raise PolicyValidationError.single(path, f"{where} is not a regular file")
            with where.open("rb") as handle:
                pem = handle.read(_MAX_KEY_FILE + 1)
        except OSError as exc:
            raise PolicyValidationError.single(
                path, f"cannot read the key file {where}: {exc.strerror}"
            ) from None
        if len(pem) > _MAX_KEY_FILE:
            raise PolicyValidationError.single(
                path, f"{where} is larger than a key file ({_MAX_KEY_FILE // 1024} KiB at most)"
            )
        if sys.platform != "win32" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PolicyValidationError.single(
                path,
                f"the key file {where} is open to others (mode {stat.S_IMODE(info.st_mode):04o}): "
                f"chmod 600 {where}",
            )
        return cls.from_pem(pem, path)

    def pem(self) -> bytes:
        """The key as PEM (PKCS#8, unencrypted)."""
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save(self, file: str | os.PathLike[str], path: str = "$.file") -> None:
        """Write the key to a new file, mode 0600; an existing file is never overwritten."""
        where = Path(file)
        try:
            fd = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise PolicyValidationError.single(
                path, f"{where} exists: a key file is never overwritten"
            ) from None
        except OSError as exc:
            raise PolicyValidationError.single(
                path, f"cannot create {where}: {exc.strerror}"
            ) from None
        try:
            with os.fdopen(fd, "wb") as out:
                if sys.platform != "win32":
                    os.fchmod(out.fileno(), 0o600)  # whatever the umask
                out.write(self.pem())
        except OSError as exc:  # a full disk: no key, and no empty file that refuses a retry
            with contextlib.suppress(OSError):
                os.unlink(where)
            raise PolicyValidationError.single(
                path, f"cannot write {where}: {exc.strerror or exc}"
            ) from None

    @property
    def public_key(self) -> str:
        """The public key's text: ``ed25519:`` and the base64url of its 32 bytes."""
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

        raw = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PUBLIC_KEY_PREFIX + _base64(raw)

    def sign(self, message: bytes) -> str:
        """The signature of ``message``, as base64url (no padding)."""
        return _base64(self._key.sign(message))

    def __repr__(self) -> str:
        return f"SigningKey(public_key={self.public_key!r})"
