"""--oci-mounts / --container-mounts items: `SRC[:DST[:FLAGS]]` binds and `tmpfs:DST[:FLAGS]`.

pyxis writes FLAGS as enroot's mount(8) options joined by '+' (`ro+rprivate`: the ','
already separates items) and hands them to enroot; this module reads that syntax and keeps
only what means something here. The step client checks every item at submit (one line
naming the flag when it is refused) and the daemon parses the same text again before
planning: nothing a user wrote reaches mount(2) except the numbers below, re-rendered.

Binds: `ro`, `rw`; `rbind`, `nosuid`, `nodev`, `private`, `rprivate` and `x-create=...`
are what every bind here is already (recursive, nosuid, nodev, private propagation, its
missing mount point created as its source's kind) and change nothing; `noexec` is applied.
tmpfs: `size=`, `nr_inodes=`, `mode=` (numbers only), `noexec`, and the no-ops. Anything
else (propagation from the host, exec/suid/dev, enroot's x-move/x-detach, ...) is refused.

Light on imports (re, which argparse loads anyway): the step client imports it on every
submit and step.
"""

from __future__ import annotations

import re
from collections import namedtuple

from .errors import InvalidArgument

#: one item. kind: "bind" | "tmpfs"; source: the host path ("" for a tmpfs); options: the
#: kept flags, normalised (bind: ("noexec",) or (); tmpfs: ("size=1g", "mode=0700", ...))
MountItem = namedtuple("MountItem", "source target read_only kind options")

#: flags that every mount here already has: accepted, nothing to do
_NO_OPS = frozenset(("rbind", "nosuid", "nodev", "private", "rprivate",
                     "x-create=auto", "x-create=dir", "x-create=file"))
#: why a flag pyxis/enroot/mount(8) knows is refused, and what to do instead
_REFUSED = {
    "bind": "every bind here is recursive (rbind); drop the flag",
    "slave": "binds are private: host mounts made later do not appear in the container",
    "rslave": "binds are private: host mounts made later do not appear in the container",
    "shared": "binds are private: mount events do not propagate",
    "rshared": "binds are private: mount events do not propagate",
    "unbindable": "binds are private; drop the flag",
    "runbindable": "binds are private; drop the flag",
    "exec": "the flags here can only add restrictions",
    "suid": "mounts in the container are always nosuid",
    "dev": "mounts in the container are always nodev",
    "x-move": "enroot's x-move has no equivalent",
    "x-detach": "enroot's x-detach (umount) has no equivalent",
}
# never 0: for a tmpfs, size=0 and nr_inodes=0 mean no limit
_SIZE = re.compile(r"^[1-9][0-9]{0,14}[kmg]?$|^(100|[1-9][0-9]?)%$")
_COUNT = re.compile(r"^[1-9][0-9]{0,14}[kmg]?$")
#: the most mounts one option or variable may list: the daemon plans each against the others
MAX_ITEMS = 64
#: what the step's tmpfs mounts without size= share (the kernel's default for one, said
#: out loud): each gets its part, so that together they promise no more
UNSIZED_SHARE = 50
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_MODE = re.compile(r"^0?[0-1]?[0-7]{3}$")
_NUMBERS = {"size": _SIZE, "nr_inodes": _COUNT, "mode": _MODE}  # a tmpfs' options


def _path(p: str, what: str, item: str) -> str:
    if not p.startswith("/") or "\0" in p or "\n" in p or "/../" in p + "/":
        if p and not p.startswith("/") and what == "source":
            raise InvalidArgument(f"{item}: source {p!r} must be an absolute path "
                                  f"(pyxis' relative sources: write $PWD/{p.lstrip('./')})")
        raise InvalidArgument(f"{item}: {p!r} must be an absolute path without '..'")
    out = "/" + "/".join(c for c in p.split("/") if c not in ("", "."))
    return out


def _flags(text: str, kind: str, item: str):
    """('+'- or ','-joined flags) -> (read_only, kept options), or InvalidArgument."""
    ro, kept = False, []
    for flag in text.split("+"):
        f = flag.strip()
        low = f.lower()
        if not f or low in _NO_OPS:
            continue
        if low in ("ro", "rw"):
            if kind == "tmpfs" and low == "ro":
                raise InvalidArgument(f"{item}: ro: a read-only tmpfs would stay empty; "
                                      f"drop the flag")
            ro = low == "ro"
            continue
        if low == "noexec":
            kept.append("noexec")
            continue
        name, eq, value = low.partition("=")
        if kind == "tmpfs" and eq and name in ("size", "nr_inodes", "mode"):
            ok = _NUMBERS[name].match(value)
            if not ok or (name == "mode" and int(value, 8) > 0o1777):
                want = {"size": "a number of bytes with k, m or g, or a percentage of memory",
                        "nr_inodes": "a number with k, m or g",
                        "mode": "octal, at most 1777"}[name]
                raise InvalidArgument(f"{item}: {f}: {name}= must be {want}")
            kept = [k for k in kept if not k.startswith(name + "=")] + [f"{name}={value}"]
            continue
        why = _REFUSED.get(low)
        if why is None and kind == "bind" and name in ("size", "nr_inodes", "mode"):
            why = "only a tmpfs takes it (tmpfs:DST:FLAGS)"
        if why is None:
            why = ("not supported; binds take ro, rw, noexec (and rbind, private, rprivate, "
                   "nosuid, nodev, x-create=: what they already are)" if kind == "bind" else
                   "not supported; a tmpfs takes size=, nr_inodes=, mode=, noexec")
        raise InvalidArgument(f"{item}: mount flag {f!r}: {why}")
    return ro, tuple(kept)


def parse_item(item: str, what: str) -> MountItem:
    """One `SRC[:DST[:FLAGS]]` or `tmpfs:DST[:FLAGS]`; what: where it came from (for errors)."""
    where = f"{what}: {item!r}"
    parts = item.split(":", 2)
    if parts[0] == "umount":
        raise InvalidArgument(f"{where}: umount: sources have no equivalent (the container "
                              f"holds only the image and the mounts you ask for)")
    if parts[0] == "tmpfs":
        if len(parts) < 2 or not parts[1]:
            raise InvalidArgument(f"{where}: a tmpfs needs its target: tmpfs:DST[:FLAGS]")
        ro, options = _flags(parts[2] if len(parts) > 2 else "", "tmpfs", where)
        dst = _path(parts[1], "target", where)
        if dst == "/":
            raise InvalidArgument(f"{where}: cannot mount over the container's root")
        return MountItem("", dst, False, "tmpfs", options)
    if len(parts) == 1:
        parts = [parts[0], parts[0]]
    if not parts[0] or not parts[1] or (len(parts) == 3 and not parts[2]):
        raise InvalidArgument(f"{where} is not SRC:DST[:FLAGS]")
    ro, options = _flags(parts[2] if len(parts) > 2 else "", "bind", where)
    return MountItem(_path(parts[0], "source", where), _path(parts[1], "target", where),
                     ro, "bind", options)


def parse_list(text: str, what: str) -> list:
    """'ITEM,ITEM,...' -> [MountItem]; an empty item (a trailing comma) is skipped."""
    items = [i.strip() for i in (text or "").split(",") if i.strip()]
    if len(items) > MAX_ITEMS:
        raise InvalidArgument(f"{what}: {len(items)} mounts, more than the {MAX_ITEMS} one "
                              f"step may have")
    return [parse_item(i, what) for i in items]


def _has_size(options) -> bool:
    return any(o.startswith("size=") for o in options)


def default_size(tmpfs_options) -> str:
    """size= of each of the step's tmpfs mounts that gives none."""
    unsized = sum(not _has_size(o) for o in tmpfs_options)
    return f"{max(1, UNSIZED_SHARE // max(1, unsized))}%"


def tmpfs_data(options, uid: int, gid: int, size: str = f"{UNSIZED_SHARE}%") -> str:
    """A tmpfs' mount data from parsed options: only the whitelisted numbers, re-checked,
    the owner (the step's user; mode 0700 unless mode= says otherwise) and a size (size:
    where the options give none)."""
    out = {"mode": "0700", "size": size}
    for o in options:
        name, eq, value = o.partition("=")
        if not eq:
            continue
        rx = _NUMBERS.get(name)
        if rx is None or not rx.match(value):
            raise InvalidArgument(f"tmpfs option {o!r} is not one this daemon passes on")
        out[name] = value
    out["uid"], out["gid"] = str(int(uid)), str(int(gid))
    return ",".join(f"{k}={v}" for k, v in out.items())


def tmpfs_bytes(options, mem_total: int, size: str) -> int:
    """What a tmpfs with these (checked) options may hold against mem_total (size: where
    the options give none)."""
    for o in options:
        name, _eq, value = o.partition("=")
        if name == "size":
            size = value
    if size.endswith("%"):
        return mem_total * int(size[:-1]) // 100
    unit = size[-1] if size[-1] in "kmg" else ""
    return int(size[:-1] if unit else size) * _UNITS[unit]


def check_tmpfs_total(tmpfs_options, mem_total: int) -> None:
    """The step's tmpfs mounts may not together promise more than the node's memory (their
    pages are the node's until the step ends, whoever wrote them)."""
    size = default_size(tmpfs_options)
    total = sum(tmpfs_bytes(o, mem_total, size) for o in tmpfs_options)
    if total > mem_total:
        raise InvalidArgument(f"tmpfs mounts: {total >> 20} MiB together, more than this node's "
                              f"memory ({mem_total >> 20} MiB): give them smaller size=")


def request_options(kind: str, options: str) -> tuple:
    """A Mount message's kind ("" for a bind) and options, parsed again by the daemon."""
    if kind not in ("", "tmpfs"):
        raise InvalidArgument(f"mount kind {kind!r} is not one this daemon knows")
    return _flags(options, kind or "bind", "mount options")[1]
