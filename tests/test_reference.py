import io

import pytest

from ociimage.digests import VerifyingReader, digest_bytes, digest_hex, validate_digest
from ociimage.errors import DigestMismatch, InvalidArgument, InvalidReference
from ociimage.reference import Reference, parse_reference
from ociimage.registry.platform import Platform, parse_platform, select_platform

D = "sha256:" + "a" * 64
D2 = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize("text,domain,path,tag,digest", [
    ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
    ("ubuntu:24.04", "docker.io", "library/ubuntu", "24.04", None),
    ("library/ubuntu", "docker.io", "library/ubuntu", "latest", None),
    ("docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None),
    ("index.docker.io/library/ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
    ("me/app", "docker.io", "me/app", "latest", None),
    ("me/sub/app:v1", "docker.io", "me/sub/app", "v1", None),
    ("reg.example.org:5000/ns/img:tag", "reg.example.org:5000", "ns/img", "tag", None),
    ("reg.example.org/ns/img", "reg.example.org", "ns/img", "latest", None),
    ("localhost/img", "localhost", "img", "latest", None),
    ("localhost:5000/img:1", "localhost:5000", "img", "1", None),
    ("127.0.0.1:5000/img", "127.0.0.1:5000", "img", "latest", None),
    ("[::1]:5000/img", "[::1]:5000", "img", "latest", None),
    ("Upper.Example.COM/img", "Upper.Example.COM", "img", "latest", None),
    ("Foo/bar", "Foo", "bar", "latest", None),  # uppercase first part: a host, as in Docker
    ("img@" + D, "docker.io", "library/img", None, D),
    ("img:tag@" + D, "docker.io", "library/img", "tag", D),
    ("reg:5000/a/b@" + D2, "reg:5000", "a/b", None, D2),
    ("a.b-c.d-e--f/x", "a.b-c.d-e--f", "x", "latest", None),
    ("me/a_b__c.d-e---f", "docker.io", "me/a_b__c.d-e---f", "latest", None),
    ("img:" + "T" * 128, "docker.io", "library/img", "T" * 128, None),
    ("img:_x.Y-1", "docker.io", "library/img", "_x.Y-1", None),
    ("img@sha512:" + "b" * 128, "docker.io", "library/img", None, "sha512:" + "b" * 128),
])
def test_parse_valid(text, domain, path, tag, digest):
    r = parse_reference(text)
    assert (r.domain, r.path, r.tag, r.digest) == (domain, path, tag, digest)
    assert r.repository == path
    # the canonical form parses back to the same reference
    assert parse_reference(str(r)) == r


@pytest.mark.parametrize("text,needle", [
    ("", "empty"),
    ("UPPER", "lowercase"),
    ("me/App", "lowercase"),
    ("reg.io/Ns/img", "lowercase"),
    ("ubuntu 24.04", "whitespace"),
    (" ubuntu", "whitespace"),
    ("ubuntu\n", "whitespace"),
    ("img@sha256:abc", "digest"),
    ("img@sha256:" + "A" * 64, "digest"),
    ("img@md5:" + "a" * 32, "digest"),
    ("img@sha256:" + "a" * 63, "digest"),
    ("img@", "digest"),
    ("img:", "tag"),
    ("img:.x", "tag"),
    ("img:-x", "tag"),
    ("img:" + "t" * 129, "tag"),
    ("img:a@b", "digest"),
    ("a/" + "b" * 260, "longer than 255"),
    ("reg.example.org/" + "c" * 240, "longer than 255"),
    ("a//b", "repository name"),
    ("/a", "repository name"),
    ("a/", "repository name"),
    ("-a", "repository name"),
    ("a-", "repository name"),
    ("a..b", "repository name"),
    ("a___b", "repository name"),
    ("localhost:/x", "registry host"),
    ("-reg.io/x", "registry host"),
    ("reg_x.io/x", "registry host"),
    (":tag", "empty"),
    ("a" * 64, "ambiguous"),
    ("imäge", "non-ASCII"),
])
def test_parse_invalid(text, needle):
    with pytest.raises(InvalidReference) as ei:
        parse_reference(text)
    msg = str(ei.value)
    assert needle in msg
    assert "\n" not in msg and len(msg) < 400


@pytest.mark.parametrize("text,shown", [
    ("reg.example/\x1b[2Jx:1", "reg.example/\\x1b[2Jx:1"),
    ("reg.example/x:t\nag", "reg.example/x:t\\nag"),
    ("reg.example/x:t\u2028ag", "reg.example/x:t\\u2028ag"),
    ("reg.example/x@sha256:\x9b31m", "reg.example/x@sha256:\\x9b31m"),
])
def test_invalid_reference_is_shown_escaped(text, shown):
    """A refused reference is echoed with its control characters escaped: an escape
    sequence in it must not reach the user's terminal, nor a newline start a line."""
    with pytest.raises(InvalidReference) as ei:
        parse_reference(text)
    msg = str(ei.value)
    assert f"'{shown}'" in msg, msg
    assert msg.isprintable(), msg


def test_str_and_familiar():
    r = parse_reference("ubuntu:24.04")
    assert str(r) == "docker.io/library/ubuntu:24.04"
    assert r.familiar() == "ubuntu:24.04"
    p = r.with_digest(D)
    assert str(p) == f"docker.io/library/ubuntu:24.04@{D}"
    assert p.familiar() == f"ubuntu:24.04@{D}"
    assert p.identifier == D and r.identifier == "24.04"
    assert parse_reference("me/app").familiar() == "me/app:latest"
    assert parse_reference("docker.io/library/a/b").familiar() == "library/a/b:latest"
    assert parse_reference("localhost:5000/x@" + D).familiar() == "localhost:5000/x@" + D
    assert parse_reference("localhost:5000/x").name == "localhost:5000/x"
    with pytest.raises(InvalidReference):
        r.with_digest("sha256:nope")
    assert isinstance(hash(r), int)  # frozen


def test_default_tag_override():
    assert parse_reference("img", default_tag=None).tag is None


def test_validate_digest():
    assert validate_digest(D) == D
    assert digest_hex(D) == "a" * 64
    for bad in ["sha256:" + "A" * 64, "sha256:../../etc", "sha256:" + "a" * 65, "sha384:" + "a" * 96,
                "sha512:" + "a" * 64, "", None, "sha256:" + "a" * 64 + "\n", "SHA256:" + "a" * 64]:
        with pytest.raises(InvalidArgument):
            validate_digest(bad)


def test_verifying_reader_ok_and_progress():
    data = b"x" * 100000
    seen = []
    r = VerifyingReader(io.BytesIO(data), digest_bytes(data), len(data), on_bytes=seen.append)
    assert r.read(10) == b"x" * 10
    assert r.read() == data[10:]
    assert r.verified and sum(seen) == len(data)
    assert r.read(5) == b""


def test_verifying_reader_mismatch():
    data = b"hello world"
    with pytest.raises(DigestMismatch, match="content digest"):
        VerifyingReader(io.BytesIO(b"hello worle"), digest_bytes(data), len(data)).read()
    with pytest.raises(DigestMismatch, match="expected 11"):
        VerifyingReader(io.BytesIO(b"hello"), digest_bytes(data), len(data)).read()
    # too long: caught without reading the whole (possibly endless) stream
    long = io.BytesIO(b"y" * 10_000_000)
    reader = VerifyingReader(long, digest_bytes(data), len(data))
    with pytest.raises(DigestMismatch, match="more than"):
        reader.read()
    assert long.tell() < 1000
    # readinto path (as used by io.BufferedReader)
    buf = io.BufferedReader(VerifyingReader(io.BytesIO(data), digest_bytes(data), len(data)))
    assert buf.read() == data
    with pytest.raises(DigestMismatch):
        io.BufferedReader(VerifyingReader(io.BytesIO(b"nope"), digest_bytes(data))).read()


def test_platform_parse_and_match():
    assert parse_platform("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert parse_platform("linux/amd64") == Platform("linux", "amd64", None)
    assert parse_platform("linux/x86_64") == Platform("linux", "amd64", None)
    assert parse_platform("linux/aarch64") == Platform("linux", "arm64", "v8")
    assert parse_platform("arm64").os == "linux"
    assert parse_platform("linux/armhf") == Platform("linux", "arm", "v7")
    for bad in ["", "linux/", "a/b/c/d", "linux/amd 64"]:
        with pytest.raises(InvalidArgument):
            parse_platform(bad)
    assert Platform("linux", "arm64").matches(Platform("linux", "arm64", "v8"))
    assert Platform("linux", "arm64", "v8").matches(Platform("linux", "aarch64"))
    assert not Platform("linux", "arm64").matches(Platform("linux", "amd64"))
    assert Platform("linux", "arm", "v7").can_run(Platform("linux", "arm", "v6"))
    assert not Platform("linux", "arm", "v6").can_run(Platform("linux", "arm", "v7"))
    assert not Platform("linux", "amd64").can_run(Platform("linux", "amd64", "v3"))


def test_select_platform():
    cands = [(Platform("linux", "amd64"), "amd"), (Platform("linux", "arm", "v6"), "v6"),
             (Platform("linux", "arm", "v7"), "v7"), (Platform("unknown", "unknown"), "att"),
             (Platform("linux", "arm64", "v8"), "arm64"), (None, "none")]
    assert select_platform(Platform("linux", "arm64"), cands) == "arm64"
    assert select_platform(Platform("linux", "arm", "v7"), cands) == "v7"
    assert select_platform(Platform("linux", "arm", "v8"), cands) == "v7"
    assert select_platform(Platform("linux", "x86_64"), cands) == "amd"
    from ociimage.errors import PlatformNotFound
    with pytest.raises(PlatformNotFound) as ei:
        select_platform(Platform("linux", "s390x"), cands)
    msg = str(ei.value)
    assert "linux/s390x" in msg and "linux/arm/v6" in msg and "unknown" not in msg
