"""Container Device Interface (CDI): read the site's CDI spec files and resolve
fully qualified device names ("vendor/class=name") into container edits.

Follows the CDI specification (github.com/cncf-tags/container-device-interface,
SPEC.md, versions 0.1.0 to 1.1.0) and the reference implementation's loading
rules (pkg/cdi, pkg/parser):

- Spec directories are read in priority order (default /etc/cdi, then
  /var/run/cdi): a device defined in a later directory overrides the same
  device from an earlier one. The same device defined twice in one directory
  is a conflict, reported when that device is requested.
- Spec files are the regular files *.json (parsed with json) and *.yaml/*.yml
  (PyYAML's safe_load, imported only when such a file is read) directly in a
  directory; subdirectories are skipped.
- Unknown fields are refused (the reference parses strictly), the cdiVersion
  must be a released version and at least the version the spec's fields need.
- A broken spec file is recorded in Registry.errors (one line naming the file)
  and skipped; the other files still count.

The daemon runs as root and a spec is a list of host paths that root binds
into containers: a spec file (and its directory) must be owned by root and not
writable by group or others, and a symlink must not lead out of its directory.

Nothing here touches the mount plan: resolve() returns an Edits value that a
later step turns into mounts, device nodes, environment and hooks.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

DEFAULT_SPEC_DIRS = ("/etc/cdi", "/var/run/cdi")

# Released versions of the CDI spec (SPEC.md's table).
KNOWN_VERSIONS = ("0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0", "0.6.0",
                  "0.7.0", "0.8.0", "1.0.0", "1.1.0")

HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer",
              "poststart", "poststop")

# "b" block, "c" and "u" character (unbuffered), "p" FIFO; "" or absent: take it
# from the host node when the edit is applied.
DEVICE_TYPES = ("b", "c", "u", "p")

SPEC_SUFFIXES = (".json", ".yaml", ".yml")
MAX_SPEC_BYTES = 16 << 20

_SPEC_KEYS = {"cdiVersion", "kind", "annotations", "devices", "containerEdits"}
_DEVICE_KEYS = {"name", "annotations", "containerEdits"}
_EDITS_KEYS = {"env", "deviceNodes", "mounts", "hooks", "additionalGids",
               "intelRdt", "netDevices"}
_NODE_KEYS = {"path", "hostPath", "type", "major", "minor", "fileMode",
              "permissions", "uid", "gid"}
_MOUNT_KEYS = {"hostPath", "containerPath", "options", "type"}
_HOOK_KEYS = {"hookName", "path", "args", "env", "timeout"}
_RDT_KEYS = {"closID", "l3CacheSchema", "memBwSchema", "schemata", "enableMonitoring"}
_NETDEV_KEYS = {"hostInterfaceName", "name"}

_UINT32_MAX = 0xFFFFFFFF
_INT64_MAX = (1 << 63) - 1


# ---------------------------------------------------------------- errors

class CDIError(Exception):
    """Base of the errors this module raises."""


class InvalidDeviceName(CDIError, ValueError):
    """A device name that is not a valid qualified CDI name."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.reason = reason
        super().__init__("invalid CDI device name %r: %s" % (name, reason))


class SpecError(CDIError):
    """A spec file that cannot be used; str() is one line naming the file."""

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__("CDI spec %s: %s" % (path, reason))


class UnknownDevice(CDIError):
    """A requested device that no spec defines; .known lists the devices of
    its kind (empty when the kind itself is unknown, then .kinds lists those)."""

    def __init__(self, name: str, known: Sequence[str], kinds: Sequence[str]):
        self.name = name
        self.known = list(known)
        self.kinds = list(kinds)
        if self.known:
            msg = "unknown CDI device %s (known: %s)" % (name, ", ".join(self.known))
        else:
            kind = name.split("=", 1)[0]
            msg = "unknown CDI device %s: no spec defines kind %s (known kinds: %s)" % (
                name, kind, ", ".join(self.kinds) or "none")
        super().__init__(msg)


class DeviceConflict(CDIError):
    """A requested device defined by several spec files of the same priority."""

    def __init__(self, name: str, paths: Sequence[str]):
        self.name = name
        self.paths = list(paths)
        super().__init__("CDI device %s is defined by several spec files of the same "
                         "priority: %s" % (name, ", ".join(self.paths)))


# ---------------------------------------------------------------- edits

class DeviceNode(NamedTuple):
    path: str                       # in the container
    host_path: str                  # on the host (path when the spec has none)
    type: Optional[str] = None      # b, c, u, p; None: from the host node
    major: Optional[int] = None
    minor: Optional[int] = None
    file_mode: Optional[int] = None
    permissions: Optional[str] = None   # cgroup access, subset of "rwm"
    uid: Optional[int] = None
    gid: Optional[int] = None


class Mount(NamedTuple):
    host_path: str
    container_path: str
    options: Tuple[str, ...] = ()
    type: Optional[str] = None


class Hook(NamedTuple):
    hook_name: str
    path: str
    args: Tuple[str, ...] = ()
    env: Tuple[str, ...] = ()
    timeout: Optional[int] = None


class Edits(NamedTuple):
    """What the resolved devices ask of the container, in the spec's order.
    intel_rdt and net_devices are carried as parsed dicts so that a runtime
    which does not implement them can refuse a device that needs them."""

    env: Tuple[str, ...] = ()
    device_nodes: Tuple[DeviceNode, ...] = ()
    mounts: Tuple[Mount, ...] = ()
    hooks: Tuple[Hook, ...] = ()
    additional_gids: Tuple[int, ...] = ()
    intel_rdt: Optional[Dict[str, Any]] = None
    net_devices: Tuple[Dict[str, str], ...] = ()
    devices: Tuple[str, ...] = ()       # qualified names resolved
    spec_files: Tuple[str, ...] = ()    # files they came from

    def merged(self, other: "Edits") -> "Edits":
        """self then other: lists appended, intelRdt replaced (as the reference)."""
        return Edits(
            env=self.env + other.env,
            device_nodes=self.device_nodes + other.device_nodes,
            mounts=self.mounts + other.mounts,
            hooks=self.hooks + other.hooks,
            additional_gids=self.additional_gids + other.additional_gids,
            intel_rdt=other.intel_rdt if other.intel_rdt is not None else self.intel_rdt,
            net_devices=self.net_devices + other.net_devices,
            devices=self.devices + tuple(d for d in other.devices if d not in self.devices),
            spec_files=self.spec_files + tuple(
                f for f in other.spec_files if f not in self.spec_files),
        )

    def is_empty(self) -> bool:
        return not (self.env or self.device_nodes or self.mounts or self.hooks
                    or self.additional_gids or self.intel_rdt is not None
                    or self.net_devices)


# ---------------------------------------------------------------- names

def _is_letter(c: str) -> bool:
    return ("a" <= c <= "z") or ("A" <= c <= "Z")


def _is_alnum(c: str) -> bool:
    return _is_letter(c) or ("0" <= c <= "9")


def _vendor_or_class_problem(what: str, s: str) -> Optional[str]:
    """Vendor and class: a letter first, then letters, digits, '_', '-', '.',
    a letter or digit last."""
    if not s:
        return "empty %s" % what
    if not _is_letter(s[0]):
        return "%s %r must start with a letter" % (what, s)
    for c in s[1:-1]:
        if not (_is_alnum(c) or c in "_-."):
            return "invalid character %r in %s %r" % (c, what, s)
    if not _is_alnum(s[-1]):
        return "%s %r must end with a letter or digit" % (what, s)
    if what == "vendor" and len(s) > 253:
        return "vendor %r is longer than 253 characters" % s
    if what == "class" and len(s) > 63:
        return "class %r is longer than 63 characters" % s
    return None


def _device_name_problem(s: str) -> Optional[str]:
    """Device name: a letter or digit first and last, letters, digits, '_',
    '-', '.', ':' between."""
    if not s:
        return "empty device name"
    if not _is_alnum(s[0]):
        return "device name %r must start with a letter or digit" % s
    for c in s[1:-1]:
        if not (_is_alnum(c) or c in "_-.:"):
            return "invalid character %r in device name %r" % (c, s)
    if not _is_alnum(s[-1]):
        return "device name %r must end with a letter or digit" % s
    return None


def _split_kind(kind: str) -> Tuple[str, str]:
    vendor, sep, cls = kind.partition("/")
    if not sep or not vendor or not cls:
        return "", kind
    return vendor, cls


def parse_qualified_name(device: str) -> Tuple[str, str, str]:
    """"vendor/class=name" -> (vendor, class, name); InvalidDeviceName if it
    is not a qualified name or a part breaks the spec's character rules."""
    if not isinstance(device, str):
        raise InvalidDeviceName(repr(device), "not a string")
    if not device or device.startswith("/"):
        raise InvalidDeviceName(device, "not of the form vendor/class=name")
    kind, sep, name = device.partition("=")
    if not sep or not kind or not name:
        raise InvalidDeviceName(device, "not of the form vendor/class=name")
    vendor, cls = _split_kind(kind)
    if not vendor:
        raise InvalidDeviceName(device, "missing vendor (not of the form vendor/class=name)")
    problem = (_vendor_or_class_problem("vendor", vendor)
               or _vendor_or_class_problem("class", cls)
               or _device_name_problem(name))
    if problem:
        raise InvalidDeviceName(device, problem)
    return vendor, cls, name


def is_qualified_name(device: str) -> bool:
    try:
        parse_qualified_name(device)
    except InvalidDeviceName:
        return False
    return True


# ---------------------------------------------------------------- validation

class _Invalid(Exception):
    """Internal: a rule a spec breaks; turned into SpecError with the path."""


def _version_tuple(v: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def _check_keys(obj: Any, allowed: set, where: str) -> Dict[str, Any]:
    if not isinstance(obj, dict):
        raise _Invalid("%s must be an object" % where)
    for k in obj:
        if k not in allowed:
            raise _Invalid("unknown field %r in %s" % (k, where))
    return obj


def _opt_str(obj: Dict[str, Any], key: str, where: str) -> Optional[str]:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise _Invalid("%s.%s must be a string" % (where, key))
    return v


def _req_str(obj: Dict[str, Any], key: str, where: str) -> str:
    v = _opt_str(obj, key, where)
    if not v:
        raise _Invalid("%s.%s is required" % (where, key))
    return v


def _abs_path(v: str, where: str) -> str:
    if not v.startswith("/"):
        raise _Invalid("%s must be an absolute path, not %r" % (where, v))
    if "\0" in v:
        raise _Invalid("%s contains a NUL byte" % where)
    return v


def _opt_int(obj: Dict[str, Any], key: str, where: str, lo: int, hi: int) -> Optional[int]:
    v = obj.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Invalid("%s.%s must be an integer" % (where, key))
    if not lo <= v <= hi:
        raise _Invalid("%s.%s %d is out of range [%d, %d]" % (where, key, v, lo, hi))
    return v


def _str_list(obj: Dict[str, Any], key: str, where: str) -> Tuple[str, ...]:
    v = obj.get(key)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _Invalid("%s.%s must be a list of strings" % (where, key))
    return tuple(v)


def _env_list(obj: Dict[str, Any], key: str, where: str) -> Tuple[str, ...]:
    env = _str_list(obj, key, where)
    for e in env:
        if e.find("=") <= 0:
            raise _Invalid("%s.%s: %r is not NAME=VALUE" % (where, key, e))
        if "\0" in e:
            raise _Invalid("%s.%s: %r contains a NUL byte" % (where, key, e))
    return env


def _annotations(obj: Dict[str, Any], where: str) -> Dict[str, str]:
    v = obj.get("annotations")
    if v is None:
        return {}
    if not isinstance(v, dict) or not all(
            isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise _Invalid("%s.annotations must map strings to strings" % where)
    return dict(v)


def _device_node(raw: Any, where: str) -> DeviceNode:
    d = _check_keys(raw, _NODE_KEYS, where)
    path = _abs_path(_req_str(d, "path", where), where + ".path")
    host = _opt_str(d, "hostPath", where)
    if host:
        _abs_path(host, where + ".hostPath")
    dtype = _opt_str(d, "type", where) or None
    if dtype is not None and dtype not in DEVICE_TYPES:
        raise _Invalid("%s.type %r is not one of %s" % (where, dtype, "/".join(DEVICE_TYPES)))
    perms = _opt_str(d, "permissions", where) or None
    if perms is not None and any(c not in "rwm" for c in perms):
        raise _Invalid("%s.permissions %r is not made of r, w, m" % (where, perms))
    return DeviceNode(
        path=path,
        host_path=host or path,
        type=dtype,
        # negative numbers would be wildcards in a cgroup rule: refused
        major=_opt_int(d, "major", where, 0, _INT64_MAX),
        minor=_opt_int(d, "minor", where, 0, _INT64_MAX),
        # permission bits (and setuid/setgid/sticky) only
        file_mode=_opt_int(d, "fileMode", where, 0, 0o7777),
        permissions=perms,
        uid=_opt_int(d, "uid", where, 0, _UINT32_MAX),
        gid=_opt_int(d, "gid", where, 0, _UINT32_MAX),
    )


def _mount(raw: Any, where: str) -> Mount:
    m = _check_keys(raw, _MOUNT_KEYS, where)
    host = _req_str(m, "hostPath", where)
    cpath = _abs_path(_req_str(m, "containerPath", where), where + ".containerPath")
    options = _str_list(m, "options", where)
    mtype = _opt_str(m, "type", where) or None
    # A bind mount's source is a host path root binds: it must be absolute.
    if mtype in (None, "bind", "none") or "bind" in options or "rbind" in options:
        _abs_path(host, where + ".hostPath")
    return Mount(host_path=host, container_path=cpath, options=options, type=mtype)


def _hook(raw: Any, where: str) -> Hook:
    h = _check_keys(raw, _HOOK_KEYS, where)
    name = _req_str(h, "hookName", where)
    if name not in HOOK_NAMES:
        raise _Invalid("%s.hookName %r is not one of %s" % (where, name, ", ".join(HOOK_NAMES)))
    path = _abs_path(_req_str(h, "path", where), where + ".path")
    timeout = _opt_int(h, "timeout", where, 1, _INT64_MAX)
    return Hook(hook_name=name, path=path, args=_str_list(h, "args", where),
                env=_env_list(h, "env", where), timeout=timeout)


def _list_of(e: Dict[str, Any], key: str, where: str) -> List[Any]:
    v = e.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise _Invalid("%s.%s must be a list" % (where, key))
    return v


def _edits(raw: Any, where: str) -> Edits:
    if raw is None:
        return Edits()
    e = _check_keys(raw, _EDITS_KEYS, where)
    nodes = tuple(_device_node(x, "%s.deviceNodes[%d]" % (where, i))
                  for i, x in enumerate(_list_of(e, "deviceNodes", where)))
    mounts = tuple(_mount(x, "%s.mounts[%d]" % (where, i))
                   for i, x in enumerate(_list_of(e, "mounts", where)))
    hooks = tuple(_hook(x, "%s.hooks[%d]" % (where, i))
                  for i, x in enumerate(_list_of(e, "hooks", where)))
    gids = []
    for g in _list_of(e, "additionalGids", where):
        if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g <= _UINT32_MAX:
            raise _Invalid("%s.additionalGids: %r is not a uint32" % (where, g))
        if g:   # the spec: a value of 0 is ignored
            gids.append(g)
    rdt = e.get("intelRdt")
    if rdt is not None:
        rdt = dict(_check_keys(rdt, _RDT_KEYS, where + ".intelRdt"))
        clos = rdt.get("closID", "")
        if not isinstance(clos, str) or clos in (".", "..") or (
                clos != "/" and ("/" in clos or "\n" in clos)) or len(clos) >= 4096:
            raise _Invalid("%s.intelRdt.closID %r is not a valid name" % (where, clos))
    netdevs = []
    for i, x in enumerate(_list_of(e, "netDevices", where)):
        w = "%s.netDevices[%d]" % (where, i)
        n = _check_keys(x, _NETDEV_KEYS, w)
        netdevs.append({"hostInterfaceName": _req_str(n, "hostInterfaceName", w),
                        "name": _req_str(n, "name", w)})
    return Edits(env=_env_list(e, "env", where), device_nodes=nodes, mounts=mounts,
                 hooks=hooks, additional_gids=tuple(gids), intel_rdt=rdt,
                 net_devices=tuple(netdevs))


def _required_version(raw: Dict[str, Any], kind_class: str,
                      edits: Sequence[Tuple[Dict[str, Any], Edits]],
                      names: Sequence[str], annotated: bool) -> str:
    """The lowest spec version that has every field this spec uses
    (SPEC.md's table of released versions)."""
    need = "0.3.0"

    def at_least(v: str) -> None:
        nonlocal need
        if _version_tuple(v) > _version_tuple(need):
            need = v

    for rawe, ed in edits:
        if any(m.type is not None for m in ed.mounts):
            at_least("0.4.0")
        for n in (rawe or {}).get("deviceNodes") or []:
            if isinstance(n, dict) and n.get("hostPath"):
                at_least("0.5.0")
        if ed.additional_gids or (rawe or {}).get("additionalGids") or ed.intel_rdt is not None:
            at_least("0.7.0")
        if ed.intel_rdt is not None and ("schemata" in ed.intel_rdt
                                         or "enableMonitoring" in ed.intel_rdt):
            at_least("1.1.0")
        if ed.net_devices:
            at_least("1.1.0")
    if any(n and not _is_letter(n[0]) for n in names):
        at_least("0.5.0")
    if annotated or "." in kind_class:
        at_least("0.6.0")
    return need


class _Spec(NamedTuple):
    path: str
    priority: int
    kind: str
    edits: Edits                # spec-level edits
    devices: Dict[str, Edits]   # name -> device edits


def _validate_spec(raw: Any, path: str, priority: int) -> _Spec:
    spec = _check_keys(raw, _SPEC_KEYS, "the spec")
    version = spec.get("cdiVersion")
    if version is None:
        raise _Invalid("cdiVersion is required")
    if not isinstance(version, str) or version not in KNOWN_VERSIONS:
        raise _Invalid("cdiVersion %r is not a known CDI version (%s)"
                       % (version, ", ".join(KNOWN_VERSIONS)))
    kind = spec.get("kind")
    if not isinstance(kind, str) or not kind:
        raise _Invalid("kind is required")
    vendor, cls = _split_kind(kind)
    if not vendor:
        raise _Invalid("kind %r is not of the form vendor/class" % kind)
    problem = _vendor_or_class_problem("vendor", vendor) or _vendor_or_class_problem("class", cls)
    if problem:
        raise _Invalid("kind %r: %s" % (kind, problem))
    annotated = bool(_annotations(spec, "the spec"))
    spec_edits = _edits(spec.get("containerEdits"), "containerEdits")
    raw_devices = spec.get("devices")
    if not isinstance(raw_devices, list) or not raw_devices:
        raise _Invalid("devices is required and must list at least one device")
    devices: Dict[str, Edits] = {}
    all_edits = [(spec.get("containerEdits"), spec_edits)]
    for i, rd in enumerate(raw_devices):
        where = "devices[%d]" % i
        d = _check_keys(rd, _DEVICE_KEYS, where)
        name = d.get("name")
        if not isinstance(name, str) or not name:
            raise _Invalid("%s.name is required" % where)
        problem = _device_name_problem(name)
        if problem:
            raise _Invalid("%s: %s" % (where, problem))
        if name in devices:
            raise _Invalid("device %r is defined twice" % name)
        if _annotations(d, where):
            annotated = True
        where = "device %r containerEdits" % name
        if d.get("containerEdits") is None:
            raise _Invalid("%s: containerEdits is required" % where)
        ed = _edits(d.get("containerEdits"), where)
        if ed.is_empty():
            raise _Invalid("%s: empty container edits" % where)
        devices[name] = ed
        all_edits.append((d.get("containerEdits"), ed))
    need = _required_version(spec, cls, all_edits, list(devices), annotated)
    if _version_tuple(need) > _version_tuple(version):
        raise _Invalid("cdiVersion %s is too old for the fields used (they need %s)"
                       % (version, need))
    return _Spec(path=path, priority=priority, kind=kind, edits=spec_edits, devices=devices)


# ---------------------------------------------------------------- files

def _check_owner_mode(st: os.stat_result, path: str, what: str) -> None:
    if st.st_uid != 0:
        raise SpecError(path, "%s is owned by uid %d, not root: refused (root binds "
                        "the host paths it names)" % (what, st.st_uid))
    if st.st_mode & 0o022:
        raise SpecError(path, "%s is writable by group or others (mode %04o): refused"
                        % (what, stat.S_IMODE(st.st_mode)))


def _read_spec_file(directory: str, realdir: str, name: str) -> bytes:
    path = os.path.join(directory, name)
    target = path
    if os.path.islink(path):
        real = os.path.realpath(path)
        if os.path.dirname(real) != realdir:
            raise SpecError(path, "symlink to %s leads out of %s: refused" % (real, directory))
        target = real
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise SpecError(path, "cannot open: %s" % (e.strerror or e))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SpecError(path, "not a regular file")
        _check_owner_mode(st, path, "the file")
        if st.st_size > MAX_SPEC_BYTES:
            raise SpecError(path, "larger than %d bytes" % MAX_SPEC_BYTES)
        chunks = []
        total = 0
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            total += len(b)
            if total > MAX_SPEC_BYTES:
                raise SpecError(path, "larger than %d bytes" % MAX_SPEC_BYTES)
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _parse(data: bytes, path: str) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError(path, "not UTF-8 text")
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except ValueError as e:
            raise SpecError(path, "invalid JSON: %s" % e)
    import yaml  # lazily: only sites with YAML specs need PyYAML
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(path, "invalid YAML: %s" % " ".join(str(e).split()))


def load_spec(directory: str, name: str, priority: int = 0, realdir: Optional[str] = None) -> _Spec:
    """Read and validate one spec file; SpecError (one line, naming the file)."""
    path = os.path.join(directory, name)
    if realdir is None:
        realdir = os.path.realpath(directory)
    data = _read_spec_file(directory, realdir, name)
    raw = _parse(data, path)
    try:
        return _validate_spec(raw, path, priority)
    except _Invalid as e:
        raise SpecError(path, str(e))
    except RecursionError:
        raise SpecError(path, "nested too deeply")


# ---------------------------------------------------------------- registry

class Registry:
    """The devices of the spec files in dirs (later directories override
    earlier ones). Loaded once, at construction; refresh() reloads."""

    def __init__(self, dirs: Optional[Iterable[str]] = None):
        self.dirs = [os.path.normpath(d) for d in (DEFAULT_SPEC_DIRS if dirs is None else dirs)]
        self.refresh()

    def refresh(self) -> None:
        self.errors: List[SpecError] = []
        self.specs: List[_Spec] = []
        # qualified name -> (spec, priority); conflicts: name -> paths
        self._devices: Dict[str, _Spec] = {}
        self._conflicts: Dict[str, List[str]] = {}
        for priority, d in enumerate(self.dirs):
            for spec in self._load_dir(d, priority):
                self.specs.append(spec)
                for name in spec.devices:
                    q = spec.kind + "=" + name
                    old = self._devices.get(q)
                    if old is None or old.priority < spec.priority:
                        self._devices[q] = spec
                        self._conflicts.pop(q, None)
                    elif old.priority == spec.priority:
                        self._conflicts.setdefault(q, [old.path]).append(spec.path)

    def _load_dir(self, d: str, priority: int) -> List[_Spec]:
        try:
            st = os.stat(d)
        except FileNotFoundError:
            return []
        except OSError as e:
            self.errors.append(SpecError(d, "cannot read the directory: %s" % (e.strerror or e)))
            return []
        if not stat.S_ISDIR(st.st_mode):
            self.errors.append(SpecError(d, "not a directory"))
            return []
        try:
            _check_owner_mode(st, d, "the directory")
            names = sorted(os.listdir(d))
        except SpecError as e:
            self.errors.append(e)
            return []
        except OSError as e:
            self.errors.append(SpecError(d, "cannot read the directory: %s" % (e.strerror or e)))
            return []
        realdir = os.path.realpath(d)
        specs = []
        for name in names:
            if not name.endswith(SPEC_SUFFIXES) or name.startswith("."):
                continue
            path = os.path.join(d, name)
            if os.path.isdir(path) and not os.path.islink(path):
                continue
            try:
                specs.append(load_spec(d, name, priority, realdir))
            except SpecError as e:
                self.errors.append(e)
        return specs

    def devices(self) -> List[str]:
        """Every qualified device name, sorted."""
        return sorted(self._devices)

    def kinds(self) -> List[str]:
        return sorted({s.kind for s in self.specs})

    def resolve(self, names: Iterable[str]) -> Edits:
        """The edits for these qualified names: each spec's own containerEdits
        (once, in the order its first device is requested), then each device's,
        in the order requested. Raises InvalidDeviceName, UnknownDevice,
        DeviceConflict."""
        wanted: List[str] = []
        for n in names:
            parse_qualified_name(n)
            if n not in wanted:
                wanted.append(n)
        specs: List[_Spec] = []
        for n in wanted:
            if n in self._conflicts:
                raise DeviceConflict(n, self._conflicts[n])
            spec = self._devices.get(n)
            if spec is None:
                kind = n.split("=", 1)[0]
                known = [q for q in sorted(self._devices) if q.split("=", 1)[0] == kind]
                raise UnknownDevice(n, known, self.kinds())
            if spec not in specs:
                specs.append(spec)
        out = Edits()
        for spec in specs:
            out = out.merged(spec.edits._replace(spec_files=(spec.path,)))
        for n in wanted:
            spec = self._devices[n]
            dev = spec.devices[n.split("=", 1)[1]]
            out = out.merged(dev._replace(devices=(n,)))
        return out
