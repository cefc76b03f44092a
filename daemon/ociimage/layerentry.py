"""What one entry of a layer may be: its header read safely, its name, its xattrs.

flatten.py applies the changeset rules; this module decides, entry by
entry, what of the hostile input reaches it.

Headers: a PAX or GNU long-name header is held in memory by tarfile, so
one larger than [limits] max_header_bytes is refused (LimitExceeded); a
damaged header is CorruptLayer; a stream that simply stops between members
ends the layer (as Go's archive/tar accepts).

Xattrs: from PAX `SCHILY.xattr.*` (and `LIBARCHIVE.xattr.*`) headers, only
those in the `user.` namespace are kept. `security.*` (file capabilities,
SELinux/SMACK labels, IMA/EVM) and `trusted.*` (root-only metadata such as
overlayfs' `trusted.overlay.*`) are policy that the image author does not get
to set on a host that mounts the image as root; they are dropped, counted,
and logged at debug level. `system.*` (POSIX ACLs) is dropped too: SquashFS
cannot store it, and the mode bits still carry the owner/group/other
permissions.

Hostile names are handled without ever touching the host filesystem: leading
`/` and `./` are stripped, `..` is resolved lexically and an entry that would
leave the root is dropped, as is an empty name, a name with a NUL byte, and a
name component longer than 255 bytes (NAME_MAX; SquashFS cannot hold more).
(An entry below a path that is not a directory, the CVE-2021-29136 pattern,
is flatten's to drop: it knows what came before.)
Newlines, control characters and bytes that are not UTF-8 pass through
unchanged (tar names are decoded with surrogateescape both ways).
"""

from __future__ import annotations

import base64
import tarfile
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote_to_bytes

from .errors import CorruptLayer, LimitExceeded
from .tarstream import FastTarInfo

#: how tar names are decoded and encoded again (bytes that are not UTF-8 pass through)
ENC, ERR = "utf-8", "surrogateescape"
NAME_MAX = 255
#: xattr namespaces kept in the image (see the module docstring for why only user.)
XATTR_KEEP = ("user.",)
#: namespaces dropped by policy or because SquashFS cannot hold them: counted, not warned
XATTR_DROP = ("security.", "trusted.", "system.")
META_TYPES = {tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
              tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK}


class End(Exception):
    """The layer's tar stream ended at a header boundary."""


def tarinfo_class(max_header_bytes: int):
    class _TarInfo(FastTarInfo):
        @classmethod
        def fromtarfile(cls, tf):
            try:
                return super().fromtarfile(tf)
            except tarfile.EmptyHeaderError:
                # Go's archive/tar also accepts a stream that simply stops
                # between members; compressed layers still have their framing
                # checked by the decompressor.
                raise End() from None
            except (tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
                raise CorruptLayer(f"corrupt tar header ({e})",
                                   hint="the layer is damaged; pull it again") from None

        def _proc_member(self, tf):
            if self.type in META_TYPES and self.size > max_header_bytes:
                raise LimitExceeded(
                    f"tar extended header of {self.size} bytes exceeds "
                    f"{max_header_bytes}", hint="the layer looks hostile")
            return super()._proc_member(tf)

    return _TarInfo


def clean_name(name: str) -> Tuple[Optional[List[str]], str]:
    """Path components of a tar name, or (None, reason) for a name to drop."""
    if not name:
        return None, "empty name"
    if "\0" in name:
        return None, "NUL byte in name"
    if (name.isascii() and "//" not in name and "/." not in name and name[0] not in "./"
            and len(name) <= NAME_MAX):
        # The common name: nothing to resolve, no component too long (an ASCII
        # component is as long in bytes).
        parts = name.split("/")
        if not parts[-1]:
            parts.pop()
        return parts, ""
    parts: List[str] = []
    for comp in name.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                return None, "name escapes the root"
            parts.pop()
            continue
        if len(comp.encode(ENC, ERR)) > NAME_MAX:
            return None, f"name component longer than {NAME_MAX} bytes"
        parts.append(comp)
    return parts, ""


def kept_xattrs(pax: Dict[str, str]) -> Tuple[Optional[Dict[str, str]], List[str]]:
    """The xattrs to keep, and the names of those dropped."""
    out: Dict[str, str] = {}
    dropped: List[str] = []
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            name = key[len("SCHILY.xattr."):]
        elif key.startswith("LIBARCHIVE.xattr."):
            try:
                name = unquote_to_bytes(key[len("LIBARCHIVE.xattr."):]).decode(ENC, ERR)
                raw = base64.b64decode(value.encode(ENC, ERR) + b"==")
            except ValueError:
                dropped.append(key)
                continue
            if name in out:
                continue
            value = raw.decode(ENC, ERR)
        else:
            continue
        if name.startswith(XATTR_KEEP) and "\0" not in name:
            out[name] = value
        else:
            dropped.append(name)
    return (out or None), dropped
