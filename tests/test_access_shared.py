"""Shared access verdicts (verdicts.py) on a real cache directory, and AccessChecker
instances standing for two nodes against the real token-auth registry."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ocibuild import Entry, Pusher
from registry_server import RegistryServer
from token_issuer import TokenIssuer

from ociimage.access import AccessChecker
from ociimage.cache import Cache, CacheEntry
from ociimage.errors import AccessDenied
from ociimage.registry.client import RegistryClient
from ociimage.registry.credentials import Credentials, StaticCredentials
from ociimage.verdicts import CLOCK_SLACK, SharedAnswers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the cache is root's")

D = "sha256:" + "ab" * 32
KEY = {"uid": 1001, "registry": "reg.example", "repository": "priv/app", "digest": D}


def test_a_verdict_answers_only_its_own_key_and_within_its_ttl(tmp_path):
    now = [1_000_000.0]
    answers = SharedAnswers(Cache(tmp_path / "c", node="a"), wall=lambda: now[0])
    answers.record_verdict(KEY, True, 300)
    assert answers.verdict(KEY, ttl=300, negative_ttl=30)["allowed"] is True
    for other in ({**KEY, "uid": 1002}, {**KEY, "repository": "priv/other"},
                  {**KEY, "digest": "sha256:" + "cd" * 32}, {**KEY, "registry": "evil"}):
        assert answers.verdict(other, ttl=300, negative_ttl=30) is None
    # the public verdict is another record
    assert answers.verdict({k: v for k, v in KEY.items() if k != "uid"},
                           ttl=300, negative_ttl=30) is None
    now[0] += 301
    assert answers.verdict(KEY, ttl=300, negative_ttl=30) is None


def test_a_record_moved_into_another_keys_place_is_ignored(tmp_path):
    cache = Cache(tmp_path / "c", node="a")
    answers = SharedAnswers(cache)
    answers.record_verdict(KEY, True, 300)
    answers.record_verdict({**KEY, "uid": 1002}, False, 30)
    files = {json.loads(p.read_text())["uid"]: p for p in (cache.records / "access").glob("*")}
    files[1001].replace(files[1002])  # 1001's positive verdict under 1002's name
    assert answers.verdict({**KEY, "uid": 1002}, ttl=300, negative_ttl=30) is None


def test_clock_skew_cannot_stretch_a_verdict(tmp_path):
    """A writer whose clock is ahead writes a later expiry: tolerated up to CLOCK_SLACK."""
    cache = Cache(tmp_path / "c", node="a")
    ahead = [1_000_000.0 + CLOCK_SLACK / 2]
    behind = [1_000_000.0]
    SharedAnswers(cache, wall=lambda: ahead[0]).record_verdict(KEY, True, 300)
    reader = SharedAnswers(cache, wall=lambda: behind[0])
    assert reader.verdict(KEY, ttl=300, negative_ttl=30)["remaining"] == 300 + CLOCK_SLACK / 2
    ahead[0] = 1_000_000.0 + CLOCK_SLACK * 2
    SharedAnswers(cache, wall=lambda: ahead[0]).record_verdict(KEY, True, 300)
    assert reader.verdict(KEY, ttl=300, negative_ttl=30) is None
    # a negative verdict is bounded by the negative TTL
    SharedAnswers(cache, wall=lambda: behind[0]).record_verdict(KEY, False, 300)
    assert reader.verdict(KEY, ttl=300, negative_ttl=30) is None


def test_resolved_records_match_their_key(tmp_path):
    answers = SharedAnswers(Cache(tmp_path / "c", node="a"))
    m = "sha256:" + "12" * 32
    answers.record_resolved(D, "linux/amd64", m)
    assert answers.resolved(D, "linux/amd64") == m
    assert answers.resolved(D, "linux/arm64/v8") is None
    assert answers.resolved("sha256:" + "cd" * 32, "linux/amd64") is None


ALICE_PW, BOB_PW = "sh4red-alice", "sh4red-bob"


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory):
    d = tmp_path_factory.mktemp("shared-token")
    issuer = TokenIssuer(d / "issuer", {"alice": ALICE_PW, "bob": BOB_PW},
                         {"alice": {"priv/*": ["pull"]}, "bob": {},
                          "": {"public/*": ["pull"]}})
    with issuer:
        with RegistryServer(d / "reg", auth=issuer.registry_auth()) as reg:
            p = Pusher(reg.url)
            p.s.headers["Authorization"] = "Bearer " + issuer.make_token("admin", [
                {"type": "repository", "name": n, "actions": ["pull", "push"]}
                for n in ("priv/app", "public/app")])
            layers = [[Entry("etc/", "dir", mode=0o755), Entry("etc/x", data=b"x")]]
            yield issuer, reg, p.image("priv/app", "v1", layers), p.image("public/app", "v1",
                                                                          layers)


def _entry(reg, repo, img) -> CacheEntry:
    ref = f"{reg.host}/{repo}@{img.manifest_digest}"
    return CacheEntry(img.manifest_digest, Path("/nonexistent.sqfs"), {"reference": ref}, 0, 0.0)


def _node(cache, reg):
    creds = {1001: StaticCredentials({reg.host: Credentials("alice", ALICE_PW)}),
             1002: StaticCredentials({reg.host: Credentials("bob", BOB_PW)})}
    return AccessChecker(lambda uid: RegistryClient(credentials=creds.get(uid), backoff=0.01),
                         ttl=60, negative_ttl=10, shared=SharedAnswers(cache))


def test_two_nodes_share_verdicts_and_strictness_stays(token_registry, tmp_path):
    issuer, reg, priv, pub = token_registry
    cache = Cache(tmp_path / "c", node="a")
    one, two = _node(cache, reg), _node(cache, reg)
    private, public = _entry(reg, "priv/app", priv), _entry(reg, "public/app", pub)
    one.check(private, 1001)                        # alice, with her credentials: 1 question
    assert one.requests == 1
    two.check(private, 1001)                        # the other node: none
    assert two.requests == 0
    for uid in (1002, 1003):                        # bob (a login, no grant), anonymous
        with pytest.raises(AccessDenied):
            one.check(private, uid)
        asked = one.requests
        with pytest.raises(AccessDenied):
            two.check(private, uid)                 # refusals are shared too
        assert one.requests == asked and two.requests == 0
    one.check(public, 1003)                         # anonymous: one HEAD decides both verdicts
    two.check(public, 1003)
    assert two.requests == 0
    # a positive verdict for one uid never serves another
    three = _node(Cache(tmp_path / "c2", node="b"), reg)
    three.record_pulled(1001, private_ref(private), private.digest)
    with pytest.raises(AccessDenied):
        three.check(private, 1003)
    three.check(private, 1001)
    assert three.requests == 1                      # only 1003's question


def private_ref(entry: CacheEntry):
    from ociimage.reference import parse_reference
    return parse_reference(entry.meta["reference"])


def test_records_that_answer_nothing_are_swept_once_an_hour_by_one_node(tmp_path):
    """Records would otherwise only accumulate (one per uid and image asked about, one per
    index resolved, and users choose the images)."""
    from ociimage.verdicts import ACCESS, PUBLIC, RESOLVED, SharedAnswers
    cache = Cache(tmp_path / "c", node="n1")
    now = [1_000_000.0]
    answers = SharedAnswers(cache, wall=lambda: now[0])
    live = {"uid": 1001, "registry": "r", "repository": "a", "digest": D}
    old = dict(live, uid=1002)
    answers.record_verdict(live, True, 300)
    answers.record_verdict({"registry": "r", "repository": "a", "digest": D}, True, 300)
    now[0] -= 1000
    answers.record_verdict(old, False, 30)          # expired 970 s ago
    now[0] += 1000
    cache.build(D, lambda p: (p.write_bytes(b"x"), {"reference": "r/a"})[1])
    answers.record_resolved("sha256:" + "1" * 64, "linux/amd64", D)       # entry cached
    answers.record_resolved("sha256:" + "2" * 64, "linux/amd64", "sha256:" + "3" * 64)  # gone
    assert answers.sweep_if_due() == 2
    assert len(cache.record_names(ACCESS)) == 1 and len(cache.record_names(PUBLIC)) == 1
    assert answers.verdict(live, ttl=300, negative_ttl=30)["allowed"] is True
    assert answers.resolved("sha256:" + "1" * 64, "linux/amd64") == D
    assert len(cache.record_names(RESOLVED)) == 1
    # another node, within the hour: only reads the marker, sweeps nothing
    answers.record_verdict(old, False, -100)
    other = SharedAnswers(Cache(tmp_path / "c", node="n2"), wall=lambda: now[0] + 60)
    assert other.sweep_if_due() == 0
    assert len(cache.record_names(ACCESS)) == 2
    # an hour later it is due again
    later = SharedAnswers(Cache(tmp_path / "c", node="n2"), wall=lambda: now[0] + 3700)
    assert later.sweep_if_due() >= 1
    assert len(cache.record_names(ACCESS)) == 0     # both past their expiry by then
