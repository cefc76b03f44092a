"""Content digests: strict validation and verification while streaming.

Digests end up as file name components in the cache, so only the two
algorithms the OCI image spec registers are accepted, in their canonical
lowercase hex form: nothing else can smuggle a '/' or '..' into a path.
"""

from __future__ import annotations

import hashlib
import io
import re
from typing import Callable, Optional, Type

from .errors import DigestMismatch, InvalidArgument, OciImageError

_DIGEST_RE = re.compile(r"^(?:sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")

ALGORITHMS = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


def _shorten(text: str, limit: int = 80) -> str:
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[:limit] + "..."


def is_valid_digest(s: object) -> bool:
    return isinstance(s, str) and bool(_DIGEST_RE.fullmatch(s))


def validate_digest(s: object, *, what: str = "digest",
                    error: Type[OciImageError] = InvalidArgument) -> str:
    """Return s if it is a canonical sha256/sha512 digest, else raise `error`."""
    if is_valid_digest(s):
        return s  # type: ignore[return-value]
    shown = _shorten(str(s)) if isinstance(s, str) else type(s).__name__
    raise error(f"invalid {what} '{shown}': expected sha256:<64 lowercase hex> "
                f"or sha512:<128 lowercase hex>")


def hasher_for(digest: str):
    """A fresh hashlib object for the algorithm of `digest` (validated)."""
    algorithm = validate_digest(digest).split(":", 1)[0]
    return ALGORITHMS[algorithm]()


def digest_bytes(data: bytes, algorithm: str = "sha256") -> str:
    if algorithm not in ALGORITHMS:
        raise InvalidArgument(f"unsupported digest algorithm '{_shorten(algorithm)}'")
    return f"{algorithm}:{ALGORITHMS[algorithm](data).hexdigest()}"


def digest_hex(digest: str) -> str:
    """The hex part of a validated digest (the safe file name component)."""
    return validate_digest(digest).split(":", 1)[1]


class VerifyingReader(io.RawIOBase):
    """Wrap a binary stream; hash what is read and check it at EOF.

    The check happens when the wrapped stream reports EOF, so a consumer that
    reads to the end (as every layer consumer must) cannot miss a mismatch.
    Reading beyond `size` fails immediately rather than at EOF, so a hostile
    server cannot make us consume an unbounded stream.
    """

    def __init__(self, raw, digest: str, size: Optional[int] = None, *,
                 name: str = "", on_bytes: Optional[Callable[[int], None]] = None):
        super().__init__()
        self._raw = raw
        self.expected_digest = validate_digest(digest)
        self.expected_size = size
        self._hash = hasher_for(digest)
        self._count = 0
        self._name = name or self.expected_digest
        self._on_bytes = on_bytes
        self._eof = False
        self.verified = False

    @property
    def bytes_read(self) -> int:
        return self._count

    def readable(self) -> bool:
        return True

    def _read_some(self, n: int) -> bytes:
        if self._eof:
            return b""
        if self.expected_size is not None:
            # one byte beyond the expected size is enough to detect an overlong stream
            n = min(n, max(self.expected_size - self._count, 0) + 1)
        chunk = self._raw.read(n)
        if chunk is None:  # non-blocking raw streams; not expected here
            return b""
        if not chunk:
            self._finish()
            return b""
        self._count += len(chunk)
        if self.expected_size is not None and self._count > self.expected_size:
            self._eof = True
            raise DigestMismatch(f"{self._name}: received more than the expected "
                                 f"{self.expected_size} bytes")
        self._hash.update(chunk)
        if self._on_bytes is not None:
            self._on_bytes(len(chunk))
        return chunk

    def _finish(self) -> None:
        self._eof = True
        if self.expected_size is not None and self._count != self.expected_size:
            raise DigestMismatch(f"{self._name}: received {self._count} bytes, "
                                 f"expected {self.expected_size}")
        algorithm = self.expected_digest.split(":", 1)[0]
        actual = f"{algorithm}:{self._hash.hexdigest()}"
        if actual != self.expected_digest:
            raise DigestMismatch(f"{self._name}: content digest is {actual}, "
                                 f"expected {self.expected_digest}")
        self.verified = True

    def readinto(self, b) -> int:
        chunk = self._read_some(len(b))
        b[:len(chunk)] = chunk
        return len(chunk)

    def read(self, n: int = -1) -> bytes:
        # Fill the request like a buffered file does: consumers such as
        # tarfile treat a short read as truncation.
        if n is None or n < 0:
            return self.readall()
        parts = []
        want = n
        while want > 0:
            chunk = self._read_some(want)
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
        return b"".join(parts)

    def readall(self) -> bytes:
        parts = []
        while True:
            chunk = self._read_some(1 << 20)
            if not chunk:
                return b"".join(parts)
            parts.append(chunk)

    def close(self) -> None:
        try:
            close = getattr(self._raw, "close", None)
            if close is not None:
                close()
        finally:
            super().close()
