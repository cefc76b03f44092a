"""The container's /etc/passwd and /etc/group: the image's, plus the job's user.

Programs inside the image (id, ssh, MPI launchers, Python's getpass) look the
running uid up in the image's own files, which don't know the job's user.
We keep every well-formed entry of the image's files, drop those that clash
with the job user (by name or by id), and append the user and their primary
group. Pure functions on text; reading the files out of the image safely is
the caller's job (see namespaces.read_image_file).
"""

from __future__ import annotations

from typing import List, Optional

from ..errors import InvalidArgument

MAX_FILE_BYTES = 4 << 20  # bound on what we read from an image's passwd/group
MAX_LINES = 65536
_BAD = set(":\n\r\0")


def _check_field(what: str, value: str) -> str:
    if value is None or any(c in _BAD for c in value):
        raise InvalidArgument(f"{what} {value!r} cannot appear in /etc/passwd")
    return value


def _lines(text: Optional[str]) -> List[str]:
    if not text:
        return []
    return text.replace("\r", "").split("\n")[:MAX_LINES]


def _id_field(value: str) -> Optional[int]:
    return int(value) if value.isdigit() and len(value) <= 10 else None


def passwd_entries(text: Optional[str]) -> List[List[str]]:
    """Well-formed passwd lines as field lists; garbage, comments and NIS '+' lines dropped."""
    out = []
    for line in _lines(text):
        f = line.split(":")
        if len(f) != 7 or not f[0] or f[0][0] in "+-#" or any(c.isspace() for c in f[0]):
            continue
        if _id_field(f[2]) is None or _id_field(f[3]) is None:
            continue
        out.append(f)
    return out


def group_entries(text: Optional[str]) -> List[List[str]]:
    out = []
    for line in _lines(text):
        f = line.split(":")
        if len(f) != 4 or not f[0] or f[0][0] in "+-#" or any(c.isspace() for c in f[0]):
            continue
        if _id_field(f[2]) is None:
            continue
        out.append(f)
    return out


def make_passwd(image_text: Optional[str], user_name: str, uid: int, gid: int, home: str,
                shell: str = "/bin/sh", gecos: str = "") -> str:
    """The image's passwd without entries named user_name or with uid, plus the user's entry."""
    for what, v in (("user name", user_name), ("home", home), ("shell", shell), ("gecos", gecos)):
        _check_field(what, v)
    if not user_name:
        raise InvalidArgument("empty user name")
    kept = [f for f in passwd_entries(image_text) if f[0] != user_name and int(f[2]) != uid]
    kept.append([user_name, "x", str(uid), str(gid), gecos, home, shell])
    return "".join(":".join(f) + "\n" for f in kept)


def make_group(image_text: Optional[str], group_name: str, gid: int,
               members: Optional[List[str]] = None) -> str:
    """The image's group without entries named group_name or with gid, plus the user's group."""
    _check_field("group name", group_name)
    if not group_name:
        raise InvalidArgument("empty group name")
    for m in members or []:
        _check_field("group member", m)
        if "," in m:
            raise InvalidArgument(f"group member {m!r} cannot contain ','")
    kept = [f for f in group_entries(image_text) if f[0] != group_name and int(f[2]) != gid]
    kept.append([group_name, "x", str(gid), ",".join(members or [])])
    return "".join(":".join(f) + "\n" for f in kept)
