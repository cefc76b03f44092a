"""Download an image's layer blobs concurrently into spool files, ahead of the flattener.

Flattening takes layers one after the other (top-most first), and the
squashfs writer behind it is the slower party on a fast network; but one
connection to a registry rarely fills the link, and layers fetched one at a
time leave it idle while a layer is flattened. So the blobs are downloaded
by a few threads at once (bounded: `parallel`, like docker's and
containerd's 3), in the order they will be read, each into its own file
next to the image being written; the flattener reads a layer from its file
as it grows, so it can start on a layer before its download ends.

Memory stays bounded (a chunk per download); the disk used by layers
downloaded but not read yet is bounded by `ahead` bytes (the next layer to
be read is always fetched). Each spool file is removed once its layer has
been read, and every one of them when the conversion ends, whichever way.
Spool files are created 0600 with O_EXCL; their names start with the name of
the image's temporary file, so a crashed conversion's are swept with it.

Digests: a blob's download verifies its digest and size at its end
(digests.VerifyingReader; image.Layer.open) and, from a registry, resumes
after interruptions (registry/blobstream.py); a reader of the spool sees the download's error (a digest
mismatch, a registry that kept failing, a cancelled pull) instead of the
end of the file, so nothing unverified passes as a complete layer.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from . import cancel
from .errors import Cancelled, CacheError, NoSpace
from .image import Layer
from .registry.manifest import Descriptor

CHUNK = 256 << 10
#: downloads at once (docker's and containerd's default is 3)
DEFAULT_PARALLEL = 3
#: bytes of layers downloaded ahead of the one being read, at most
DEFAULT_AHEAD = 8 << 30
_POLL = 0.5


class Spool:
    """One blob being downloaded into a file; readers follow it as it grows."""

    def __init__(self, index: int, desc: Descriptor, path: Path):
        self.index = index
        self.desc = desc
        self.path = path
        self.written = 0
        self.done = False
        self.error: Optional[BaseException] = None
        self.started = False
        self.cond = threading.Condition()

    def wait(self, offset: int, check: Callable[[], None]) -> int:
        """Block until more than `offset` bytes are written or the download ended; return how
        many are written (== offset: the verified end). Raises the download's error, or
        what check() raises (it is called every _POLL seconds while waiting)."""
        with self.cond:
            while True:
                if self.error is not None:
                    raise self.error
                if self.written > offset or self.done:
                    return self.written
                self.cond.wait(_POLL)
                check()

    def verdict(self, check: Callable[[], None], wait: Optional[float] = None
                ) -> Optional[BaseException]:
        """Wait for the download to end (at most `wait` seconds, if given); its error, or
        None when the blob was verified or is not downloaded yet."""
        deadline = None if wait is None else time.monotonic() + wait
        with self.cond:
            while self.error is None and not self.done:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                self.cond.wait(_POLL)
                check()
            return self.error

    def _update(self, written: int = 0, done: bool = False,
                error: Optional[BaseException] = None) -> None:
        with self.cond:
            self.written += written
            self.done = self.done or done
            if error is not None and self.error is None:
                self.error = error
            self.cond.notify_all()


class Prefetcher:
    """Fetch `layers` (in the order they will be read) into spool files named base + suffix.

    on_bytes(n) hears of downloaded bytes, on_retry(message) of interruptions
    (both from the download threads). Use as a context manager; close()
    stops what is still downloading and removes every spool file.
    """

    def __init__(self, layers: Sequence[Layer], base: Path, *,
                 parallel: int = DEFAULT_PARALLEL, ahead: int = DEFAULT_AHEAD,
                 on_bytes: Optional[Callable[[int], None]] = None,
                 on_retry: Optional[Callable[[str], None]] = None):
        self.layers = list(layers)
        self.spools: List[Spool] = [
            Spool(i, layer.descriptor, base.with_name(f"{base.name}.layer{i}"))
            for i, layer in enumerate(self.layers)]
        self.parallel = max(1, parallel)
        self.ahead = ahead
        self.on_bytes, self.on_retry = on_bytes, on_retry
        # Cancelled with the work (a client gone, the daemon stopping) or by close():
        # the downloads' sockets are shut at once (registry transport).
        self.token = cancel.CancelToken()
        self._parent = cancel.current()
        self._unlink_parent = self._parent.on_cancel(
            lambda: self.token.cancel(self._parent.reason))
        self._lock = threading.Condition()
        self._next = 0          # next spool to start
        self._reading = 0       # the spool being read (always allowed to start)
        self._threads: List[threading.Thread] = []
        self._closed = False

    def __enter__(self) -> "Prefetcher":
        for n in range(min(self.parallel, len(self.spools))):
            t = threading.Thread(target=self._worker, name=f"layer-fetch-{n}", daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the reader's side -----------------------------------------------------

    def reading(self, index: int) -> Spool:
        """The reader moves on to spool `index` (the ones before it are done with)."""
        with self._lock:
            for s in self.spools[self._reading:index]:
                _unlink(s.path)
            self._reading = index
            self._lock.notify_all()
        return self.spools[index]

    def check(self) -> None:
        """Raise Cancelled once the work is cancelled (or this fetcher closed)."""
        if self.token.cancelled:
            raise Cancelled(self.token.reason or "cancelled")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self.token.cancel("the conversion ended")
        for t in self._threads:
            t.join()
        self._unlink_parent()
        for s in self.spools:
            _unlink(s.path)

    # -- downloads -------------------------------------------------------------

    def _claim(self) -> Optional[Spool]:
        with self._lock:
            while not self._closed and self._next < len(self.spools):
                s = self.spools[self._next]
                pending = sum(p.desc.size for p in self.spools[self._reading + 1:self._next])
                if self._next <= self._reading or pending + s.desc.size <= self.ahead:
                    self._next += 1
                    s.started = True
                    return s
                self._lock.wait(_POLL)
            return None

    def _worker(self) -> None:
        with cancel.scope(self.token):
            while True:
                s = self._claim()
                if s is None:
                    return
                try:
                    self._download(s)
                except BaseException as e:  # noqa: BLE001 - handed to the reader
                    if self.token.cancelled and not isinstance(e, Cancelled):
                        e = Cancelled(self.token.reason or "cancelled")
                    s._update(error=e)

    def _download(self, s: Spool) -> None:
        fd = _create(s.path)
        # One buffer per download, reused: reads come in pieces of at most 64 KiB
        # (registry client), each written as it arrives.
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            with self.layers[s.index].open(on_bytes=self.on_bytes,
                                           on_retry=self.on_retry) as src:
                while True:
                    if self.token.cancelled:
                        raise Cancelled(self.token.reason)
                    n = src.readinto(buf)
                    if not n:
                        break  # the digest and size are verified by now
                    _write_all(fd, view[:n])
                    s._update(written=n)
        except OSError as e:
            raise _disk_error(s.path, e) from None
        finally:
            os.close(fd)
        s._update(done=True)


def _create(path: Path) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise _disk_error(path, e) from None


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _disk_error(path: Path, e: OSError):
    if e.errno in (28, 122):  # ENOSPC, EDQUOT
        return NoSpace(f"no space left for the layer downloads next to {path.parent}",
                       hint="free space or set a smaller cache quota")
    return CacheError(f"cannot write the layer download {path}: {e.strerror or e}")


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
