"""Flatten OCI image layers into one tar stream in a single streaming pass.

Layers come top-most first, already decompressed, and are read in tarfile's
stream mode (`r|`): nothing is seeked, nothing is extracted to disk. The OCI
image-spec changeset rules are applied top-down:

* a path emitted from an upper layer is skipped in lower layers (for
  directories the upper attributes win; lower children stay visible);
* `.wh.<name>` hides <name> and everything below it in lower layers;
* `.wh..wh..opq` hides every lower-layer child of its directory;
* a non-directory at P hides everything below P in lower layers, and a
  directory over a lower non-directory simply wins;
* whiteout files are never emitted, and no path is emitted twice (tar2sqfs
  rejects duplicates).

Regular files are written as they are read, so memory is bounded by
metadata (one record per path), never by file contents. Every other entry is
held as a small record and written after the last layer, which lets a later
duplicate inside one layer win as it would on extraction. The one case that
cannot be undone in one pass is a regular file whose contents were already
written and that the same layer then repeats: the first copy is kept and a
warning says so. Hardlinks are written last, their targets resolved through
chains to the final regular file; a link whose target was never emitted (or
was replaced by an upper layer, or is not a regular file) is dropped.

Ownership is numeric (user and group names are dropped so the result does
not depend on the host's passwd); modes keep setuid/setgid/sticky; mtimes are
kept (whole seconds, as SquashFS stores them). Which names and xattrs an entry
may carry, and what a hostile one becomes, is layerentry.py's job; an entry
below a path that is not a directory (a symlink or file seen before in the
same layer: the CVE-2021-29136 pattern) is dropped here. Symlinks are kept as
they are: they resolve inside the container at run time. Device nodes and
fifos are kept too: the image is always mounted `nodev`, so a device node in
an image grants nothing.

The output is deterministic: the same layers give the same bytes.
"""

from __future__ import annotations

import logging
import math
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Dict, Iterable, List, Optional

from .errors import CorruptLayer, LimitExceeded
from .layerentry import ENC, ERR, XATTR_DROP, End, clean_name, kept_xattrs, tarinfo_class
from .pathrecords import Meta, Records
from .tarstream import TarStream, ustar_header

log = logging.getLogger("ociimage.flatten")

_CHUNK = 1 << 20
_LINK_MAX = 4095
_MAX_WARNINGS = 200
_MAX_LINK_CHAIN = 64
_WH = ".wh."
_OPQ = ".wh..wh..opq"

REG, LNK, SYM, CHR, BLK, DIR, FIFO = (tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.SYMTYPE,
                                      tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE,
                                      tarfile.FIFOTYPE)
_REGULAR = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE}
_SPECIAL = {LNK, SYM, CHR, BLK, DIR, FIFO}


@dataclass
class FlattenLimits:
    """Safety limits for one flatten; exceeding one raises LimitExceeded."""

    #: paths tracked (entries emitted plus whiteout rules): bounds memory.
    max_entries: int = 10_000_000
    #: total bytes of file contents written.
    max_bytes: int = 256 << 30
    #: total decompressed bytes read from all layers (shadowed data included).
    max_input_bytes: int = 1 << 40
    #: size of one PAX / GNU long-name header, which tarfile holds in memory.
    max_header_bytes: int = 1 << 20
    #: one layer may always expand to this many bytes ...
    expansion_floor: int = 1 << 30
    #: ... and beyond it to at most this many times its compressed size (0: no limit).
    #: Real layers expand 2-10x; a gzip/zstd bomb of zeros 1000x and more.
    max_expansion_ratio: int = 100

    def layer_bound(self, compressed_size: int) -> Optional[int]:
        """The most bytes a layer of this compressed size may expand to (None: unbounded)."""
        if not self.max_expansion_ratio:
            return None
        return max(self.expansion_floor, compressed_size * self.max_expansion_ratio)


@dataclass
class FlattenStats:
    entries: int = 0
    bytes: int = 0
    layers: int = 0
    input_bytes: int = 0
    hardlinks: int = 0
    #: entries not emitted, by reason (shadowed and whited_out are normal).
    skipped: Dict[str, int] = field(default_factory=dict)
    #: human-readable warnings (capped); skipped holds the full counts.
    warnings: List[str] = field(default_factory=list)
    #: xattrs dropped by namespace ("security", "trusted", "system"), over all entries.
    dropped_xattrs: Dict[str, int] = field(default_factory=dict)


class _Out:
    """Buffers small writes (headers) so tiny entries cost few pipe writes."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.buf = bytearray()

    def write(self, data) -> None:
        if len(data) >= _CHUNK:
            self.flush()
            self.out.write(data)
            return
        self.buf += data
        if len(self.buf) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.out.write(self.buf)
            self.buf = bytearray()


class _Flattener:
    def __init__(self, out: BinaryIO, limits: FlattenLimits):
        self.out = _Out(out)
        self.limits = limits
        self.stats = FlattenStats()
        self.seen = Records()
        self.hide_tree: set = set()    # whiteouts: the path and all below it
        self.hide_below: set = set()   # opaque dirs and replaced non-dirs: all below
        self.rules = 0
        self.layer = -1
        self.pend_tree: set = set()
        self.pend_opaque: set = set()
        self.pend_nondir: set = set()  # this layer's non-dirs shadowed by an upper dir
        # Directories that exist only because an emitted entry lies below them
        # (no entry of their own yet), with the layer that implied them: a lower
        # layer's non-directory there must not be emitted over them.
        self.implied: Dict[str, int] = {}
        #: the last parent directory whose ancestors passed parents_ok() in this layer
        self.ok_parent: Optional[str] = None
        self.tarinfo_cls = tarinfo_class(limits.max_header_bytes)

    # -- accounting ---------------------------------------------------------

    def add_input(self, n: int) -> None:
        self.stats.input_bytes += n
        if self.stats.input_bytes > self.limits.max_input_bytes:
            raise LimitExceeded(
                f"layers expand to more than {self.limits.max_input_bytes} bytes",
                hint="decompression bomb? raise max_input_bytes only for a trusted image")

    def _track(self) -> None:
        if len(self.seen) + self.rules >= self.limits.max_entries:
            raise LimitExceeded(f"image has more than {self.limits.max_entries} entries",
                                hint="raise max_entries if the image is genuine")

    def skip(self, reason: str, name: str = "", why: str = "", warn: bool = True) -> None:
        self.stats.skipped[reason] = self.stats.skipped.get(reason, 0) + 1
        if not warn:
            return
        msg = f"layer {self.layer} from the top: skipped {name!r}: {why or reason}"
        log.warning(msg, extra={"layer": self.layer, "entry": repr(name), "reason": reason})
        if len(self.stats.warnings) < _MAX_WARNINGS:
            self.stats.warnings.append(msg)

    def warn(self, msg: str, **extra) -> None:
        log.warning(msg, extra=extra)
        if len(self.stats.warnings) < _MAX_WARNINGS:
            self.stats.warnings.append(msg)

    # -- one layer ----------------------------------------------------------

    def layer_pass(self, stream: BinaryIO) -> None:
        self.layer += 1
        self.ok_parent = None
        self.stats.layers += 1
        tar = TarStream(stream, self.tarinfo_cls, encoding=ENC, errors=ERR,
                        count=self.add_input, name=f"layer {self.layer} from the top")
        try:
            while True:
                try:
                    member = tar.next()
                except End:
                    break
                if member is None:
                    break
                self.entry(tar, member)
            # The blob's digest is checked at its EOF: read what follows the tar.
            tar.rest()
        except tarfile.TarError as e:
            raise CorruptLayer(f"layer {self.layer} from the top: corrupt tar ({e})",
                               hint="the layer is damaged; pull it again") from None
        except EOFError as e:
            raise CorruptLayer(f"layer {self.layer} from the top: truncated tar ({e})",
                               hint="the layer is damaged; pull it again") from None
        drain = getattr(stream, "drain", None)
        if drain is not None:
            drain()
        self.hide_tree |= self.pend_tree
        self.hide_below |= self.pend_opaque
        self.hide_below |= self.pend_nondir
        self.pend_tree, self.pend_opaque, self.pend_nondir = set(), set(), set()

    def entry(self, tar: TarStream, m: tarfile.TarInfo) -> None:
        name = m.name
        typ = m.type
        if typ in _REGULAR:
            typ = REG
        elif typ not in _SPECIAL:
            self.skip("unsupported_type", name, f"unsupported tar entry type {typ!r}")
            return
        parts, why = clean_name(name)
        if parts is None:
            self.skip("hostile_name", name, why)
            return
        base = parts[-1] if parts else ""
        layer = self.layer
        seen = self.seen
        path = "/".join(parts)
        # Entries come grouped by directory: the ancestors of the last parent that
        # passed need no new walk until a record there could change the verdict
        # (_claim resets it).
        parent = path[:len(path) - len(base) - 1] if len(parts) > 1 else ""
        if not parts or parent != self.ok_parent:
            if not self.parents_ok(parts, name):
                return
            if parts:
                self.ok_parent = parent
        if path in self.hide_tree:
            self.skip("whited_out", warn=False)
            return
        if base.startswith(_WH):
            self.whiteout(name, parts, base)
            return
        if not parts and typ != DIR:
            self.skip("hostile_name", name, "root entry that is not a directory")
            return

        rec = seen.get(path)
        implied = self.implied.get(path) if rec is None else None
        if implied is not None and typ != DIR:
            # e.g. an upper layer's up/x over a lower layer's symlink up (the
            # CVE-2021-29136 layout): the directory wins, nothing is followed.
            if implied < layer:
                self.pend_nondir.add(path)
                self._claim(path)
                self.rules += 1
                self._track()
                self.skip("shadowed", warn=False)
            else:
                self.skip("duplicate", name, "a non-directory where this layer has a directory")
            return
        if rec is not None and rec[0] < layer:
            # An upper layer owns this path; a non-directory here still hides
            # what lower layers have below it.
            if typ != DIR and rec[1] == DIR:
                self.pend_nondir.add(path)
                self._claim(path)
                self.rules += 1
                self._track()
            self.skip("shadowed", warn=False)
            return

        meta = self.metadata(m, typ, name)
        if meta is False:
            return
        if rec is not None:  # the same path twice in this layer: the later wins
            if rec[2] is None or (rec[1] == DIR and typ != DIR):
                what = "its contents were already written" if rec[2] is None else \
                    "the directory's children were already taken"
                self.skip("duplicate", name, f"duplicate in one layer; keeping the first ({what})")
                return
        else:
            self._track()
        if typ == REG:
            self.write_file(tar, m, path, meta)
            seen[path] = (layer, REG, None)
        else:
            seen[path] = (layer, typ, meta)
        if typ != DIR:
            self._claim(path)
        self.implied.pop(path, None)
        cut = path.rfind("/")
        while cut > 0:
            anc = path[:cut]
            if anc in seen or anc in self.implied:
                break
            self.implied[anc] = layer
            cut = anc.rfind("/")

    def parents_ok(self, parts: List[str], name: str) -> bool:
        """Whether parts' ancestors let it through: not hidden by an upper layer, not
        below a whiteout name or a non-directory (counted and skipped otherwise)."""
        if any(p.startswith(_WH) for p in parts[:-1]):
            self.skip("whiteout_parent", name, "entry below a whiteout name")
            return False
        anc = ""
        layer = self.layer
        seen = self.seen
        for k, comp in enumerate(parts):
            if anc in self.hide_below or anc in self.hide_tree:
                self.skip("whited_out", warn=False)
                return False
            if k:
                rec = seen.get(anc)
                if rec is not None and rec[1] != DIR:
                    if rec[0] < layer:
                        self.skip("whited_out", warn=False)
                    else:
                        self.skip("parent_not_dir", name,
                                  f"parent {anc!r} is not a directory in this layer")
                    return False
                if anc in self.pend_nondir:
                    self.skip("parent_not_dir", name,
                              f"parent {anc!r} is not a directory in this layer")
                    return False
            anc = comp if not k else anc + "/" + comp
        return True

    def _claim(self, path: str) -> None:
        """A non-directory now stands at path (in seen or pend_nondir): a cached parent
        at or below it no longer passes."""
        ok = self.ok_parent
        if ok is not None and (ok == path or ok.startswith(path + "/")):
            self.ok_parent = None

    def whiteout(self, name: str, parts: List[str], base: str) -> None:
        parent = "/".join(parts[:-1])
        if base == _OPQ:
            self.pend_opaque.add(parent)
        elif base.startswith(_WH + _WH) or base in (_WH, _WH + ".", _WH + ".."):
            # aufs bookkeeping (.wh..wh.plnk etc.) or nothing to hide
            self.skip("whiteout_meta", name, "aufs metadata or empty whiteout", warn=False)
            return
        else:
            target = base[len(_WH):]
            self.pend_tree.add(parent + "/" + target if parent else target)
        self.rules += 1
        self._track()
        self.stats.skipped["whiteout"] = self.stats.skipped.get("whiteout", 0) + 1

    def metadata(self, m: tarfile.TarInfo, typ: bytes, name: str):
        """The fields to write for m, or False if it must be dropped."""
        uid, gid = m.uid, m.gid
        if not (0 <= uid < 1 << 32 and 0 <= gid < 1 << 32):
            self.skip("bad_owner", name, f"uid/gid {uid}/{gid} out of range")
            return False
        link = ""
        if typ == SYM:
            link = m.linkname
            if not link or "\0" in link or len(link.encode(ENC, ERR)) > _LINK_MAX:
                self.skip("bad_symlink", name, "empty, NUL-bearing or overlong symlink target")
                return False
        elif typ == LNK:
            parts, why = clean_name(m.linkname)
            if not parts:
                self.skip("bad_hardlink", name, f"hardlink target {m.linkname!r}: "
                          f"{why or 'points at the root'}")
                return False
            link = "/".join(parts)
        xattrs = None
        if m.pax_headers:
            xattrs, dropped = kept_xattrs(m.pax_headers)
            for x in dropped:
                if x.startswith(XATTR_DROP) and "\0" not in x:
                    ns = x.split(".", 1)[0]
                    counts = self.stats.dropped_xattrs
                    counts[ns] = counts.get(ns, 0) + 1
                    continue
                self.warn(f"layer {self.layer} from the top: dropped xattr {x!r} of {name!r}: "
                          "only user. xattrs are kept",
                          layer=self.layer, entry=repr(name), xattr=repr(x))
        mtime = m.mtime
        if not isinstance(mtime, int):
            mtime = math.floor(mtime)
        devmajor = m.devmajor if typ in (CHR, BLK) else 0
        devminor = m.devminor if typ in (CHR, BLK) else 0
        return (m.mode & 0o7777, uid, gid, mtime, link, devmajor, devminor, xattrs)

    # -- output -------------------------------------------------------------

    def header(self, path: str, typ: bytes, meta: Meta, size: int = 0) -> None:
        mode, uid, gid, mtime, link, devmajor, devminor, xattrs = meta
        if not xattrs:
            buf = ustar_header(path or ".", typ, mode, uid, gid, size, mtime, link,
                               devmajor, devminor)
            if buf is not None:
                self.out.write(buf)
                self.stats.entries += 1
                return
        ti = tarfile.TarInfo(path or ".")
        ti.type = typ
        ti.mode, ti.uid, ti.gid, ti.mtime, ti.size = mode, uid, gid, mtime, size
        ti.linkname = link
        ti.devmajor, ti.devminor = devmajor, devminor
        ti.uname = ti.gname = ""
        if xattrs:
            ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in xattrs.items()}
        self.out.write(ti.tobuf(tarfile.PAX_FORMAT, ENC, ERR))
        self.stats.entries += 1

    def write_file(self, tar: TarStream, m: tarfile.TarInfo, path: str, meta: Meta) -> None:
        size = m.size
        if self.stats.bytes + size > self.limits.max_bytes:
            raise LimitExceeded(f"image contents exceed {self.limits.max_bytes} bytes",
                                hint="raise max_bytes if the image is genuine")
        self.header(path, REG, meta, size)
        write = self.out.write
        for chunk in tar.data(m):
            write(chunk)
        pad = -size % tarfile.BLOCKSIZE
        if pad:
            write(tarfile.NUL * pad)
        self.stats.bytes += size

    def finish(self) -> None:
        links = []
        for path, (layer, typ, meta) in self.seen.items():
            if meta is None:
                continue
            if typ == LNK:
                links.append((path, layer, meta))
            else:
                self.header(path, typ, meta)
        for path, layer, meta in links:
            target = self.resolve(meta[4], layer)
            if target is None:
                self.skip("bad_hardlink", path,
                          f"hardlink target {meta[4]!r} is not a regular file in the image")
                continue
            self.header(path, LNK, meta[:4] + (target,) + meta[5:])
            self.stats.hardlinks += 1
        if self.stats.dropped_xattrs:
            log.debug("dropped xattrs outside user.: %s",
                      ", ".join(f"{ns}.* {n}" for ns, n in sorted(self.stats.dropped_xattrs.items())),
                      extra={"dropped_xattrs": dict(self.stats.dropped_xattrs)})
        # End of archive: two zero blocks.
        self.out.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        self.out.flush()

    def resolve(self, target: str, layer: int) -> Optional[str]:
        """The regular file a hardlink made in `layer` ends up sharing, if emitted."""
        for _ in range(_MAX_LINK_CHAIN):
            rec = self.seen.get(target)
            # A target an upper layer replaced held contents that are gone.
            if rec is None or rec[0] < layer:
                return None
            if rec[1] == REG:
                return target
            if rec[1] != LNK:
                return None
            layer, target = rec[0], rec[2][4]
        return None


def flatten(layers: Iterable[BinaryIO], out: BinaryIO, *,
            limits: Optional[FlattenLimits] = None) -> FlattenStats:
    """Write one tar stream of the flattened image to out; layers top-most first.

    Each layer is a decompressed tar stream, read to its end (and drained, so
    a digest-verifying reader below it sees EOF) before the next is taken.
    """
    flat = _Flattener(out, limits or FlattenLimits())
    for stream in layers:
        flat.layer_pass(stream)
    flat.finish()
    return flat.stats
