"""Decompress a layer in a child process, with the fastest inflater installed.

Inflating gzip was the serial bottleneck of a conversion: zlib inflates at
about 130 MB/s of output per core here, and in this process it also
competes with the tar parsing for the GIL. ISA-L's `igzip` (Debian package
`isal`: 2.30 in Debian 12, 2.31 in 13 and unstable) inflates 3-4 times
faster (measured here: 12 s of CPU for 5.7 GB of tar, gzip 47 s) and `pigz`
(Debian 12, 13, unstable, EPEL; a separate thread for reading, writing and
the CRC) a little faster than zlib; both run as a child process on another core,
reading the layer's spool file directly (sendfile) and writing the tar
into a pipe this process reads with one copy. zstd layers go through
`zstd -dc` the same way. Where none of them is installed the layer is
decompressed in a thread of this process (layers.LayerReader, the
behaviour before): slower, the same result.

python-isal would inflate as fast in-process, but Debian 12 does not
package it (python3-isal is in 13 and unstable only), zlib-ng's Python
binding is in none of them, and the child process also takes the work off
this process's GIL.

Strictness, as for the in-process reader: a truncated or corrupt stream is
CorruptLayer (the tool's exit status), more output than the layer's bound
is LimitExceeded (decompression bombs), and the layer is only complete once
its download has verified the blob's digest; the download's error (a digest
mismatch, say) wins over the tool's complaint about the cut stream it
caused. Unlike layers.LayerReader, igzip and pigz ignore data after the
last gzip member; that data is covered by the verified digest and never
reaches the image.
"""

from __future__ import annotations

import collections
import fcntl
import io
import os
import shutil
import subprocess
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .errors import Cancelled, CorruptLayer, LimitExceeded
from .fetch import Spool
from .layers import GZIP, TAR, ZSTD, ReadAhead, LayerReader

#: compression -> the tools tried, best first (argv; the input on stdin, the tar on stdout)
TOOLS: Dict[str, Sequence[Tuple[str, ...]]] = {
    GZIP: (("igzip", "-d", "-c"), ("pigz", "-d", "-c")),
    ZSTD: (("zstd", "-d", "-c", "-q"),),
}
_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20
_CHUNK = 1 << 20


# The inflater parses bytes straight from a registry anyone may name: as nobody, with
# pipes only (it opens nothing), so a bug in it is not a root exploit. Through setpriv(1)
# (util-linux), not Popen(user=...): that makes CPython fork() instead of vfork(), and a
# fork() from a gRPC thread waits forever in grpc's fork handler ("Waiting for thread
# pool to idle before forking", grpcio >= 1.5x on Debian 13).
_NOBODY = "65534"
_CHILD_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}


def _as_nobody(argv: List[str]) -> Optional[List[str]]:
    """argv run as nobody with no groups; None if that cannot be done here (as root)."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv", path=_CHILD_ENV["PATH"])
    if setpriv is None:
        return None
    return [setpriv, f"--reuid={_NOBODY}", f"--regid={_NOBODY}", "--clear-groups",
            "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--pdeathsig=KILL",
            "--", *argv]


def find_tool(compression: str, tools: Optional[Dict[str, Sequence[Tuple[str, ...]]]] = None
              ) -> Optional[List[str]]:
    """argv of the child decompressor for `compression`, or None (decompress in-process)."""
    if os.geteuid() == 0 and shutil.which("setpriv", path=_CHILD_ENV["PATH"]) is None:
        return None  # never as root: the in-process inflater instead
    for argv in (TOOLS if tools is None else tools).get(compression, ()):
        path = shutil.which(argv[0])
        if path:
            return [path, *argv[1:]]
    return None


def inflater_name(compression: str, tools=None) -> str:
    """What decompresses `compression` layers here, e.g. "igzip" or "zlib (in-process)"."""
    if compression == TAR:
        return "none"
    argv = find_tool(compression, tools)
    if argv:
        return os.path.basename(argv[0])
    return "zlib (in-process)" if compression == GZIP else "zstandard (in-process)"


class SpoolReader(io.RawIOBase):
    """The bytes of a spool as they arrive; its end only once the download is verified.

    check() is called while waiting for bytes (it raises to give up, e.g. when
    the conversion was cancelled); abort() makes the next wait raise, from any
    thread. Only the thread that reads closes it (an fd closed under a
    reading thread could be reused by another file meanwhile).
    """

    def __init__(self, spool: Spool, check: Callable[[], None],
                 on_bytes: Optional[Callable[[int], None]] = None):
        super().__init__()
        self.spool, self.on_bytes = spool, on_bytes
        self._check = check
        self._aborted = threading.Event()
        self._f: Optional[io.FileIO] = None  # opened once the download has created it
        self.offset = 0

    def readable(self) -> bool:
        return True

    def abort(self) -> None:
        self._aborted.set()

    def check(self) -> None:
        if self._aborted.is_set():
            raise Cancelled("the layer is no longer read")
        self._check()

    def _avail(self) -> int:
        self.check()
        avail = self.spool.wait(self.offset, self.check) - self.offset
        if self._f is None:
            self._f = open(self.spool.path, "rb", buffering=0)
        return avail

    def readinto(self, b) -> int:
        avail = self._avail()
        if avail <= 0:
            return 0
        n = self._f.readinto(memoryview(b)[:avail])
        if not n:  # the file is shorter than written: cannot happen short of tampering
            raise CorruptLayer(f"layer download {self.spool.path} was truncated on disk")
        return self._advance(n)

    def sendfile(self, out_fd: int) -> int:
        """Send what is available (waiting for some) to out_fd; 0 at the verified end."""
        avail = self._avail()
        if avail <= 0:
            return 0
        n = os.sendfile(out_fd, self._f.fileno(), self.offset, min(avail, _CHUNK))
        if not n:
            raise CorruptLayer(f"layer download {self.spool.path} was truncated on disk")
        return self._advance(n)

    def _advance(self, n: int) -> int:
        self.offset += n
        if self.on_bytes is not None:
            self.on_bytes(n)
        return n

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        super().close()


class ChildInflater(io.RawIOBase):
    """A layer's tar, decompressed by `argv` in a child process fed from a SpoolReader."""

    def __init__(self, argv: List[str], source: SpoolReader, *, fmt: str, name: str,
                 max_bytes: Optional[int] = None):
        super().__init__()
        self.fmt, self.name, self.max_bytes = fmt, name, max_bytes
        self.tool = os.path.basename(argv[0])
        self.source = source
        self.bytes_out = 0
        self._stderr: "collections.deque[str]" = collections.deque(maxlen=5)
        self._feed_error: Optional[BaseException] = None
        self._finished = False
        run = _as_nobody(list(argv))
        if run is None:
            raise CorruptLayer(f"{name}: cannot run {self.tool} unprivileged (no setpriv)")
        try:
            self.proc = subprocess.Popen(run, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, bufsize=0, close_fds=True,
                                         env=_CHILD_ENV)
        except OSError as e:
            raise CorruptLayer(f"{name}: cannot start {self.tool}: {e.strerror or e}") from None
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:  # fewer, larger reads and writes; the default 64 KiB works too
                fcntl.fcntl(pipe.fileno(), _F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:
                pass
        self._out = self.proc.stdout
        self._feeder = threading.Thread(target=self._feed, name=f"{self.tool}-feed", daemon=True)
        self._errs = threading.Thread(target=self._read_stderr, name=f"{self.tool}-stderr",
                                      daemon=True)
        self._feeder.start()
        self._errs.start()

    def readable(self) -> bool:
        return True

    def _feed(self) -> None:
        fd = self.proc.stdin.fileno()
        try:
            while True:
                try:
                    if not self.source.sendfile(fd):
                        break
                except (BrokenPipeError, ConnectionResetError):
                    # The tool stopped reading. Failed: nothing more is read (a hostile
                    # blob can be as long as its manifest says; the reader stops the
                    # download). Done: what follows its stream is still read for the
                    # digest, as the in-process inflater does.
                    try:
                        failed = self.proc.wait(timeout=5) != 0
                    except subprocess.TimeoutExpired:
                        failed = True
                    if not failed:
                        buf = bytearray(_CHUNK)
                        while self.source.readinto(buf):
                            pass
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            self._feed_error = e
        finally:
            self.source.close()
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def _read_stderr(self) -> None:
        # in chunks, never by line: a child writing without newlines must not grow root's
        # memory; the last few lines are kept for the error message
        tail = b""
        while True:
            chunk = self.proc.stderr.read(4096)
            if not chunk:
                break
            tail = (tail + chunk)[-4096:]
        for line in tail.decode("utf-8", "replace").splitlines()[-5:]:
            if line.strip():
                self._stderr.append(line.strip())

    def readinto(self, b) -> int:
        if self._finished:
            return 0
        n = self._out.readinto(b)
        if n:
            self.bytes_out += n
            if self.max_bytes is not None and self.bytes_out > self.max_bytes:
                self.close()
                raise LimitExceeded(
                    f"{self.name} expands to more than {self.max_bytes} bytes "
                    "(decompression bomb?)", hint="raise the expansion limit only for an "
                                                  "image you trust")
            return n
        self._finish()
        return 0

    def _finish(self) -> None:
        self._finished = True
        rc = self.proc.wait()
        self._feeder.join()
        self._errs.join()
        if self._feed_error is not None:
            raise self._feed_error
        if rc != 0:
            why = self._stderr[-1] if self._stderr else f"exit status {rc}"
            raise CorruptLayer(f"{self.name}: corrupt or truncated {self.fmt} data ({why})",
                               hint="the blob is damaged; pull it again")

    def drain(self) -> int:
        """Read the rest to the tool's end and the blob's verified end; bytes skipped."""
        skipped = 0
        buf = bytearray(_CHUNK)
        while True:
            n = self.readinto(buf)
            if not n:
                break
            skipped += n
        return skipped

    def close(self) -> None:
        if not self.closed:
            self.source.abort()
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self._feeder.join()
            self._errs.join()
            self._out.close()
            self.proc.stderr.close()
        super().close()


class _SpooledReadAhead(ReadAhead):
    """ReadAhead over a SpoolReader: closing it stops the thread and closes the file."""

    def __init__(self, source: SpoolReader, inner: LayerReader):
        self._source = source
        super().__init__(inner)

    def _run(self, chunk: int) -> None:
        try:
            super()._run(chunk)
        finally:
            self._source.close()

    def close(self) -> None:
        self._source.abort()
        super().close()
        self._thread.join()


def open_spooled_layer(spool: Spool, compression: str, *, check: Callable[[], None],
                       on_bytes: Optional[Callable[[int], None]], name: str,
                       max_bytes: Optional[int] = None, tools=None) -> io.RawIOBase:
    """The decompressed tar of a spooled layer: from a child decompressor where one is
    installed, else from layers.LayerReader in a thread (ReadAhead)."""
    source = SpoolReader(spool, check, on_bytes)
    argv = find_tool(compression, tools) if compression != TAR else None
    if argv is not None:
        return ChildInflater(argv, source, fmt=compression, name=name, max_bytes=max_bytes)
    return _SpooledReadAhead(source, LayerReader(source, compression, max_bytes=max_bytes,
                                                 name=name))
