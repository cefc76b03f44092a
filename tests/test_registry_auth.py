"""Basic (htpasswd) and Bearer (token server) auth against the real docker-registry."""

from __future__ import annotations

import logging

import bcrypt
import pytest

from ocibuild import Entry, Pusher, sha256
from registry_server import RegistryServer
from token_issuer import TokenIssuer

from ociimage.errors import AccessDenied, AuthenticationRequired, NotFound
from ociimage.reference import parse_reference
from ociimage.registry.auth import parse_www_authenticate
from ociimage.registry.client import RegistryClient
from ociimage.registry.credentials import Credentials, StaticCredentials
from ociimage.registry.platform import Platform

PASSWORD = "Tr0ub4dor&3-basic"
TOKEN_PASSWORD = "c0rrect-h0rse-bearer"
AMD64 = Platform("linux", "amd64")


def client(creds=None, **kw):
    kw.setdefault("backoff", 0.01)
    return RegistryClient(credentials=creds, **kw)


def test_parse_www_authenticate():
    [c] = parse_www_authenticate(
        'Bearer realm="https://auth.example/token",service="reg.example",'
        'scope="repository:a/b:pull,push repository:c:pull",error="insufficient_scope"')
    assert c.scheme == "bearer" and c.realm == "https://auth.example/token"
    assert c.service == "reg.example"
    assert c.scope == "repository:a/b:pull,push repository:c:pull"
    assert c.error == "insufficient_scope"
    [b] = parse_www_authenticate('Basic realm="Registry Realm"')
    assert b.scheme == "basic" and b.realm == "Registry Realm"
    cs = parse_www_authenticate('Basic realm="x, y", Bearer realm="https://a/t", service=s')
    assert [c.scheme for c in cs] == ["basic", "bearer"]
    assert cs[0].realm == "x, y" and cs[1].params == {"realm": "https://a/t", "service": "s"}
    [e] = parse_www_authenticate('bearer realm="a\\"b"')
    assert e.realm == 'a"b'
    assert parse_www_authenticate("") == []


# -- htpasswd / Basic --------------------------------------------------------

@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory):
    d = tmp_path_factory.mktemp("basic")
    htpasswd = d / "htpasswd"
    htpasswd.write_bytes(b"alice:" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4))
                         + b"\n")
    with RegistryServer(d / "reg", auth=("htpasswd", htpasswd)) as reg:
        img = Pusher(reg.url, auth=("alice", PASSWORD)).image(
            "priv/app", "v1", [[Entry("secret", data=b"classified")]])
        yield reg, img


def test_basic_right_credentials(basic_registry, caplog):
    reg, img = basic_registry
    c = client(StaticCredentials({reg.host: Credentials("alice", PASSWORD)}))
    with caplog.at_level(logging.DEBUG):
        r = c.resolve(parse_reference(f"{reg.host}/priv/app:v1"), AMD64)
        with c.open_blob(r.reference, r.layers[0]) as f:
            assert sha256(f.read()) == img.layer_digests[0]
        assert c.resolve_digest(parse_reference(f"{reg.host}/priv/app:v1")) == img.manifest_digest
    assert PASSWORD not in caplog.text
    # the challenge is remembered: only the first request took a 401
    statuses = [s for m, p, s in reg.access_log() if "/priv/app/" in p and m != "PUT"]
    assert statuses.count(401) >= 1
    with pytest.raises(NotFound):
        c.get_manifest(parse_reference(f"{reg.host}/priv/app:nope"))


def test_basic_wrong_and_missing_credentials(basic_registry, caplog):
    reg, _ = basic_registry
    r0 = parse_reference(f"{reg.host}/priv/app:v1")
    wrong = "wrong-" + PASSWORD
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(AuthenticationRequired) as ei:
            client(StaticCredentials({reg.host: Credentials("alice", wrong)})).get_manifest(r0)
        msg = str(ei.value)
        assert "rejected" in msg and reg.host in msg
        assert wrong not in msg and PASSWORD not in msg
        with pytest.raises(AuthenticationRequired) as ei:
            client().get_manifest(r0)
        assert str(ei.value) == (
            f"authentication required for {reg.host}/priv/app: log in with "
            f"`docker login {reg.host}` or provide credentials in ~/.docker/config.json")
    assert wrong not in caplog.text and PASSWORD not in caplog.text


# -- token server / Bearer ---------------------------------------------------

@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    d = tmp_path_factory.mktemp("token")
    issuer = TokenIssuer(d / "issuer", {"alice": TOKEN_PASSWORD, "eve": "eve-pw"},
                         {"alice": {"team/*": ["pull", "push"]}, "eve": {"other/*": ["pull"]},
                          "": {"public/*": ["pull"]}},
                         refresh_tokens={"refresh-XYZ-secret": "alice"})
    with issuer:
        with RegistryServer(d / "reg", auth=issuer.registry_auth()) as reg:
            p = Pusher(reg.url)
            p.s.headers["Authorization"] = "Bearer " + issuer.make_token("admin", [
                {"type": "repository", "name": n, "actions": ["pull", "push"]}
                for n in ("team/app", "public/base")])
            imgs = {
                "team": p.image("team/app", "v1", [[Entry("a", data=b"A")], [Entry("b", data=b"B")],
                                                   [Entry("c", data=b"C")]]),
                "public": p.image("public/base", "v1", [[Entry("p", data=b"P")]]),
            }
            yield issuer, reg, imgs


def _pull_all(c, reference):
    r = c.resolve(reference, AMD64)
    for layer in r.layers:
        with c.open_blob(r.reference, layer) as f:
            assert sha256(f.read()) == layer.digest
    return r


def test_bearer_credentials_accepted_and_token_reused(token_registry, caplog):
    issuer, reg, imgs = token_registry
    before = issuer.token_requests()
    c = client(StaticCredentials({reg.host: Credentials("alice", TOKEN_PASSWORD)}))
    with caplog.at_level(logging.DEBUG):
        r = _pull_all(c, parse_reference(f"{reg.host}/team/app:v1"))
        assert r.digest == imgs["team"].manifest_digest
        c.resolve_digest(parse_reference(f"{reg.host}/team/app:v1"))
    # manifest + config + 3 layers + HEAD: one token for them all
    assert issuer.token_requests() - before == 1
    assert c.auth.token_requests == 1
    last = issuer.requests[-1]
    assert last["user"] == "alice" and last["scopes"] == ["repository:team/app:pull"]
    assert TOKEN_PASSWORD not in caplog.text


def test_bearer_token_expiry(token_registry):
    issuer, reg, imgs = token_registry
    now = [1000.0]
    c = client(StaticCredentials({reg.host: Credentials("alice", TOKEN_PASSWORD)}))
    c.auth.clock = lambda: now[0]
    r0 = parse_reference(f"{reg.host}/team/app:v1")
    c.get_manifest(r0)
    c.get_manifest(r0)
    assert c.auth.token_requests == 1
    now[0] += issuer.expires_in + 1  # past the token's announced lifetime
    c.get_manifest(r0)
    assert c.auth.token_requests == 2


def test_bearer_anonymous(token_registry):
    issuer, reg, imgs = token_registry
    c = client()
    # anonymous pull works where the token server grants it
    assert _pull_all(c, parse_reference(f"{reg.host}/public/base:v1")).digest == \
        imgs["public"].manifest_digest
    # and is refused with a login hint where it does not
    with pytest.raises(AuthenticationRequired, match="docker login"):
        c.get_manifest(parse_reference(f"{reg.host}/team/app:v1"))


def test_bearer_wrong_password_and_no_grant(token_registry, caplog):
    issuer, reg, imgs = token_registry
    r0 = parse_reference(f"{reg.host}/team/app:v1")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(AuthenticationRequired) as ei:
            client(StaticCredentials({reg.host: Credentials("alice", "nope-pw-123")})).get_manifest(r0)
        assert "rejected" in str(ei.value) and "nope-pw-123" not in str(ei.value)
        # valid user without access to this repository
        with pytest.raises(AccessDenied) as ei:
            client(StaticCredentials({reg.host: Credentials("eve", "eve-pw")})).get_manifest(r0)
        assert "eve-pw" not in str(ei.value)
    assert "nope-pw-123" not in caplog.text and "eve-pw" not in caplog.text


def test_bearer_identity_token(token_registry, caplog):
    issuer, reg, imgs = token_registry
    c = client(StaticCredentials({reg.host: Credentials(identity_token="refresh-XYZ-secret")}))
    with caplog.at_level(logging.DEBUG):
        assert c.get_manifest(parse_reference(f"{reg.host}/team/app:v1")).digest == \
            imgs["team"].manifest_digest
    assert issuer.requests[-1]["grant"] == "refresh_token"
    assert "refresh-XYZ-secret" not in caplog.text
