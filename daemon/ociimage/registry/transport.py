"""The registry client's HTTP transport: where it may connect, and for how long.

The daemon runs as root and fetches whatever a user names, so every user is
a potential attacker steering it. Two things requests cannot do alone:

* **Network policy, on the address actually used.** Plain http only to
  loopback and to the [registries] insecure list; never to link-local
  (169.254.0.0/16, fe80::/10: cloud metadata services), unspecified
  (0.0.0.0, ::), multicast or broadcast addresses, nor to the well-known
  metadata addresses outside those ranges. URLs are checked before each
  request (registry, redirect target, token realm), and the connection
  itself resolves the name once and connects to the address it checked, so
  a name that resolves differently the second time (DNS rebinding) gets
  nowhere.
* **Deadlines and a minimum throughput.** A socket timeout only bounds the
  wait for the *next* byte; a server trickling one byte a second keeps a
  read going forever. A Transfer is one operation's budget (overall
  deadline, minimum rate over a window, the work's cancellation token); a
  watchdog thread checks them and shuts down the sockets of a transfer that
  ran out, which ends a blocked read at once. The reader then finds
  `transfer.reason` and raises a typed error.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Deque, Iterable, Iterator, List, Optional, Set, Tuple
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError

from ..cancel import NEVER, CancelToken
from ..errors import NetworkPolicyError

log = logging.getLogger("ociimage.registry")


@dataclass(frozen=True)
class NetLimits:
    """[registries] connect_timeout, stall_timeout, request_timeout, min_rate, rate_window."""

    #: seconds to open a TCP connection (and finish the TLS handshake)
    connect: float = 10.0
    #: seconds without a single byte before one attempt of a request fails (and is retried)
    stall: float = 30.0
    #: overall seconds for one small operation (manifest, token, ping, HEAD, upload step),
    #: retries included; a blob gets this plus its size at min_rate
    request: float = 60.0
    #: bytes per second a blob transfer must average over rate_window; 0: no minimum
    min_rate: int = 16 << 10
    #: seconds over which min_rate is measured
    rate_window: float = 60.0

    def blob_deadline(self, size: int) -> float:
        """Seconds a transfer of size bytes may take: request_timeout plus size at min_rate."""
        return self.request + (size / self.min_rate if self.min_rate else 0.0)


# ---- addresses ----------------------------------------------------------------------------

# Metadata services on ordinary-looking addresses (Alibaba Cloud, AWS over IPv6).
_METADATA = (ipaddress.ip_network("100.100.100.200/32"),
             ipaddress.ip_network("fd00:ec2::254/128"))
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_BROADCAST = ipaddress.ip_address("255.255.255.255")


def forbidden_reason(ip) -> Optional[str]:
    """Why the daemon must never connect to ip, or None."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or (ip.version == 4 and ip in _THIS_NETWORK):
        return "an unspecified address"
    if ip.is_link_local:
        return "a link-local address (where cloud metadata services answer)"
    if ip.is_multicast or ip == _BROADCAST:
        return "a multicast or broadcast address"
    if any(ip in net for net in _METADATA):
        return "a cloud metadata service address"
    return None


def _ip(host: str):
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


Resolver = Callable[..., list]


class NetPolicy:
    """Which URLs and addresses the daemon may reach; see the module docstring."""

    def __init__(self, insecure_registries: Iterable[str] = (),
                 resolver: Optional[Resolver] = None):
        self.resolver: Resolver = resolver or socket.getaddrinfo
        self._insecure_names: Set[str] = set()
        self._insecure_nets: List = []
        for entry in insecure_registries:
            entry = entry.strip().lower()
            for scheme in ("http://", "https://"):
                if entry.startswith(scheme):
                    entry = entry[len(scheme):]
            entry = entry.rstrip("/")
            try:
                if "/" in entry:
                    self._insecure_nets.append(ipaddress.ip_network(entry, strict=False))
                    continue
            except ValueError:
                pass
            self._insecure_names.add(entry)

    @staticmethod
    def _split(netloc: str) -> Tuple[str, Optional[int]]:
        p = urlsplit("//" + netloc)
        try:
            port = p.port
        except ValueError:
            port = None
        return (p.hostname or "").lower(), port

    def listed_insecure(self, netloc: str) -> bool:
        """In [registries] insecure: by host:port, by host, or by network (for IP literals)."""
        netloc = netloc.lower()
        host, _ = self._split(netloc)
        if netloc in self._insecure_names or host in self._insecure_names:
            return True
        ip = _ip(host)
        return ip is not None and any(ip in net for net in self._insecure_nets)

    @staticmethod
    def loopback_name(host: str) -> bool:
        host = host.lower().strip("[]")
        if host == "localhost" or host.endswith(".localhost"):
            return True
        ip = _ip(host)
        return ip is not None and ip.is_loopback

    def plain_http_allowed(self, netloc: str) -> bool:
        host, _ = self._split(netloc)
        return self.loopback_name(host) or self.listed_insecure(netloc)

    def check_url(self, url: str, what: str) -> None:
        """Refuse, before any connection, a URL the daemon must not use for `what`."""
        p = urlsplit(url)
        scheme = p.scheme.lower()
        host = (p.hostname or "").lower()
        if scheme not in ("http", "https") or not host:
            raise NetworkPolicyError(f"refusing {what}: {scheme or 'relative'}:// URLs are not "
                                     f"allowed, only http(s) with a host")
        ip = _ip(host)
        if ip is not None:
            reason = forbidden_reason(ip)
            if reason:
                raise NetworkPolicyError(f"refusing {what} at {host}: it is {reason}")
        if scheme == "http" and not self.plain_http_allowed(p.netloc):
            raise NetworkPolicyError(
                f"refusing {what} over plain http to {p.netloc}: only loopback and registries "
                f"listed in [registries] insecure may be reached without TLS")

    def addresses(self, scheme: str, host: str, port: int) -> list:
        """getaddrinfo results the connection may use for host, checked; raises if none."""
        try:
            infos = self.resolver(host, port, 0, socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise NewConnectionError(None, f"Failed to resolve {host}: {e}") from None
        if not infos:
            raise NewConnectionError(None, f"Failed to resolve {host}")
        netloc = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        loopback_only = scheme == "http" and not self.listed_insecure(netloc) \
            and not self.listed_insecure(host)
        for info in infos:
            addr = info[4][0]
            ip = _ip(addr)
            if ip is None:
                raise NetworkPolicyError(f"refusing to connect to {host}: it resolved to "
                                         f"{addr!r}, which is not an IP address")
            reason = forbidden_reason(ip)
            if reason:
                raise NetworkPolicyError(f"refusing to connect to {host}: it resolves to "
                                         f"{addr}, {reason}")
            if loopback_only and not ip.is_loopback:
                raise NetworkPolicyError(
                    f"refusing plain http to {host}: it resolves to {addr}, not a loopback "
                    f"address; list it in [registries] insecure if that is intended")
        return infos


# ---- transfers and their watchdog ---------------------------------------------------------

class Transfer:
    """One operation's budget: a deadline, a minimum rate, a cancellation token."""

    def __init__(self, what: str, deadline: Optional[float], *, min_rate: int = 0,
                 window: float = 0.0, cancel: CancelToken = NEVER, limit_name: str = ""):
        self.what = what
        self.started = time.monotonic()
        self.seconds = deadline
        self.deadline = self.started + deadline if deadline else None
        self.limit_name = limit_name
        self.min_rate = min_rate if window > 0 else 0
        self.window = window
        self.cancel = cancel
        self.total = 0
        self.reason: Optional[str] = None
        self.cancelled = False
        self._samples: Deque[Tuple[float, int]] = collections.deque([(self.started, 0)])
        self._conns: "List[HTTPConnection]" = []
        self._lock = threading.Lock()

    def progress(self, n: int) -> None:
        self.total += n

    def remaining(self) -> Optional[float]:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def attach(self, conn) -> None:
        with self._lock:
            if conn not in self._conns:
                self._conns.append(conn)
            aborted = self.reason is not None
        if aborted:
            _shutdown(conn)

    def _hard_reason(self, now: float) -> Optional[str]:
        if self.cancel.cancelled:
            self.cancelled = True
            return self.cancel.reason
        if self.deadline is not None and now > self.deadline:
            return f"it took longer than {self.seconds:.0f}s ({self.limit_name})"
        return None

    def detach(self) -> None:
        """Forget the connections used so far: once their response is closed they go back
        to the pool, and an abort later must not cut a request that reuses one."""
        with self._lock:
            self._conns.clear()

    def check(self, now: float) -> Optional[str]:
        """Called by the watchdog only (it keeps the rate samples)."""
        hard = self._hard_reason(now)
        if hard:
            return hard
        if self.min_rate:
            self._samples.append((now, self.total))
            while len(self._samples) > 1 and now - self._samples[1][0] >= self.window:
                self._samples.popleft()
            t0, b0 = self._samples[0]
            if now - t0 >= self.window:
                rate = (self.total - b0) / (now - t0)
                if rate < self.min_rate:
                    return (f"it ran at {rate / 1024:.1f} KiB/s for {now - t0:.0f}s, under the "
                            f"{self.min_rate / 1024:.0f} KiB/s minimum ([registries] min_rate)")
        return None

    def abort(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            conns = list(self._conns)
        log.debug("abandoning %s: %s", self.what, reason)
        for conn in conns:
            _shutdown(conn)

    def expired(self) -> Optional[str]:
        """The reason this transfer is over, checked now (not only at the watchdog's tick)."""
        if self.reason is None:
            reason = self._hard_reason(time.monotonic())
            if reason:
                self.abort(reason)
        return self.reason


def _shutdown(conn) -> None:
    # The raw TCP socket, also under TLS: shutting it down wakes a blocked recv
    # in another thread; closing is left to urllib3, which owns the connection.
    sock = getattr(conn, "_oci_sock", None)
    if sock is None:
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Watchdog:
    TICK = 0.25

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: Set[Transfer] = set()
        self._thread: Optional[threading.Thread] = None

    def add(self, t: Transfer) -> None:
        with self._lock:
            self._active.add(t)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="registry-watchdog")
                self._thread.start()

    def discard(self, t: Transfer) -> None:
        with self._lock:
            self._active.discard(t)

    def _run(self) -> None:
        while True:
            time.sleep(self.TICK)
            with self._lock:
                active = list(self._active)
            now = time.monotonic()
            for t in active:
                if t.reason is None:
                    reason = t.check(now)
                    if reason:
                        t.abort(reason)


WATCHDOG = _Watchdog()
_local = threading.local()


def _stack() -> List[Transfer]:
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    return s


@contextmanager
def watching(t: Transfer, *, register: bool = True) -> Iterator[Transfer]:
    """Connections used on this thread meanwhile belong to t (and to the transfers around it)."""
    stack = _stack()
    stack.append(t)
    if register:
        WATCHDOG.add(t)
    try:
        yield t
    finally:
        stack.remove(t)
        if register:
            WATCHDOG.discard(t)


def active_transfers() -> List[Transfer]:
    return list(_stack())


# ---- the adapter ----------------------------------------------------------------------------

class _Guarded:
    _oci_policy: NetPolicy
    _oci_scheme = "http"

    def _new_conn(self):
        infos = self._oci_policy.addresses(self._oci_scheme, self._dns_host, self.port)
        last: Optional[OSError] = None
        for family, socktype, proto, _canon, sockaddr in infos:
            sock = socket.socket(family, socktype, proto)
            try:
                for opt in self.socket_options or ():
                    sock.setsockopt(*opt)
                if isinstance(self.timeout, (int, float)):  # else urllib3's "default" sentinel
                    sock.settimeout(self.timeout)
                if self.source_address:
                    sock.bind(self.source_address)
                # The address checked above, not a second lookup of the name.
                sock.connect(sockaddr)
            except OSError as e:
                sock.close()
                last = e
                continue
            self._oci_sock = sock
            return sock
        if isinstance(last, socket.timeout):
            from urllib3.exceptions import ConnectTimeoutError
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. "
                                            f"(connect timeout={self.timeout})")
        raise NewConnectionError(self, f"Failed to establish a new connection: {last}")

    def request(self, *args, **kwargs):
        for t in _stack():
            t.attach(self)
        return super().request(*args, **kwargs)  # type: ignore[misc]

    def request_chunked(self, *args, **kwargs):  # urllib3 1.26 only
        for t in _stack():
            t.attach(self)
        return super().request_chunked(*args, **kwargs)  # type: ignore[misc]


class GuardedAdapter(HTTPAdapter):
    def __init__(self, policy: NetPolicy, **kw):
        self._policy = policy
        self._http_conn = type("GuardedHTTPConnection", (_Guarded, HTTPConnection),
                               {"_oci_policy": policy, "_oci_scheme": "http"})
        self._https_conn = type("GuardedHTTPSConnection", (_Guarded, HTTPSConnection),
                                {"_oci_policy": policy, "_oci_scheme": "https"})
        super().__init__(**kw)

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        http_pool = type("GuardedHTTPPool", (HTTPConnectionPool,),
                         {"ConnectionCls": self._http_conn})
        https_pool = type("GuardedHTTPSPool", (HTTPSConnectionPool,),
                          {"ConnectionCls": self._https_conn})
        self.poolmanager.pool_classes_by_scheme = {"http": http_pool, "https": https_pool}


def guarded_session(policy: NetPolicy, session: Optional[requests.Session] = None
                    ) -> requests.Session:
    s = session or requests.Session()
    adapter = GuardedAdapter(policy)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s
