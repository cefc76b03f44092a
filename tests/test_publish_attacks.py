"""Attacks on `oci-image publish` through oci-imaged found by review: the site's own identity
never fetches for a user what they could not fetch themselves, and every registry request of
a publish (the access check too) ends with its deadline or its cancellation.

Same real parts as tests/test_publish_daemon.py (token registry with per-repository
grants, real oci-imaged, the installed CLI run by real non-root users).
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import requests

from daemon_proc import DaemonProcess
from images import IMAGE_CONFIG, busybox_layers
from install_fixture import installed  # noqa: F401 - a fixture
from localsite import unmount_under
from ocibuild import Pusher
from registry_proxy import RegistryProxy
from registry_server import RegistryServer
from test_publish_daemon import (GRANTS, PASSWORDS, Blackhole, Site, _errors, _one_error,
                                 _wait, login)
from test_security import OTHER_USER, PRIV_USER
from token_issuer import TokenIssuer

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (real users, a daemon)")


def _site(installed, conf_text):
    base = Path(tempfile.mkdtemp(prefix="oci-pubatk-", dir="/tmp"))
    os.chmod(base, 0o755)
    issuer = TokenIssuer(base / "issuer", dict(PASSWORDS), GRANTS)
    issuer.__enter__()
    reg = RegistryServer(base / "reg", auth=issuer.registry_auth()).__enter__()
    site_auth = base / "site-auth.json"
    auth = base64.b64encode(f"site:{PASSWORDS['site']}".encode()).decode()
    site_auth.write_text(json.dumps({"auths": {reg.host: {"auth": auth}}}))
    os.chmod(site_auth, 0o600)
    conf = base / "oci-image.conf"
    conf.write_text(conf_text.format(reg=reg.host))
    os.chmod(conf, 0o644)
    old = os.environ.get("REGISTRY_AUTH_FILE")
    os.environ["REGISTRY_AUTH_FILE"] = str(site_auth)
    try:
        d = DaemonProcess(base, base / "cache", metrics=False,
                          extra=["--config", str(conf)]).start()
    finally:
        if old is None:
            os.environ.pop("REGISTRY_AUTH_FILE")
        else:
            os.environ["REGISTRY_AUTH_FILE"] = old
    s = Site(base, issuer, reg, d, conf, installed)

    def close():
        d.stop()
        unmount_under(base)
        reg.__exit__(None, None, None)
        issuer.__exit__(None, None, None)
        shutil.rmtree(base, ignore_errors=True)
    return s, close


PUBLISH_TO_CONF = ("[daemon]\nmount_idle = 1\npublish_running = 2\npublish_running_per_user = 1\n"
                   "publish_timeout = 60\n[registries]\npublish_to = {reg}/site/converted\n")


def _site_fixture(conf_text):
    @pytest.fixture(scope="module")
    def fixture(installed):
        if os.geteuid() != 0:
            pytest.skip("needs root")
        s, close = _site(installed, conf_text)
        try:
            yield s
        finally:
            close()
    return fixture


pubsite = _site_fixture(PUBLISH_TO_CONF)

TIMEOUT_CONF = ("[daemon]\nmount_idle = 1\npublish_running = 2\npublish_running_per_user = 1\n"
                "publish_timeout = 8\n[registries]\nrequest_timeout = 120\nstall_timeout = 120\n"
                "min_rate = 0\n")
slowsite = _site_fixture(TIMEOUT_CONF)


def _drop_blobs(reg: RegistryServer, digests):
    """Take layer contents out of a registry's storage: it keeps manifest and config only."""
    for d in digests:
        hexpart = d.split(":", 1)[1]
        p = reg.workdir / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256" / \
            hexpart[:2] / hexpart / "data"
        assert p.exists(), p
        p.unlink()


@needs_root
def test_manifest_bytes_alone_do_not_get_another_users_private_image_through_publish_to(pubsite):
    """alice's private priv/secret was converted by the daemon and (publish_to) published to
    site/converted with the daemon's own identity, then evicted from the cache. bob holds only
    its manifest and config (no layer): his registry serves them. The daemon may find the
    SquashFS in site/converted (looking with its own identity), but uses it only for the
    repository bob resolved himself: it was made from alice's, so bob gets nothing."""
    site = pubsite
    login(PRIV_USER, site.reg.host, "alice")
    login(OTHER_USER, site.reg.host, "bob")
    src, ref = site.push("priv/secret", "topsecret")
    r = site.publish(PRIV_USER, ref, f"{site.reg.host}/alice/secret:sqfs")
    assert r.returncode == 0, r.stderr
    fallback = "sha256-" + src.manifest_digest.split(":", 1)[1]
    assert _wait(lambda: site.manifest("site/converted", fallback) is not None
                 or site.admin("site/converted").get(
                     f"{site.reg.url}/v2/site/converted/manifests/{fallback}",
                     headers={"Accept": "application/vnd.oci.image.index.v1+json"}
                 ).status_code == 200, 30), site.daemon.log()[-3000:]
    # the private image leaves the cache (eviction, quota, rm: any of them)
    rm = site.daemon.cli("rm", src.manifest_digest)
    assert rm.returncode == 0, rm.stderr
    # bob: a registry of his own holding the manifest and config, none of the layers
    with RegistryServer(site.base / "bobreg") as bobreg:
        copy = Pusher(bobreg.url).image("bob/copy", "v1", busybox_layers(os_id="topsecret"),
                                        config=IMAGE_CONFIG)
        assert copy.manifest_digest == src.manifest_digest
        _drop_blobs(bobreg, copy.layer_digests)
        assert requests.get(f"{bobreg.url}/v2/bob/copy/blobs/{copy.layer_digests[-1]}"
                            ).status_code != 200   # bob cannot read the layers anywhere
        r = site.publish(OTHER_USER, f"{bobreg.host}/bob/copy:v1", f"{bobreg.host}/bob/stolen:v1")
        stolen = requests.get(f"{bobreg.url}/v2/bob/stolen/manifests/v1", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"})
        theirs = site.manifest("alice/secret", "sqfs")["layers"][0]["digest"]
        got = stolen.json()["layers"][0]["digest"] if stolen.status_code == 200 else None
        # bob gets nothing: the site's copy was not taken, and his own registry has no layer
        assert r.returncode != 0 and stolen.status_code == 404 and got is None, r.stderr
        assert f"not found in {bobreg.host}/bob/copy" in _one_error(r)
        assert "made from another repository than the one asked for" in site.daemon.log()
        assert theirs is not None

@needs_root
def test_publish_timeout_also_ends_a_conversion(slowsite):
    """A source registry (the user's choice) that trickles its layers: the publish ends at
    publish_timeout (8 s) in one line, not when the registry deadlines (120 s) would."""
    site = slowsite
    login(OTHER_USER, site.reg.host, "bob")
    with RegistryServer(site.base / "slowreg") as slowreg:
        Pusher(slowreg.url).image("bob/slow", "v1", busybox_layers(os_id="slow"),
                                  config=IMAGE_CONFIG)
        with RegistryProxy(slowreg.url, tarpit=True, tarpit_bytes=512,
                           tarpit_interval=0.2) as proxy:
            t0 = time.monotonic()
            r = site.publish(OTHER_USER, f"{proxy.host}/bob/slow:v1",
                             f"{site.reg.host}/bob/slow:sqfs", timeout=200)
            elapsed = time.monotonic() - t0
            err = _one_error(r)
            assert "publish_timeout = 8 s" in err, (elapsed, r.stderr[-1500:])
            assert proxy.trickling > 0, proxy.log    # it was converting, in the tarpit
            assert elapsed < 45, (elapsed, r.stderr[-1500:])
            # the conversion was abandoned (its transfer cut) and the slot given back
            assert _wait(lambda: proxy.trickle_ended >= proxy.trickling, 40), \
                (proxy.trickling, proxy.trickle_ended)


@needs_root
def test_publish_timeout_also_ends_an_access_check_on_a_hanging_registry(slowsite):
    """The cached entry's source registry hangs when bob's publish asks it whether he may
    use the entry: the publish still ends at publish_timeout."""
    site = slowsite
    login(OTHER_USER, site.reg.host, "bob")
    with RegistryServer(site.base / "srcreg") as srcreg:
        Pusher(srcreg.url).image("x/src", "v1", busybox_layers(os_id="hangcheck"),
                                 config=IMAGE_CONFIG)
        proxy = RegistryProxy(srcreg.url).__enter__()
        port = int(proxy.host.rsplit(":", 1)[1])
        r = site.daemon.cli("pull", f"{proxy.host}/x/src:v1")     # root: entry's source = proxy
        assert r.returncode == 0, r.stderr
        proxy.__exit__(None, None, None)
        hole = Blackhole(port)
        try:
            with RegistryServer(site.base / "bobreg3") as bobreg:
                Pusher(bobreg.url).image("bob/copy", "v1", busybox_layers(os_id="hangcheck"),
                                         config=IMAGE_CONFIG)
                t0 = time.monotonic()
                r = site.publish(OTHER_USER, f"{bobreg.host}/bob/copy:v1",
                                 f"{bobreg.host}/bob/out:v1", timeout=200)
                elapsed = time.monotonic() - t0
                assert hole.accepted > 0, r.stderr
                err = _one_error(r)
                # and the slot is given back with the answer: the work ended with it
                again = site.publish(OTHER_USER, f"{bobreg.host}/bob/copy:v1",
                                     f"{bobreg.host}/bob/out2:v1", timeout=200)
                assert "already have 1 publish" not in again.stderr, again.stderr
                assert elapsed < 20, (elapsed, err)   # publish_timeout = 8 s
        finally:
            hole.close()


# ---- pure (no root): the access check's registry request, and an evicted entry ---------------

def _check_against_a_hanging_registry(request_timeout: float, token=None,
                                       raises=None) -> float:
    """Seconds AccessChecker.check takes to fail on a registry that accepts and never
    answers (stall timeout 20 s), under the given request_timeout and cancel token."""
    from ociimage import cancel
    from ociimage.access import AccessChecker
    from ociimage.cache import CacheEntry
    from ociimage.errors import OciImageError
    from ociimage.registry.client import RegistryClient
    from ociimage.registry.transport import NetLimits
    hole = Blackhole()
    try:
        client = RegistryClient(credentials=None, retries=0,
                                limits=NetLimits(connect=2, stall=20, request=request_timeout))
        checker = AccessChecker(lambda uid: client, anonymous_client=client)
        d = "sha256:" + "ab" * 32
        entry = CacheEntry(d, Path("/nonexistent"), {"reference": f"{hole.host}/x/y@{d}"},
                           1, 0.0)
        t0 = time.monotonic()
        with cancel.scope(token or cancel.CancelToken()):
            with pytest.raises(raises or OciImageError):
                checker.check(entry, 4242)
        assert hole.accepted > 0
        return time.monotonic() - t0
    finally:
        hole.close()


def test_the_access_checks_registry_request_is_bounded_by_request_timeout():
    """The access check's HEAD is one registry operation: request_timeout (2 s) ends it,
    not the stall timeout (20 s) of each attempt."""
    from ociimage.errors import AccessDenied  # fails closed
    took = _check_against_a_hanging_registry(2, raises=AccessDenied)
    assert took < 8, took


def test_the_access_checks_registry_request_is_cancellable():
    import threading
    from ociimage import cancel
    token = cancel.CancelToken()
    threading.Timer(1.0, token.cancel, args=("publish_timeout",)).start()
    took = _check_against_a_hanging_registry(60, token)
    assert took < 5, took


def test_an_entry_evicted_before_the_push_fails_in_one_typed_line(monkeypatch, tmp_path):
    """store.pull returned the entry; an eviction (quota, prune, rm) removes it before the
    publisher opens it: FileNotFoundError escapes as 'internal error in oci-imaged'."""
    import types
    from ociimage import publisher as P
    from ociimage.cache import CacheEntry
    from ociimage.errors import OciImageError
    d = "sha256:" + "ef" * 32
    resolved = types.SimpleNamespace(
        manifest=types.SimpleNamespace(digest=d, is_index=False, data={"layers": []}),
        reference=f"r:5000/a/b@{d}")
    monkeypatch.setattr(P, "resolve", lambda *a, **k: resolved)

    class Store:
        def client(self, uid):
            return types.SimpleNamespace(pusher=types.SimpleNamespace(max_chunk_size=None))

        def options(self, platform):
            return None

        def pull(self, ref, platform, uid, report):
            return CacheEntry(d, tmp_path / "evicted.sqfs", {}, 10, 0.0)

    with pytest.raises(OciImageError):
        P.Publisher(Store()).publish(1000, {"op": "publish", "image": "r:5000/a/b:v1",
                                            "target": "r:5000/c/d:v1"}, lambda ev: None)
