"""Open an OCI/Docker image layer blob as its decompressed tar stream.

Decompression is streaming (memory bounded by one chunk per layer) and strict:
a truncated or corrupt compressed stream raises CorruptLayer instead of
looking like a short tar, and an optional limit on the decompressed size
stops decompression bombs with LimitExceeded.

The caller typically wraps the compressed blob in a reader that verifies its
digest only at EOF, so once the tar has ended `LayerReader.drain()` must be
called: it reads the decompressed remainder (so the compressed framing is
checked too) and the compressed stream to its very end. flatten() does this.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import BinaryIO, Dict, Iterator, Optional

from .errors import CorruptLayer, LimitExceeded, UnsupportedMediaType

TAR, GZIP, ZSTD = "tar", "gzip", "zstd"

#: Layer media types this package can flatten, mapped to their compression.
LAYER_MEDIA_TYPES: Dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": TAR,
    "application/vnd.oci.image.layer.v1.tar+gzip": GZIP,
    "application/vnd.oci.image.layer.v1.tar+zstd": ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": TAR,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": GZIP,
    # Not in Docker's schema 2 spec, but containerd defines and writes them.
    "application/vnd.docker.image.rootfs.diff.tar": TAR,
    "application/vnd.docker.image.rootfs.diff.tar.zstd": ZSTD,
    "application/vnd.docker.image.rootfs.foreign.diff.tar": TAR,
}

CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = 0xFD2FB528


def compression_of(media_type: str) -> str:
    """The compression ("tar", "gzip" or "zstd") of a layer media type."""
    key = media_type.split(";", 1)[0].strip().lower()
    try:
        return LAYER_MEDIA_TYPES[key]
    except KeyError:
        raise UnsupportedMediaType(
            f"unsupported layer media type {media_type!r}",
            hint="supported: tar, tar+gzip and tar+zstd OCI/Docker layers") from None


def open_layer(stream: BinaryIO, media_type: str, *, max_bytes: Optional[int] = None,
               name: str = "layer") -> "LayerReader":
    """The decompressed tar stream of a layer blob.

    max_bytes bounds the decompressed size (LimitExceeded beyond it); name
    appears in error messages (e.g. "layer 2" or the digest).
    """
    return LayerReader(stream, compression_of(media_type), max_bytes=max_bytes, name=name)


class LayerReader(io.RawIOBase):
    """A readable, non-seekable decompressed view of a layer blob.

    bytes_in / bytes_out count compressed and decompressed bytes so far.
    """

    def __init__(self, raw: BinaryIO, compression: str, *, max_bytes: Optional[int] = None,
                 name: str = "layer"):
        super().__init__()
        if compression not in (TAR, GZIP, ZSTD):
            raise UnsupportedMediaType(f"unsupported layer compression {compression!r}")
        self.raw = raw
        self.compression = compression
        self.max_bytes = max_bytes
        self.name = name
        self.bytes_in = 0
        self.bytes_out = 0
        self._buf = b""
        self._pos = 0
        self._chunks: Iterator[bytes] = {TAR: self._plain, GZIP: self._gzip,
                                         ZSTD: self._zstd}[compression]()
        self._eof = False

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while True:
                part = self.read(CHUNK)
                if not part:
                    return b"".join(parts)
                parts.append(part)
        while self._pos >= len(self._buf):
            if self._eof or size == 0:
                return b""
            chunk = next(self._chunks, None)
            if chunk is None:
                self._eof = True
                return b""
            self._count(len(chunk))
            self._buf, self._pos = chunk, 0
        out = self._buf[self._pos:self._pos + size]
        self._pos += len(out)
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def drain(self) -> int:
        """Read the decompressed rest, then the blob, to EOF; return decompressed bytes skipped."""
        skipped = 0
        while True:
            part = self.read(CHUNK)
            if not part:
                break
            skipped += len(part)
        while self._read_raw():
            pass
        return skipped

    # -- internals ----------------------------------------------------------

    def _count(self, n: int) -> None:
        self.bytes_out += n
        if self.max_bytes is not None and self.bytes_out > self.max_bytes:
            raise LimitExceeded(
                f"{self.name} expands to more than {self.max_bytes} bytes (decompression bomb?)",
                hint="raise the expansion limit only for an image you trust")

    def _read_raw(self, n: int = CHUNK) -> bytes:
        chunk = self.raw.read(n)
        if chunk:
            self.bytes_in += len(chunk)
        return chunk or b""

    def _truncated(self, fmt: str) -> CorruptLayer:
        return CorruptLayer(f"{self.name}: {fmt} stream is truncated",
                            hint="the blob is incomplete; pull it again")

    def _corrupt(self, fmt: str, err: object) -> CorruptLayer:
        return CorruptLayer(f"{self.name}: corrupt {fmt} data ({err})",
                            hint="the blob is damaged; pull it again")

    def _plain(self) -> Iterator[bytes]:
        while True:
            chunk = self._read_raw()
            if not chunk:
                return
            yield chunk

    def _gzip(self) -> Iterator[bytes]:
        dec: Optional[zlib._Decompress] = zlib.decompressobj(16 + zlib.MAX_WBITS)
        data = b""
        while True:
            if dec is None:
                # Between members: another member (gzip allows concatenation),
                # zero padding that some writers add, or the end.
                while len(data) < 2:
                    more = self._read_raw()
                    if not more:
                        break
                    data += more
                if not data:
                    return
                if data[:2] == _GZIP_MAGIC:
                    dec = zlib.decompressobj(16 + zlib.MAX_WBITS)
                elif data.strip(b"\0"):
                    raise CorruptLayer(f"{self.name}: unexpected data after the gzip stream",
                                       hint="the blob is damaged; pull it again")
                else:
                    data = b""
                    continue
            if not data:
                data = self._read_raw()
                if not data:
                    # zlib may still hold output for input it already took.
                    try:
                        out = dec.flush()
                    except zlib.error as e:
                        raise self._corrupt("gzip", e) from None
                    if out:
                        yield out
                    if not dec.eof:
                        raise self._truncated("gzip")
                    dec = None
                    continue
            try:
                out = dec.decompress(data, CHUNK)
            except zlib.error as e:
                raise self._corrupt("gzip", e) from None
            if dec.eof:
                data = dec.unused_data
                dec = None
            else:
                data = dec.unconsumed_tail
            if out:
                yield out

    def _zstd(self) -> Iterator[bytes]:
        import zstandard

        # python-zstandard's readers treat a stream cut mid-frame as a clean
        # end, so frame boundaries are tracked separately to catch truncation.
        tracker = _ZstdFrames(self.name)
        owner = self

        class _Tee:
            def read(self, n: int = CHUNK) -> bytes:
                chunk = owner._read_raw(n)
                tracker.feed(chunk)
                return chunk

        tee = _Tee()
        reader = zstandard.ZstdDecompressor().stream_reader(
            tee, read_size=CHUNK, read_across_frames=True, closefd=False)
        while True:
            try:
                out = reader.read(CHUNK)
            except zstandard.ZstdError as e:
                raise self._corrupt("zstd", e) from None
            if not out:
                break
            yield out
        while tee.read():
            pass
        if not tracker.complete():
            raise self._truncated("zstd")


class _ZstdFrames:
    """Follows zstd frame and block headers (RFC 8878) without decoding."""

    def __init__(self, name: str):
        self.name = name
        self.frames = 0
        self._hdr = b""        # bytes of a header being collected
        self._need = 4         # header bytes wanted, or 0 while skipping
        self._skip = 0         # payload bytes to skip
        self._state = "magic"  # magic, fhd, frame_rest, block, checksum, skiplen
        self._checksum = False

    def complete(self) -> bool:
        return self.frames > 0 and self._state == "magic" and not self._hdr and not self._skip

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                continue
            take = min(self._need - len(self._hdr), n - i)
            self._hdr += data[i:i + take]
            i += take
            if len(self._hdr) == self._need:
                hdr, self._hdr = self._hdr, b""
                self._header(hdr)

    def _bad(self) -> CorruptLayer:
        return CorruptLayer(f"{self.name}: not a zstd stream",
                            hint="the blob is damaged; pull it again")

    def _header(self, hdr: bytes) -> None:
        st = self._state
        if st == "magic":
            magic = struct.unpack("<I", hdr)[0]
            if magic == _ZSTD_MAGIC:
                self._state, self._need = "fhd", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skiplen", 4
            else:
                raise self._bad()
        elif st == "skiplen":
            self._skip = struct.unpack("<I", hdr)[0]
            self._state, self._need = "magic", 4
            self.frames += 1
        elif st == "fhd":
            fhd = hdr[0]
            fcs_flag, single = fhd >> 6, (fhd >> 5) & 1
            self._checksum = bool(fhd & 4)
            rest = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
            rest += (1 if single else 0, 2, 4, 8)[fcs_flag]
            self._state, self._need = "block", 3
            self._skip = rest
        elif st == "block":
            bh = hdr[0] | hdr[1] << 8 | hdr[2] << 16
            last, btype, size = bh & 1, (bh >> 1) & 3, bh >> 3
            if btype == 3:
                raise self._bad()
            self._skip = 1 if btype == 1 else size
            if last:
                if self._checksum:
                    self._state, self._need = "checksum", 4
                else:
                    self._state, self._need = "magic", 4
                    self.frames += 1
        elif st == "checksum":
            self._state, self._need = "magic", 4
            self.frames += 1


class ReadAhead(io.RawIOBase):
    """Decompress (and download) a layer in a thread, ahead of its reader.

    zlib and zstd release the GIL while they work, and so does the socket
    read, so the layer's decompression overlaps the tar parsing and the
    SquashFS writer instead of taking turns with them. At most `depth` chunks
    wait in memory. The reader sees the thread's exception (a digest mismatch,
    a corrupt layer, a cancelled pull) at the point where it would have read
    past it; drain() finishes the layer, digest check included.
    """

    _END = object()

    def __init__(self, inner: "LayerReader", depth: int = 8, chunk: int = CHUNK):
        super().__init__()
        import queue
        import threading
        self._inner = inner
        self._q: "queue.Queue" = queue.Queue(maxsize=depth)
        self._buf = memoryview(b"")
        self._done = False
        self._error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(chunk,), daemon=True,
                                        name="layer-read-ahead")
        self._thread.start()

    def _put(self, item) -> bool:
        import queue
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, chunk: int) -> None:
        try:
            while not self._stop.is_set():
                part = self._inner.read(chunk)
                if not part:
                    self._inner.drain()  # the compressed rest, so the digest is checked
                    break
                if not self._put(part):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            self._put(e)
            return
        self._put(self._END)

    def readable(self) -> bool:
        return True

    def _next(self) -> bool:
        if self._done:
            return False
        item = self._q.get()
        if item is self._END:
            self._done = True
            return False
        if isinstance(item, BaseException):
            self._done = True
            self._error = item
            raise item
        self._buf = memoryview(item)
        return True

    def read(self, size: int = -1) -> bytes:
        if self._error is not None:
            raise self._error
        if size is None or size < 0:
            parts = [bytes(self._buf)]
            self._buf = memoryview(b"")
            while self._next():
                parts.append(bytes(self._buf))
            self._buf = memoryview(b"")
            return b"".join(parts)
        while not self._buf:
            if not self._next():
                return b""
        out = bytes(self._buf[:size])
        self._buf = self._buf[size:]
        return out

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def drain(self) -> int:
        """Wait for the layer's end (and digest check); return decompressed bytes skipped."""
        skipped = len(self._buf)
        self._buf = memoryview(b"")
        while self._next():
            skipped += len(self._buf)
            self._buf = memoryview(b"")
        if self._error is not None:
            raise self._error
        return skipped

    def close(self) -> None:
        self._stop.set()
        super().close()
