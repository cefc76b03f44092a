"""A blob's bytes as a stream: resumed with Range after a failed read, digest-verified.

The whole download, reconnects included, runs under one deadline and
minimum rate (deadlines.py, registered with the transport's watchdog from
the first connect to EOF or close). A read that fails (a reset, a stall
past the timeout, a short body) reconnects from the offset reached, with
the backoff and the try count of retry.py; a server that ignores Range is
read from the start and what was already had is skipped.
"""

from __future__ import annotations

import io
import logging
from typing import BinaryIO, Callable, Optional

import requests

from ..digests import VerifyingReader
from ..errors import OciImageError, RegistryProtocolError, RegistryUnavailable
from ..reference import Reference
from .auth import pull_scopes
from .chain import RegistryTransport
from .deadlines import STREAM_ERRORS
from .manifest import Descriptor, one_line
from .responses import describe
from .transport import WATCHDOG, watching

log = logging.getLogger("ociimage.registry")

READ_CHUNK = 64 << 10


class BlobStream(io.RawIOBase):
    """The raw bytes of a blob, reconnecting with Range after a failed read."""

    def __init__(self, transport: RegistryTransport, ref: Reference, descriptor: Descriptor,
                 on_retry: Optional[Callable[[str], None]] = None):
        super().__init__()
        self.on_retry = on_retry
        self.transport = transport
        self.ref = ref
        self.descriptor = descriptor
        self.scopes = pull_scopes(ref)
        self.path = f"/v2/{ref.path}/blobs/{descriptor.digest}"
        self.offset = 0
        self.resp: Optional[requests.Response] = None
        self.attempts = transport.backoff.attempts()
        self.reconnects = 0
        self._skip = 0
        self._eof = False
        # The whole download, reconnects included, under one deadline and rate check
        # (registered with the watchdog at the first connect, until EOF or close).
        self.transfer = transport.deadlines.transfer(
            f"the download of blob {descriptor.digest} from {ref.domain}/{ref.path}",
            blob_size=descriptor.size)
        self._watched = False

    def _unwatch(self) -> None:
        if self._watched:
            WATCHDOG.discard(self.transfer)
            self._watched = False

    def _check_abort(self) -> None:
        if self.transfer.expired():
            self._unwatch()
            raise self.transport.deadlines.abort_error(self.transfer)

    def readable(self) -> bool:
        return True

    def _connect(self) -> None:
        headers = {"Accept-Encoding": "identity"}
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        if not self._watched:
            WATCHDOG.add(self.transfer)
            self._watched = True
        try:
            with watching(self.transfer, register=False):
                resp = self.transport.request("GET", self.ref.domain, self.path, self.scopes,
                                              headers)
        except OciImageError:
            self._check_abort()
            raise
        status = resp.status_code
        if status == 206 and self.offset:
            content_range = resp.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {self.offset}-"):
                resp.close()
                raise RegistryProtocolError(f"registry {self.ref.domain} answered a range "
                                            f"request for {self.descriptor.digest} with the "
                                            f"wrong range")
        elif status == 200:
            # the server ignored Range: drop what we already have
            self._skip = self.offset
        elif status == 416 and self.offset >= self.descriptor.size:
            resp.close()
            self._eof = True
            return
        else:
            self.transport.raise_for(resp, self.ref.domain, self.scopes,
                                     f"blob {self.descriptor.digest} not found in "
                                     f"{self.ref.domain}/{self.ref.path}",
                                     f"the request for blob {self.descriptor.digest}")
        self.resp = resp

    def _failed(self, reason: str) -> None:
        if self.resp is not None:
            self.resp.close()
            self.resp = None
            self.transfer.detach()
        delay = self.attempts.next_delay()
        if delay is None:
            raise RegistryUnavailable(f"download of blob {self.descriptor.digest} from "
                                      f"{self.ref.domain}/{self.ref.path} kept failing: {reason}")
        self._check_abort()
        log.debug("blob %s: %s at offset %d; resuming in %.2fs", self.descriptor.digest,
                  reason, self.offset, delay)
        if self.on_retry is not None:
            self.on_retry(f"download from {self.ref.domain} interrupted ({one_line(reason, 120)}) "
                          f"at {self.offset >> 20} MiB of {self.descriptor.size >> 20} MiB; "
                          f"resuming in {delay:.0f}s (try {self.attempts.failures} of "
                          f"{self.attempts.limit})")
        self.reconnects += 1
        self.transport.deadlines.sleep(delay, self.transfer)

    def readinto(self, b) -> int:
        while True:
            if self._eof:
                return 0
            try:
                if self.resp is None:
                    self._connect()
                    if self._eof:
                        return 0
                assert self.resp is not None
                if self._skip:
                    junk = self.resp.raw.read(min(self._skip, READ_CHUNK), decode_content=True)
                    if not junk:
                        self._failed("premature end of stream")
                        continue
                    self._skip -= len(junk)
                    self.transfer.progress(len(junk))
                    continue
                # small reads: urllib3 discards a partly filled read when the
                # connection drops, and what was received is progress to keep
                chunk = self.resp.raw.read(min(len(b), READ_CHUNK), decode_content=True)
            except STREAM_ERRORS as e:
                self._check_abort()
                self._failed(describe(e))
                continue
            if not chunk:
                self._check_abort()
                if self.offset < self.descriptor.size:
                    self._failed("premature end of stream")
                    continue
                self._eof = True
                self._unwatch()
                self.resp.close()
                self.resp = None
                self.transfer.detach()
                return 0
            self.offset += len(chunk)
            self.transfer.progress(len(chunk))
            self.attempts.reset()
            b[:len(chunk)] = chunk
            return len(chunk)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 20
        buf = bytearray(n)
        got = self.readinto(buf)
        return bytes(buf[:got])

    def close(self) -> None:
        self._unwatch()
        if self.resp is not None:
            self.resp.close()
            self.resp = None
        self.transfer.detach()
        super().close()


def open_blob(transport: RegistryTransport, ref: Reference, descriptor: Descriptor,
              on_bytes: Optional[Callable[[int], None]] = None,
              on_retry: Optional[Callable[[str], None]] = None) -> BinaryIO:
    """A verified stream of a blob; resumes with Range after connection trouble.

    The digest/size check happens when the stream is read to its end:
    read it to EOF before trusting what was read. on_retry(message) hears
    of each interruption (a stall past the timeout, a reset, a short
    body) before the download resumes, so a user can be told.
    """
    stream = BlobStream(transport, ref, descriptor, on_retry=on_retry)
    return VerifyingReader(stream, descriptor.digest, descriptor.size,  # type: ignore
                           name=f"blob {descriptor.digest} of {ref.familiar()}",
                           on_bytes=on_bytes)
