"""The daemon and CLI configuration file (INI), with clear errors for bad values.

Default path /etc/oci-image/oci-image.conf; every key is optional. See
docs/configuration.md for the meaning of each key.
"""

from __future__ import annotations

import configparser
import os
import re
import socket as socketlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .configkeys import known as known_keys
from .errors import ConfigError

DEFAULT_PATH = "/etc/oci-image/oci-image.conf"
COMPRESSORS = ("zstd", "gzip", "xz", "lz4", "lzo", "lzma")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB]?)\s*$")


def parse_size(text: str, what: str) -> int:
    """'200G', '1.5T', '500M', '1024' -> bytes (powers of 1024, as admins expect from df -h)."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"{what}: {text!r} is not a size (examples: 500M, 200G, 2T)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def _split_list(text: str) -> List[str]:
    return [x for x in re.split(r"[,\s]+", text.strip()) if x]


@dataclass
class Config:
    cache_dir: Path = Path("/var/lib/oci-image/cache")
    quota: Optional[int] = None
    lease_ttl: float = 600.0
    lock_timeout: float = 60.0          # a cache lock's short critical sections
    convert_timeout: float = 3600.0     # waiting for another node's conversion
    locking: str = "auto"               # auto | flock | claim (docs/configuration.md)
    claim_stale: float = 60.0           # claim mode: no heartbeat this long = claimer died
    socket: Path = Path("/run/oci-image/oci-imaged.sock")
    runtime_dir: Path = Path("/run/oci-image")
    containers_dir: Optional[Path] = None     # None: <runtime_dir>/containers (--oci-name)
    containers_min_free: int = 1 << 30        # free space a named container's step needs
    containers_per_job: int = 16              # named containers one job may have on a node
    node: str = field(default_factory=socketlib.gethostname)
    metrics: Optional[Tuple[str, int]] = None
    log_level: str = "warning"
    mount_idle: float = 60.0
    insecure_registries: List[str] = field(default_factory=list)
    trusted_squashfs: List[str] = field(default_factory=list)
    publish_to: Optional[str] = None
    compression: str = "zstd"
    level: int = 3
    jobs: int = 0
    prefetch_socket: Optional[Path] = None   # None: oci-imaged-prefetch.sock next to socket
    prefetch_enabled: bool = True
    prefetch_rate: int = 30                  # new prefetch pulls a minute, all users
    prefetch_rate_per_user: int = 10         # ... per uid
    prefetch_running: int = 4                # prefetch pulls at once, all users
    prefetch_running_per_user: int = 2       # ... per uid
    prefetch_request_timeout: float = 5.0    # a user socket request must arrive within this
    publish_running: int = 4                 # `oci-image publish` through the daemon at once
    publish_running_per_user: int = 1        # ... per uid
    publish_timeout: float = 3600.0          # one publish, conversion and upload included
    slurm_jobs: str = "auto"
    slurm_conf: Optional[str] = None
    slurm_refresh: float = 30.0
    hooks_dir: Path = Path("/etc/oci-image/hooks.d")   # step hooks (runtime/hooks.py)
    hooks_timeout: float = 60.0
    cdi_spec_dirs: Tuple[str, ...] = ("/etc/cdi", "/var/run/cdi")   # runtime/cdi.py
    gpu_cdi_kind: str = ""          # e.g. nvidia.com/gpu: Slurm's GPUs as CDI devices
    # fairness between users, and how long a SIGTERM may take (see docs/configuration.md)
    max_pulls_per_uid: int = 4
    max_requests_per_uid: int = 64
    stop_timeout: float = 5.0
    # registry deadlines: registry/transport.py NetLimits
    connect_timeout: float = 10.0
    stall_timeout: float = 30.0
    request_timeout: float = 60.0
    min_rate: int = 16 << 10
    rate_window: float = 60.0
    source: Optional[Path] = None

    def net_limits(self):
        from .registry.transport import NetLimits
        return NetLimits(connect=self.connect_timeout, stall=self.stall_timeout,
                         request=self.request_timeout, min_rate=self.min_rate,
                         rate_window=self.rate_window)


#: the accepted keys, per section: declared with their meanings in configkeys.py
_KNOWN: Dict[str, Tuple[str, ...]] = known_keys()
SLURM_MODES = ("auto", "cli", "pyslurm", "off")
#: [cache] locking: how converters on different nodes exclude each other (cachelock.py)
LOCKING_MODES = ("auto", "flock", "claim")


def _float(sec: str, key: str, text: str, minimum: float = 0.0) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"[{sec}] {key}: {text!r} is not a number") from None
    if v < minimum:
        raise ConfigError(f"[{sec}] {key}: must be at least {minimum}")
    return v


def load_config(path: Optional[os.PathLike] = None, *, required: bool = False) -> Config:
    """Read the config file; a missing default file means all defaults."""
    p = Path(path or os.environ.get("OCI_IMAGE_CONFIG") or DEFAULT_PATH)
    cfg = Config()
    if not p.exists():
        if required or path is not None:
            raise ConfigError(f"config file {p} does not exist")
        return cfg
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    try:
        with open(p, encoding="utf-8") as f:
            parser.read_file(f)
    except configparser.Error as e:
        raise ConfigError(f"{p}: {e.message.splitlines()[0] if hasattr(e, 'message') else e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    cfg.source = p
    for sec in parser.sections():
        if sec not in _KNOWN:
            raise ConfigError(f"{p}: unknown section [{sec}] (known: {', '.join(_KNOWN)})")
        for key in parser[sec]:
            if key not in _KNOWN[sec]:
                raise ConfigError(f"{p}: unknown key {key!r} in [{sec}] "
                                  f"(known: {', '.join(_KNOWN[sec])})")
    g = parser.get
    try:
        if parser.has_option("cache", "dir"):
            cfg.cache_dir = Path(g("cache", "dir"))
        if parser.has_option("cache", "quota"):
            q = g("cache", "quota").strip()
            cfg.quota = None if q in ("", "none", "0") else parse_size(q, "[cache] quota")
        if parser.has_option("cache", "lease_ttl"):
            cfg.lease_ttl = _float("cache", "lease_ttl", g("cache", "lease_ttl"), 10)
        if parser.has_option("cache", "lock_timeout"):
            cfg.lock_timeout = _float("cache", "lock_timeout", g("cache", "lock_timeout"), 1)
        if parser.has_option("cache", "convert_timeout"):
            cfg.convert_timeout = _float("cache", "convert_timeout",
                                         g("cache", "convert_timeout"), 1)
        if parser.has_option("cache", "locking"):
            cfg.locking = g("cache", "locking").strip().lower()
        if parser.has_option("cache", "claim_stale"):
            # a heartbeat every min(5 s, claim_stale/4): below 2 s a busy node looks dead
            cfg.claim_stale = _float("cache", "claim_stale", g("cache", "claim_stale"), 2)
        if parser.has_option("daemon", "socket"):
            cfg.socket = Path(g("daemon", "socket"))
        if parser.has_option("daemon", "runtime_dir"):
            cfg.runtime_dir = Path(g("daemon", "runtime_dir"))
        if parser.has_option("daemon", "containers_dir"):
            cfg.containers_dir = Path(g("daemon", "containers_dir").strip())
            if not cfg.containers_dir.is_absolute():
                raise ConfigError(f"[daemon] containers_dir: {cfg.containers_dir} must be an "
                                  f"absolute path")
        if parser.has_option("daemon", "containers_min_free"):
            v = g("daemon", "containers_min_free").strip()
            cfg.containers_min_free = 0 if v in ("0", "off", "none") else \
                parse_size(v, "[daemon] containers_min_free")
        if parser.has_option("daemon", "containers_per_job"):
            v = g("daemon", "containers_per_job").strip()
            if not v.isdigit() or int(v) < 1:
                raise ConfigError(f"[daemon] containers_per_job: {v!r} is not a positive number")
            cfg.containers_per_job = int(v)
        if parser.has_option("daemon", "node"):
            cfg.node = g("daemon", "node").strip()
        if parser.has_option("daemon", "metrics"):
            cfg.metrics = parse_listen(g("daemon", "metrics"))
        if parser.has_option("daemon", "log_level"):
            lvl = g("daemon", "log_level").strip().lower()
            if lvl not in ("debug", "info", "warning", "error"):
                raise ConfigError(f"[daemon] log_level: {lvl!r} is not one of debug, info, warning, error")
            cfg.log_level = lvl
        if parser.has_option("daemon", "mount_idle"):
            cfg.mount_idle = _float("daemon", "mount_idle", g("daemon", "mount_idle"))
        if parser.has_option("daemon", "prefetch_socket"):
            v = g("daemon", "prefetch_socket").strip()
            if v.lower() in ("off", "no", "none"):
                cfg.prefetch_enabled = False
            elif v:
                cfg.prefetch_socket = Path(v)
        if parser.has_option("daemon", "prefetch_rate"):
            cfg.prefetch_rate = int(_float("daemon", "prefetch_rate", g("daemon", "prefetch_rate"), 0))
        for key in ("prefetch_rate_per_user", "prefetch_running", "prefetch_running_per_user"):
            if parser.has_option("daemon", key):
                setattr(cfg, key, int(_float("daemon", key, g("daemon", key), 0)))
        if parser.has_option("daemon", "prefetch_request_timeout"):
            cfg.prefetch_request_timeout = _float("daemon", "prefetch_request_timeout",
                                                  g("daemon", "prefetch_request_timeout"), 0.1)
        if parser.has_option("daemon", "hooks_dir"):
            cfg.hooks_dir = Path(g("daemon", "hooks_dir").strip())
            if not cfg.hooks_dir.is_absolute():
                raise ConfigError(f"[daemon] hooks_dir: {cfg.hooks_dir} must be an absolute path")
        if parser.has_option("daemon", "cdi_spec_dirs"):
            dirs = tuple(g("daemon", "cdi_spec_dirs").split())
            for d in dirs:
                if not d.startswith("/"):
                    raise ConfigError(f"[daemon] cdi_spec_dirs: {d} must be an absolute path")
            cfg.cdi_spec_dirs = dirs
        if parser.has_option("daemon", "gpu_cdi_kind"):
            kind = g("daemon", "gpu_cdi_kind").strip()
            if kind:
                from .runtime.cdi import InvalidDeviceName, parse_qualified_name
                try:
                    parse_qualified_name(kind + "=0")
                except InvalidDeviceName as e:
                    raise ConfigError(f"[daemon] gpu_cdi_kind: {kind!r} is not a CDI kind "
                                      f"(vendor/class): {e.reason}") from None
            cfg.gpu_cdi_kind = kind
        if parser.has_option("daemon", "hooks_timeout"):
            cfg.hooks_timeout = _float("daemon", "hooks_timeout", g("daemon", "hooks_timeout"), 1)
        for key, minimum in (("max_pulls_per_uid", 1), ("max_requests_per_uid", 1),
                             ("publish_running", 0), ("publish_running_per_user", 0)):
            if parser.has_option("daemon", key):
                setattr(cfg, key, int(_float("daemon", key, g("daemon", key), minimum)))
        if parser.has_option("daemon", "publish_timeout"):
            cfg.publish_timeout = _float("daemon", "publish_timeout",
                                         g("daemon", "publish_timeout"), 1)
        if parser.has_option("daemon", "stop_timeout"):
            cfg.stop_timeout = _float("daemon", "stop_timeout", g("daemon", "stop_timeout"), 0.5)
        for key, minimum in (("connect_timeout", 0.1), ("stall_timeout", 0.1),
                             ("request_timeout", 0.1), ("rate_window", 0.5)):
            if parser.has_option("registries", key):
                setattr(cfg, key, _float("registries", key, g("registries", key), minimum))
        if parser.has_option("registries", "min_rate"):
            v = g("registries", "min_rate").strip()
            cfg.min_rate = 0 if v in ("0", "off", "none") else \
                parse_size(v, "[registries] min_rate (bytes per second)")
        if parser.has_option("slurm", "jobs"):
            cfg.slurm_jobs = g("slurm", "jobs").strip().lower()
        if parser.has_option("slurm", "conf"):
            cfg.slurm_conf = g("slurm", "conf").strip() or None
        if parser.has_option("slurm", "refresh"):
            cfg.slurm_refresh = _float("slurm", "refresh", g("slurm", "refresh"), 0)
        if parser.has_option("registries", "insecure"):
            cfg.insecure_registries = _split_list(g("registries", "insecure"))
        if parser.has_option("registries", "trusted_squashfs"):
            cfg.trusted_squashfs = _split_list(g("registries", "trusted_squashfs"))
        if parser.has_option("registries", "publish_to"):
            cfg.publish_to = g("registries", "publish_to").strip() or None
        if parser.has_option("squash", "compression"):
            cfg.compression = g("squash", "compression").strip()
        if parser.has_option("squash", "level"):
            cfg.level = int(_float("squash", "level", g("squash", "level"), 1))
        if parser.has_option("squash", "jobs"):
            cfg.jobs = int(_float("squash", "jobs", g("squash", "jobs"), 0))
    except ConfigError as e:
        raise ConfigError(f"{p}: {e.message}") from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    if cfg.compression not in COMPRESSORS:
        raise ConfigError(f"[squash] compression: {cfg.compression!r} is not one of {', '.join(COMPRESSORS)}")
    if cfg.compression == "zstd" and not 1 <= cfg.level <= 22:
        raise ConfigError(f"[squash] level: zstd levels are 1 to 22, not {cfg.level}")
    if not cfg.cache_dir.is_absolute():
        raise ConfigError(f"[cache] dir: {cfg.cache_dir} must be an absolute path")
    if cfg.locking not in LOCKING_MODES:
        raise ConfigError(f"[cache] locking: {cfg.locking!r} is not one of {', '.join(LOCKING_MODES)}")
    if cfg.slurm_jobs not in SLURM_MODES:
        raise ConfigError(f"[slurm] jobs: {cfg.slurm_jobs!r} is not one of {', '.join(SLURM_MODES)}")
    if cfg.prefetch_socket is not None and not cfg.prefetch_socket.is_absolute():
        raise ConfigError(f"[daemon] prefetch_socket: {cfg.prefetch_socket} must be an absolute path")
    if cfg.prefetch_enabled and prefetch_path(cfg) == cfg.socket:
        raise ConfigError("[daemon] prefetch_socket must differ from [daemon] socket")
    if cfg.max_requests_per_uid < cfg.max_pulls_per_uid:
        raise ConfigError(f"[daemon] max_requests_per_uid ({cfg.max_requests_per_uid}) must be at "
                          f"least max_pulls_per_uid ({cfg.max_pulls_per_uid})")
    if not cfg.node or "/" in cfg.node:
        raise ConfigError(f"[daemon] node: {cfg.node!r} is not a usable node name")


def containers_path(cfg: Config) -> Path:
    """Where named containers live: [daemon] containers_dir, default in runtime_dir."""
    return cfg.containers_dir or cfg.runtime_dir / "containers"


def prefetch_path(cfg: Config) -> Optional[Path]:
    """The prefetch socket: [daemon] prefetch_socket, default next to the main socket; None: off."""
    if not cfg.prefetch_enabled:
        return None
    return cfg.prefetch_socket or cfg.socket.parent / "oci-imaged-prefetch.sock"


def parse_listen(text: str) -> Optional[Tuple[str, int]]:
    text = text.strip()
    if text in ("", "off", "no", "none"):
        return None
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not 0 < p < 65536:
        raise ConfigError(f"[daemon] metrics: {text!r} is not HOST:PORT")
    return (host.strip("[]") or "127.0.0.1", p)
