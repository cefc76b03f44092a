"""Read a tar stream member by member, and write headers, with little overhead.

tarfile's stream mode (`r|`) costs about 60 µs per entry and copies file
contents several times through small buffers; at 100,000+ entries and
gigabytes per layer that made the Python side of a conversion slower than
the decompressor and the SquashFS writer together. TarStream keeps
tarfile's header parsing (ustar, GNU long names, PAX records, sparse maps:
all of tarfile's checks apply) but reads the stream itself, into one large
buffer, and hands file contents to the caller as memoryviews of that
buffer, so a byte is copied once on its way through.

Headers are parsed by tarfile.TarInfo.fromtarfile() on a stand-in for a
TarFile: it reads only `fileobj`, `encoding`, `errors`, `pax_headers` and
`offset` of it (the same in Python 3.9 to 3.13). ustar_header() writes the
common header (a short ASCII name, no PAX record needed) without tarfile's
general machinery, byte for byte as tarfile would.
"""

from __future__ import annotations

import struct
import tarfile
from typing import BinaryIO, Callable, Iterator, Optional, Type

from .errors import CorruptLayer

BLOCK = tarfile.BLOCKSIZE
#: the read buffer: large reads from the decompressor, few system calls
BUFSIZE = 1 << 20


class FastTarInfo(tarfile.TarInfo):
    """tarfile.TarInfo with a faster frombuf() for the common header.

    frombuf() is the same code in Python 3.9 to 3.13; this one does the same
    work (the same field slices, decodings and checks, in the same order of
    precedence) with less overhead, and leaves everything uncommon to it: a
    header whose checksum is not the plain unsigned sum, a number in base-256,
    a field that does not parse, GNU sparse headers, short or empty blocks.
    Whatever tarfile would reject is therefore rejected by tarfile itself.
    """

    __slots__ = ()

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if len(buf) != BLOCK or buf[156:157] == tarfile.GNUTYPE_SPARSE:
            return super().frombuf(buf, encoding, errors)
        (name, mode, uid, gid, size, mtime, chk, typ, link, _magic, uname, gname, major,
         minor, prefix) = _FIELDS.unpack_from(buf)
        try:
            chksum = _octal(chk)
            if chksum != sum(buf) - sum(chk) + 256:
                raise ValueError("not the unsigned checksum")
            mode, uid, gid = _octal(mode), _octal(uid), _octal(gid)
            size, mtime = _octal(size), _octal(mtime)
            major, minor = _octal(major), _octal(minor)
        except ValueError:
            return super().frombuf(buf, encoding, errors)
        obj = cls()
        obj.name = name = _text(name, encoding, errors)
        obj.mode, obj.uid, obj.gid, obj.size, obj.mtime = mode, uid, gid, size, mtime
        obj.chksum = chksum
        obj.type = typ
        obj.linkname = _text(link, encoding, errors)
        obj.uname = _text(uname, encoding, errors)
        obj.gname = _text(gname, encoding, errors)
        obj.devmajor, obj.devminor = major, minor
        prefix = _text(prefix, encoding, errors)
        if typ == tarfile.AREGTYPE and name.endswith("/"):
            obj.type = typ = tarfile.DIRTYPE  # the old V7 way of writing a directory
        if typ == tarfile.DIRTYPE:
            obj.name = name = name.rstrip("/")
        if prefix and typ not in tarfile.GNU_TYPES:
            obj.name = prefix + "/" + name
        return obj


#: the fields of a tar header, as frombuf() slices them
_FIELDS = struct.Struct("100s8s8s8s12s12s8s1s100s8s32s32s8s8s155s")


def _text(field: bytes, encoding: str, errors: str) -> str:
    # tarfile.nts()
    p = field.find(b"\0")
    return (field[:p] if p != -1 else field).decode(encoding, errors)


def _octal(field: bytes) -> int:
    # tarfile.nti() where it gives the same number (octal digits, blanks, NULs after them);
    # anything else (base-256, text after a NUL, ...) raises ValueError, left to tarfile
    digits = field.rstrip(b"\0 ")
    return int(digits, 8) if digits else 0


class _Headers:
    """What TarInfo.fromtarfile() uses of a TarFile."""

    def __init__(self, fileobj: "TarStream", encoding: str, errors: str):
        self.fileobj = fileobj
        self.encoding = encoding
        self.errors = errors
        self.pax_headers: dict = {}
        #: where the next member's header starts (set by tarfile's _proc_* methods)
        self.offset = 0


class TarStream:
    """Members of one tar stream, in order, and their contents.

    raw: readinto() or read(); count(n) is told of every n bytes read from it
    (the decompression-bomb accounting). next() returns the next member or
    None at the end (a zero block, or a stream that simply stops between
    members is the caller's business: tarinfo_cls decides, see flatten);
    data(member) yields its contents as memoryviews valid until the next
    call; contents not read are skipped by the following next().
    """

    def __init__(self, raw: BinaryIO, tarinfo_cls: Type[tarfile.TarInfo], *,
                 encoding: str = "utf-8", errors: str = "surrogateescape",
                 count: Optional[Callable[[int], None]] = None, name: str = "tar",
                 bufsize: int = BUFSIZE):
        self.name = name
        self._raw = raw
        self._readinto = getattr(raw, "readinto", None)
        self._count = count
        self._tarinfo = tarinfo_cls
        self._buf = bytearray(max(bufsize, 4 * BLOCK))
        self._view = memoryview(self._buf)
        self._pos = 0        # next unread byte in _buf
        self._end = 0        # end of valid data in _buf
        self._offset = 0     # stream offset of _buf[0]
        self._eof = False
        self._headers = _Headers(self, encoding, errors)

    # -- the file object tarfile's header parsing reads from -------------------

    def tell(self) -> int:
        return self._offset + self._pos

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes (fewer only at the end of the stream): what tarfile expects."""
        if n is None or n < 0:
            raise ValueError("TarStream.read needs a size")
        pos = self._pos
        if self._end - pos >= n:
            self._pos = pos + n
            return bytes(self._view[pos:pos + n])
        parts = []
        while n:
            if self._pos >= self._end and not self._refill():
                break
            take = min(n, self._end - self._pos)
            parts.append(bytes(self._view[self._pos:self._pos + take]))
            self._pos += take
            n -= take
        return b"".join(parts)

    # -- members ---------------------------------------------------------------

    def next(self) -> Optional[tarfile.TarInfo]:
        h = self._headers
        if h.offset != self.tell():
            self._skip_to(h.offset)
        try:
            member = self._tarinfo.fromtarfile(h)
        except tarfile.EOFHeaderError:
            return None
        except ValueError as e:  # e.g. a negative size in a PAX or long-name header
            raise CorruptLayer(f"{self.name}: invalid tar header ({e})",
                               hint="the layer is damaged or hostile") from None
        if member.size < 0 or h.offset < self.tell():
            # octal fields take a '-', base-256 ones can be negative: stream-mode tarfile
            # refused going back; here it would reread data as headers (CVE-2025-8194)
            raise CorruptLayer(f"{self.name}: invalid size of {member.name!r}",
                               hint="the layer is damaged or hostile")
        return member

    def data(self, member: tarfile.TarInfo) -> Iterator[memoryview]:
        """The member's contents (sparse files expanded), in chunks of at most BUFSIZE."""
        if member.offset_data != self.tell():
            self._skip_to(member.offset_data)
        if member.sparse is not None:
            stored = sum(n for _, n in member.sparse)
            if stored > self._headers.offset - member.offset_data:
                # more data than the member has: the next header would be read as data
                raise CorruptLayer(f"{self.name}: invalid sparse map of {member.name!r}",
                                   hint="the layer is damaged or hostile")
            yield from self._sparse(member)
            return
        yield from self._stored(member.size, member.name)

    def rest(self) -> int:
        """Read the stream to its end (what follows the archive); return the bytes read."""
        n = self._end - self._pos
        self._pos = self._end
        while self._refill():
            n += self._end
            self._pos = self._end
        return n

    # -- internals ---------------------------------------------------------------

    def _read_raw(self, into: memoryview) -> int:
        if self._eof:
            return 0
        if self._readinto is not None:
            got = self._readinto(into)
        else:
            chunk = self._raw.read(len(into))
            got = len(chunk)
            into[:got] = chunk
        if not got:
            self._eof = True
            return 0
        if self._count is not None:
            self._count(got)
        self._end += got
        return got

    def _refill(self) -> bool:
        """Replace the (fully read) buffer with the next bytes of the stream; False at its end."""
        self._offset += self._end
        self._pos = self._end = 0
        return bool(self._read_raw(self._view))

    def _skip_to(self, offset: int) -> None:
        if offset < self.tell():  # a stream never goes back
            raise CorruptLayer(f"{self.name}: invalid tar (an offset goes backwards)",
                               hint="the layer is damaged or hostile")
        while self.tell() < offset:
            if self._pos >= self._end and not self._refill():
                raise CorruptLayer(f"{self.name}: truncated tar (unexpected end of data)",
                                   hint="the layer is damaged; pull it again")
            self._pos = min(self._end, self._pos + offset - self.tell())

    def _stored(self, size: int, name: str) -> Iterator[memoryview]:
        left = size
        while left:
            if self._pos >= self._end and not self._refill():
                raise CorruptLayer(f"{self.name}: data of {name!r} is truncated",
                                   hint="the layer is damaged; pull it again")
            take = min(left, self._end - self._pos)
            start = self._pos
            self._pos += take
            left -= take
            yield self._view[start:start + take]

    def _sparse(self, member: tarfile.TarInfo) -> Iterator[memoryview]:
        # Holes are zeros; the stored chunks follow each other in the stream.
        # A map out of order or beyond the file's size is not a file any
        # writer makes: refused rather than guessed at.
        pos = 0
        for offset, numbytes in member.sparse:
            if offset < pos or numbytes < 0 or offset + numbytes > member.size:
                raise CorruptLayer(f"{self.name}: invalid sparse map of {member.name!r}",
                                   hint="the layer is damaged or hostile")
            yield from _zeros(offset - pos)
            yield from self._stored(numbytes, member.name)
            pos = offset + numbytes
        yield from _zeros(member.size - pos)


_ZERO = memoryview(bytes(BUFSIZE))


def _zeros(n: int) -> Iterator[memoryview]:
    while n > 0:
        take = min(n, BUFSIZE)
        yield _ZERO[:take]
        n -= take


# -- writing ---------------------------------------------------------------------

_USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s8s32s32s8s8s155s12x")
_MAX7 = 8 ** 7      # what a 8-byte octal field holds
_MAX11 = 8 ** 11    # ... a 12-byte one


def ustar_header(name: str, typ: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                 link: str, devmajor: int, devminor: int) -> Optional[bytes]:
    """The header tarfile's PAX_FORMAT writer makes for an entry that needs no PAX record
    (ASCII names of at most 100 bytes, numbers that fit their fields), about ten times
    faster; None for any other entry (the caller then asks tarfile)."""
    if typ == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"
    if (len(name) > 100 or len(link) > 100 or not name.isascii() or not link.isascii()
            or not (0 <= uid < _MAX7 and 0 <= gid < _MAX7 and 0 <= size < _MAX11
                    and 0 <= mtime < _MAX11)):
        return None
    if typ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        if not (0 <= devmajor < _MAX7 and 0 <= devminor < _MAX7):
            return None
        major, minor = b"%07o\0" % devmajor, b"%07o\0" % devminor
    else:
        major = minor = b""
    buf = bytearray(_USTAR.pack(
        name.encode("ascii"), b"%07o\0" % (mode & 0o7777), b"%07o\0" % uid, b"%07o\0" % gid,
        b"%011o\0" % size, b"%011o\0" % mtime, b"        ", typ, link.encode("ascii"),
        tarfile.POSIX_MAGIC, b"", b"", major, minor, b""))
    buf[148:155] = b"%06o\0" % sum(buf)
    return bytes(buf)
