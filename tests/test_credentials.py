"""CredentialStore: podman/docker files and credential helpers, used for real pulls."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat

import bcrypt
import pytest

from ocibuild import Entry, Pusher
from registry_server import RegistryServer

from ociimage.errors import AuthenticationRequired
from ociimage.reference import parse_reference
from ociimage.registry.client import RegistryClient
from ociimage.registry.credentials import Credentials, CredentialStore, normalize_registry

PASSWORD = "p@ss:w0rd-with-colon"


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def helper_script(bindir, name, table, log_file):
    """A real docker-credential-<name> executable answering from `table`."""
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / f"docker-credential-{name}"
    script.write_text(f"""#!/usr/bin/env python3
import json, sys
table = {json.dumps(table)!r}
table = json.loads(table)
server = sys.stdin.read().strip()
with open({str(log_file)!r}, "a") as f:
    f.write(sys.argv[1] + " " + server + "\\n")
if sys.argv[1] != "get" or server not in table:
    print("credentials not found in native keychain")
    sys.exit(1)
user, secret = table[server]
print(json.dumps({{"ServerURL": server, "Username": user, "Secret": secret}}))
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return home, {"HOME": str(home), "PATH": os.environ.get("PATH", "")}


def test_normalize_registry():
    assert normalize_registry("https://index.docker.io/v1/") == "docker.io"
    assert normalize_registry("index.docker.io") == "docker.io"
    assert normalize_registry("registry-1.docker.io") == "docker.io"
    assert normalize_registry("http://Reg.Example:5000/v2/") == "reg.example:5000"
    assert normalize_registry("quay.io/org/repo") == "quay.io"


def test_docker_config_auths(env):
    home, e = env
    write(home / ".docker/config.json", {"auths": {
        "https://index.docker.io/v1/": {"auth": b64("hubuser:" + PASSWORD)},
        "reg.example:5000": {"username": "u2", "password": "p2"},
        "tok.example": {"identitytoken": "idtok"},
        "empty.example": {},
        "bad.example": {"auth": "!!!notbase64"},
    }})
    s = CredentialStore(home=home, env=e)
    c = s.get("docker.io")
    assert (c.username, c.password) == ("hubuser", PASSWORD)  # split at the first ':'
    assert s.get("index.docker.io") == c
    assert s.get("reg.example:5000") == Credentials("u2", "p2")
    assert s.get("tok.example").identity_token == "idtok"
    assert s.get("empty.example") is None
    assert s.get("bad.example") is None
    assert s.get("reg.example") is None  # a port is part of the key
    assert PASSWORD not in repr(c)


def test_order_of_files(env, tmp_path):
    home, e = env
    write(home / ".docker/config.json", {"auths": {"r.io": {"auth": b64("docker:1")},
                                                   "only-docker.io": {"auth": b64("d:2")}}})
    write(home / ".config/containers/auth.json", {"auths": {"r.io": {"auth": b64("podman:1")}}})
    s = CredentialStore(home=home, env=e)
    assert s.get("r.io").username == "podman"
    assert s.get("only-docker.io").username == "d"
    xdg = tmp_path / "run"
    write(xdg / "containers/auth.json", {"auths": {"r.io": {"auth": b64("xdg:1")}}})
    e2 = dict(e, XDG_RUNTIME_DIR=str(xdg))
    assert CredentialStore(home=home, env=e2).get("r.io").username == "xdg"
    explicit = write(tmp_path / "explicit.json", {"auths": {"https://r.io/v2/": {"auth": b64("env:1")}}})
    e3 = dict(e2, REGISTRY_AUTH_FILE=str(explicit))
    assert CredentialStore(home=home, env=e3).get("r.io").username == "env"
    other = tmp_path / "dockercfg"
    write(other / "config.json", {"auths": {"only-docker.io": {"auth": b64("moved:2")}}})
    assert CredentialStore(home=home, env=dict(e, DOCKER_CONFIG=str(other))).get(
        "only-docker.io").username == "moved"
    (home / ".config/containers/auth.json").write_text("{not json")
    assert CredentialStore(home=home, env=e).get("r.io").username == "docker"


def test_cred_helpers_and_store(env, tmp_path, caplog):
    home, e = env
    bindir = tmp_path / "bin"
    calls = tmp_path / "calls.log"
    helper_script(bindir, "test", {"reg.example": ["helperuser", "helper-secret-1"],
                                   "https://index.docker.io/v1/": ["hub", "hub-secret-2"],
                                   "tok.example": ["<token>", "identity-secret-3"]}, calls)
    helper_script(bindir, "store", {"stored.example": ["st", "store-secret-4"]}, calls)
    e["PATH"] = f"{bindir}:{e['PATH']}"
    write(home / ".docker/config.json", {
        "credHelpers": {"reg.example": "test", "docker.io": "test", "tok.example": "test",
                        "missing.example": "not-installed", "fails.example": "test"},
        "credsStore": "store",
        "auths": {"fails.example": {"auth": b64("fallback:fb-secret")}},
    })
    s = CredentialStore(home=home, env=e, allow_helpers=True)
    with caplog.at_level(logging.DEBUG, logger="ociimage"):
        assert s.get("reg.example") == Credentials("helperuser", "helper-secret-1")
        assert s.get("docker.io") == Credentials("hub", "hub-secret-2")
        assert s.get("tok.example") == Credentials(identity_token="identity-secret-3")
        assert s.get("stored.example") == Credentials("st", "store-secret-4")
        assert s.get("missing.example") is None
        # the helper knows nothing, the store neither: the inline entry is the fallback
        assert s.get("fails.example") == Credentials("fallback", "fb-secret")
        assert s.get("nowhere.example") is None
    log = calls.read_text().splitlines()
    assert "get https://index.docker.io/v1/" in log and "get reg.example" in log
    for secret in ("helper-secret-1", "hub-secret-2", "identity-secret-3", "store-secret-4",
                   "fb-secret"):
        assert secret not in caplog.text


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory):
    d = tmp_path_factory.mktemp("cred-reg")
    htpasswd = d / "htpasswd"
    htpasswd.write_bytes(b"carol:" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4))
                         + b"\n")
    with RegistryServer(d / "reg", auth=("htpasswd", htpasswd)) as reg:
        img = Pusher(reg.url, auth=("carol", PASSWORD)).image("c/app", "v1", [[Entry("x")]])
        yield reg, img


@pytest.mark.parametrize("source", ["config.json", "auth.json", "credHelper"])
def test_pull_with_stored_credentials(basic_registry, env, tmp_path, source):
    reg, img = basic_registry
    home, e = env
    if source == "config.json":
        write(home / ".docker/config.json", {"auths": {f"http://{reg.host}": {
            "auth": b64("carol:" + PASSWORD)}}})
    elif source == "auth.json":
        write(home / ".config/containers/auth.json", {"auths": {reg.host: {
            "auth": b64("carol:" + PASSWORD)}}})
    else:
        bindir = tmp_path / "bin"
        helper_script(bindir, "test", {reg.host: ["carol", PASSWORD]}, tmp_path / "calls")
        e["PATH"] = f"{bindir}:{e['PATH']}"
        write(home / ".docker/config.json", {"credHelpers": {reg.host: "test"}})
    store = CredentialStore(home=home, env=e, allow_helpers=True)
    c = RegistryClient(credentials=store, backoff=0.01)
    assert c.get_manifest(parse_reference(f"{reg.host}/c/app:v1")).digest == img.manifest_digest


def test_pull_without_stored_credentials(basic_registry, env):
    reg, _ = basic_registry
    home, e = env
    c = RegistryClient(credentials=CredentialStore(home=home, env=e), backoff=0.01)
    with pytest.raises(AuthenticationRequired, match="docker login"):
        c.get_manifest(parse_reference(f"{reg.host}/c/app:v1"))


def test_helpers_can_be_disabled(env, tmp_path):
    home, e = env
    bindir = tmp_path / "bin"
    calls = tmp_path / "calls.log"
    helper_script(bindir, "test", {"reg.example": ["u", "s"]}, calls)
    e["PATH"] = f"{bindir}:{e['PATH']}"
    write(home / ".docker/config.json", {"credHelpers": {"reg.example": "test"}})
    assert CredentialStore(home=home, environ=e, allow_helpers=False).get("reg.example") is None
    assert not calls.exists()
    assert CredentialStore(home=home, environ=e, allow_helpers=True).get("reg.example") == \
        Credentials("u", "s")
