"""The registry client's network policy and deadlines, against the real registry.

A RegistryProxy in front of the real docker-registry redirects blobs, names a
token realm, or trickles blob bodies (a tarpit). Host names other than
loopback ones are resolved by a resolver given to the client, always to
127.0.0.1, so every connection in these tests stays on loopback. As a second
guard, a test that expects a refusal before any connection runs with socket
connects to anything but loopback made to fail loudly, so a broken policy
shows up as a wrong error here rather than as traffic off the machine.
"""

from __future__ import annotations

import ipaddress
import random
import socket
import time

import pytest

from ocibuild import Entry, Pusher
from registry_proxy import RegistryProxy

from ociimage.errors import NetworkPolicyError, RegistryUnavailable
from ociimage.reference import parse_reference
from ociimage.registry.client import RegistryClient
from ociimage.registry.transport import NetLimits

LOOPBACK = "127.0.0.1"


def loopback_resolver(names):
    """getaddrinfo for `names` (name -> address); anything else is not resolvable here."""
    def resolve(host, port, family=0, type=0, proto=0, flags=0):
        addr = names.get(host, host)
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is not resolvable in tests")
        fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        sockaddr = (addr, port, 0, 0) if ip.version == 6 else (addr, port)
        return [(fam, socket.SOCK_STREAM, 6, "", sockaddr)]
    return resolve


@pytest.fixture
def no_offhost_connects(monkeypatch):
    """Record (and refuse) any connect() to a non-loopback address made meanwhile."""
    attempts = []
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None:
            ip = ipaddress.ip_address(host.split("%")[0])
            if not ip.is_loopback:
                attempts.append(host)
                raise OSError(f"test guard: connect to {host} refused")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.fixture(scope="module")
def image(registry):
    rnd = random.Random(13)  # incompressible: the gzip layers stay over the tarpit threshold
    return Pusher(registry.url).image("net/policy", "v1",
                                      [[Entry("f", data=rnd.randbytes(20000))],
                                       [Entry("g", data=rnd.randbytes(30000))]])


def client(**kw):
    kw.setdefault("backoff", 0.01)
    kw.setdefault("retries", 1)
    return RegistryClient(**kw)


def read_layer(c, proxy_host, image):
    ref = parse_reference(f"{proxy_host}/net/policy:v1")
    resolved = c.resolve(ref)
    with c.open_blob(resolved.reference, resolved.layers[-1]) as f:
        return f.read(1 << 20) + f.read()


# ---- redirects ----------------------------------------------------------------------------

def test_redirect_to_plain_http_on_an_unlisted_host_is_refused(registry, image,
                                                               no_offhost_connects):
    with RegistryProxy(registry.url) as storage, RegistryProxy(registry.url) as proxy:
        port = storage.host.rsplit(":", 1)[1]
        proxy.redirect_blobs = f"http://blobs.example.test:{port}"
        c = client(resolver=loopback_resolver({"blobs.example.test": LOOPBACK}))
        with pytest.raises(NetworkPolicyError) as e:
            c.resolve(parse_reference(f"{proxy.host}/net/policy:v1"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "redirect" in msg and "blobs.example.test" in msg and "plain http" in msg
    assert "[registries] insecure" in msg
    assert storage.log == []  # refused before connecting
    assert no_offhost_connects == []


def test_redirect_to_plain_http_on_a_listed_insecure_host_is_followed(registry, image):
    with RegistryProxy(registry.url) as storage, RegistryProxy(registry.url) as proxy:
        port = storage.host.rsplit(":", 1)[1]
        proxy.redirect_blobs = f"http://blobs.example.test:{port}"
        c = client(resolver=loopback_resolver({"blobs.example.test": LOOPBACK}),
                   insecure_registries=[f"blobs.example.test:{port}"])
        data = read_layer(c, proxy.host, image)
    assert len(data) == next(l["size"] for l in image.manifest["layers"][-1:])
    assert any(p.startswith("/_storage/") for _, p, _ in storage.log)


@pytest.mark.parametrize("target", ["http://169.254.169.254", "https://169.254.169.254",
                                    "http://[fe80::1]", "http://0.0.0.0", "http://224.0.0.1"])
def test_redirect_to_link_local_or_metadata_address_is_refused(registry, image, target,
                                                               no_offhost_connects):
    with RegistryProxy(registry.url, redirect_blobs=target) as proxy:
        c = client(insecure_registries=[target.split("//", 1)[1], "0.0.0.0/0", "::/0"])
        with pytest.raises(NetworkPolicyError) as e:
            c.resolve(parse_reference(f"{proxy.host}/net/policy:v1"))
    msg = str(e.value)
    assert "\n" not in msg and "refusing" in msg and "redirect" in msg
    assert no_offhost_connects == []


def test_name_resolving_to_metadata_address_is_refused_at_connect(registry, image,
                                                                  no_offhost_connects):
    """DNS rebinding: the name passes the URL check; the address connected to does not."""
    with RegistryProxy(registry.url, redirect_blobs="http://rebind.example.test") as proxy:
        c = client(resolver=loopback_resolver({"rebind.example.test": "169.254.169.254"}),
                   insecure_registries=["rebind.example.test"])
        with pytest.raises(NetworkPolicyError) as e:
            c.resolve(parse_reference(f"{proxy.host}/net/policy:v1"))
    assert "169.254.169.254" in str(e.value) and "link-local" in str(e.value)
    assert no_offhost_connects == []


def test_plain_http_loopback_name_must_resolve_to_loopback(registry, image,
                                                           no_offhost_connects):
    with RegistryProxy(registry.url) as proxy:
        port = proxy.host.rsplit(":", 1)[1]
        c = client(resolver=loopback_resolver({"localhost": "192.0.2.7"}))
        with pytest.raises(NetworkPolicyError) as e:
            c.get_manifest(parse_reference(f"localhost:{port}/net/policy:v1"))
    assert "not a loopback address" in str(e.value)
    assert no_offhost_connects == []


# ---- token realms ------------------------------------------------------------------------

@pytest.mark.parametrize("realm,address", [
    ("http://169.254.169.254/latest/meta-data/token", "169.254.169.254"),
    ("https://169.254.169.254/token", "169.254.169.254"),
    ("http://[fe80::a9fe:a9fe]/t", "fe80::a9fe:a9fe"),
    ("http://metadata.example.test/token", "169.254.169.254")])   # the address it resolves to
def test_token_realm_at_metadata_address_is_refused_without_connecting(registry, image, realm,
                                                                       address,
                                                                       no_offhost_connects):
    with RegistryProxy(registry.url, bearer_realm=realm) as proxy:
        c = client(resolver=loopback_resolver({"metadata.example.test": "169.254.169.254"}),
                   insecure_registries=["metadata.example.test"])
        with pytest.raises(NetworkPolicyError) as e:
            c.get_manifest(parse_reference(f"{proxy.host}/net/policy:v1"))
    msg = str(e.value)
    assert "\n" not in msg and "refusing" in msg
    assert address in msg, msg
    assert c.auth.token_requests == 1  # it got as far as asking, and no further
    assert no_offhost_connects == []


def test_plain_http_token_realm_on_an_unlisted_host_is_refused(registry, image,
                                                               no_offhost_connects):
    with RegistryProxy(registry.url, bearer_realm="http://auth.example.test/token") as proxy:
        c = client(resolver=loopback_resolver({"auth.example.test": LOOPBACK}))
        with pytest.raises(NetworkPolicyError) as e:
            c.get_manifest(parse_reference(f"{proxy.host}/net/policy:v1"))
    assert "token realm" in str(e.value) and "plain http" in str(e.value)
    assert no_offhost_connects == []


# ---- deadlines and the minimum rate --------------------------------------------------------

def test_tarpit_blob_is_abandoned_under_the_minimum_rate(registry, image):
    limits = NetLimits(connect=2, stall=30, request=30, min_rate=4 << 10, rate_window=2)
    with RegistryProxy(registry.url, tarpit=True, tarpit_over=10000) as proxy:
        c = client(limits=limits)
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable) as e:
            read_layer(c, proxy.host, image)
        took = time.monotonic() - started
        time.sleep(1.5)
        trickled, ended = proxy.trickling, proxy.trickle_ended
    msg = str(e.value)
    assert "\n" not in msg
    assert "abandoned" in msg and "KiB/s" in msg and "[registries] min_rate" in msg
    # the socket read was stuck in one 64 KiB read: only the watchdog can end it this soon
    assert took < 6, took
    # one attempt, not retried, and the proxy saw the client hang up
    assert (trickled, ended) == (1, 1)


def test_trickled_small_request_hits_the_request_deadline(registry, image):
    """A manifest-sized body trickled: no stall (bytes keep coming), the deadline ends it."""
    limits = NetLimits(connect=2, stall=30, request=2, min_rate=0, rate_window=60)
    with RegistryProxy(registry.url, tarpit=True, tarpit_over=1000) as proxy:
        c = client(limits=limits)
        ref = parse_reference(f"{proxy.host}/net/policy:v1")
        resolved = c.resolve(ref)
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable) as e:
            with c.open_blob(resolved.reference, resolved.layers[0]) as f:
                f.read()
        took = time.monotonic() - started
    assert "took longer than 2s" in str(e.value), str(e.value)
    assert took < 5, took


def test_cancelled_token_ends_a_tarpit_read_at_once(registry, image):
    import threading

    from ociimage.cancel import CancelToken
    from ociimage.errors import Cancelled
    token = CancelToken()
    limits = NetLimits(connect=2, stall=60, request=600, min_rate=0)
    with RegistryProxy(registry.url, tarpit=True, tarpit_over=10000) as proxy:
        c = client(limits=limits, cancel=token)
        threading.Timer(1.0, token.cancel, args=("the client went away",)).start()
        started = time.monotonic()
        with pytest.raises(Cancelled) as e:
            read_layer(c, proxy.host, image)
        took = time.monotonic() - started
    assert str(e.value) == "the client went away"
    assert took < 3, took
