"""flatten(): OCI changeset rules, metadata, hostile names, limits.

Each case runs two ways. `squashfs`: hand-made layers flattened through
tar2sqfs and the mounted SquashFS checked, so what is tested is what a
container would see (needs root for the loop mount). `layout-tar`: the same
layers written as an OCI image-layout directory, opened as an Image
(layout.py) and flattened tar to tar (image.flatten_image), the tar read
back as the same records (tartree.py): no root, no registry, no mount.
"""

import hashlib
import io
import logging
import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

from fstree import find, hardlink_groups, names, tree_of
from ocibuild import Entry as E
from ocibuild import OCI_LAYER_GZIP, layer_tar, write_layout
from ociimage.errors import CorruptLayer, LimitExceeded
from ociimage.flatten import FlattenLimits, flatten
from ociimage.image import flatten_image
from ociimage.layout import LayoutImage
from ociimage.squash import squash_layers
from tartree import tree_of_tar

D = dict(kind="dir", mode=0o755)


def _through_squashfs(tmp_path, *layers, limits=None):
    out = tmp_path / "image.sqfs"
    stats = squash_layers([io.BytesIO(layer_tar(l)) for l in layers], out, limits=limits)
    return stats, tree_of(out)


def _through_layout(tmp_path, *layers, limits=None):
    layout = tmp_path / "layout"
    write_layout(layout, list(reversed(layers)), tag="t", layer_media_type=OCI_LAYER_GZIP)
    out = io.BytesIO()
    stats = flatten_image(LayoutImage(layout, tag="t"), out, limits=limits)
    return stats, tree_of_tar(out.getvalue())


@pytest.fixture(params=["squashfs", "layout-tar"])
def squash(request):
    """squash(tmp_path, *layers): flatten layers (entry lists, top-most first); (stats, tree)."""
    if request.param == "squashfs":
        if os.geteuid() != 0:
            pytest.skip("loop-mounting needs root")
        return _through_squashfs
    return _through_layout


def sha(data):
    return hashlib.sha256(data).hexdigest()


def b(*paths):
    return {os.fsencode(p) for p in paths}


def test_whiteouts_opaque_and_replacement(tmp_path, squash):
    bottom = [
        E("etc", **D), E("etc/keep", data=b"keep"), E("etc/gone", data=b"gone"),
        E("etc/sub", **D), E("etc/sub/deep", data=b"deep"),
        E("opq", **D), E("opq/old", data=b"old"), E("opq/olddir", **D), E("opq/olddir/x", data=b"x"),
        E("f2d", data=b"was a file"),
        E("d2f", **D), E("d2f/child", data=b"hidden by the file above"),
        E("attrs", kind="dir", mode=0o700, uid=5, gid=6, mtime=1000), E("attrs/lower", data=b"l"),
    ]
    middle = [
        E("etc/.wh.sub"),                                  # hides etc/sub and all below
        E("opq", kind="dir", mode=0o750),
        E("opq/.wh..wh..opq"), E("opq/mid", data=b"mid"),  # new child in the opaque layer stays
        E("f2d", **D), E("f2d/inner", data=b"inner"),
        E("d2f", data=b"now a file"),
        E("attrs", kind="dir", mode=0o711, uid=1, gid=2, mtime=2000),
    ]
    top = [E("etc/.wh.gone"), E("etc/sub", **D), E("etc/sub/new", data=b"new"),
           E("opq/top", data=b"top")]
    stats, t = squash(tmp_path, top, middle, bottom)
    assert names(t) == b(
        "etc", "etc/keep", "etc/sub", "etc/sub/new",
        "opq", "opq/mid", "opq/top", "f2d", "f2d/inner", "d2f", "attrs", "attrs/lower")
    assert find(t, "f2d").kind == "dir" and find(t, "d2f").kind == "file"
    assert find(t, "d2f").sha256 == sha(b"now a file")
    a = find(t, "attrs")
    assert (a.mode, a.uid, a.gid, a.mtime) == (0o711, 1, 2, 2000)
    assert find(t, "opq").mode == 0o750
    assert stats.skipped["whiteout"] == 3
    assert not stats.warnings


def test_opaque_root_hides_every_lower_layer(tmp_path, squash):
    bottom = [E("a", data=b"a"), E("dir", **D), E("dir/x", data=b"x")]
    top = [E(".wh..wh..opq"), E("b", data=b"b")]
    _, t = squash(tmp_path, top, bottom)
    assert names(t) == b("b")


def test_hardlinks(tmp_path, squash):
    bottom = [
        E("lower", data=b"lower target", mode=0o755, uid=3),
        E("doomed", data=b"whited out above"),
        E("replaced", data=b"old contents"),
        E("adir", **D),
    ]
    top = [
        E("link-before", kind="hardlink", linkname="same"),   # before its target
        E("same", data=b"same layer"),
        E("link-same", kind="hardlink", linkname="./same"),
        E("link-lower", kind="hardlink", linkname="/lower"),
        E("chain", kind="hardlink", linkname="link-lower"),   # link to a link
        E(".wh.doomed"),
        E("link-doomed", kind="hardlink", linkname="doomed"),
        E("replaced", data=b"new contents"),
        E("link-replaced-mid", kind="hardlink", linkname="nowhere"),
        E("link-dir", kind="hardlink", linkname="adir"),
        E("escape", kind="hardlink", linkname="../../etc/shadow"),
        E("sym", kind="symlink", linkname="same"),
        E("link-sym", kind="hardlink", linkname="sym"),
    ]
    stats, t = squash(tmp_path, top, bottom)
    assert hardlink_groups(t) == {frozenset(b("same", "link-before", "link-same")),
                                  frozenset(b("lower", "link-lower", "chain"))}
    assert find(t, "chain").sha256 == sha(b"lower target")
    assert find(t, "chain").mode == 0o755 and find(t, "chain").uid == 3
    for gone in ("link-doomed", "link-replaced-mid", "link-dir", "escape", "link-sym", "doomed"):
        assert find(t, gone) is None, gone
    assert stats.hardlinks == 4
    assert stats.skipped["bad_hardlink"] == 5


def test_hardlink_to_target_replaced_above_is_dropped(tmp_path, squash):
    # The link was made to the lower contents, which no longer exist.
    bottom = [E("t", data=b"v1")]
    middle = [E("l", kind="hardlink", linkname="t")]
    top = [E("t", data=b"v2")]
    stats, t = squash(tmp_path, top, middle, bottom)
    assert names(t) == b("t") and find(t, "t").sha256 == sha(b"v2")
    assert stats.skipped["bad_hardlink"] == 1


def test_metadata(tmp_path, squash):
    cap = "\x01\x00\x00\x02\x00\x04\x00\x00" + "\x00" * 12  # vfs_cap_data v2: cap_net_bind_service
    layer = [
        E("bin", **D),
        E("bin/suid", data=b"#!", mode=0o4755, uid=0, gid=0),
        E("bin/sgid", data=b"#!", mode=0o2711, uid=1000, gid=2000),
        E("tmp", kind="dir", mode=0o1777),
        E("owned", data=b"o", mode=0o640, uid=123456, gid=654321, mtime=1234567890),
        E("big-ids", data=b"o", uid=3_000_000, gid=4_000_000),
        E("x", data=b"x", xattrs={"user.foo": "bar", "security.capability": cap,
                                  "user.bin": "\udcff\x00\udcfe"}),
        E("xdir", kind="dir", mode=0o755, xattrs={"trusted.t": "v"}),
        E("dropped-xattr", data=b"", xattrs={"system.posix_acl_access": "x"}),
        E("sym-abs", kind="symlink", linkname="/etc/passwd"),
        E("sym-rel", kind="symlink", linkname="../../../../x", mtime=42),
        E("dev", **D),
        E("dev/null", kind="char", devmajor=1, devminor=3, mode=0o666),
        E("dev/sda", kind="block", devmajor=8, devminor=0, mode=0o660, gid=6),
        E("fifo", kind="fifo", mode=0o600),
    ]
    stats, t = squash(tmp_path, layer)
    assert find(t, "bin/suid").mode == 0o4755
    assert (find(t, "bin/sgid").mode, find(t, "bin/sgid").uid, find(t, "bin/sgid").gid) == \
        (0o2711, 1000, 2000)
    assert find(t, "tmp").mode == 0o1777
    o = find(t, "owned")
    assert (o.mode, o.uid, o.gid, o.mtime) == (0o640, 123456, 654321, 1234567890)
    assert (find(t, "big-ids").uid, find(t, "big-ids").gid) == (3_000_000, 4_000_000)
    # only user.* survives: see test_security_and_trusted_xattrs_are_dropped
    assert find(t, "x").xattrs == {"user.foo": b"bar", "user.bin": b"\xff\x00\xfe"}
    assert find(t, "xdir").xattrs == {}
    assert find(t, "dropped-xattr").xattrs == {}
    assert stats.dropped_xattrs == {"security": 1, "trusted": 1, "system": 1}
    assert find(t, "sym-abs").target == b"/etc/passwd"
    assert find(t, "sym-rel").target == b"../../../../x" and find(t, "sym-rel").mtime == 42
    n, s = find(t, "dev/null"), find(t, "dev/sda")
    assert n.kind == "char" and n.rdev == os.makedev(1, 3) and n.mode == 0o666
    assert s.kind == "block" and s.rdev == os.makedev(8, 0) and s.gid == 6
    assert find(t, "fifo").kind == "fifo" and find(t, "fifo").mode == 0o600


def test_security_and_trusted_xattrs_are_dropped(tmp_path, squash, caplog):
    """An image must not set file capabilities, LSM labels or root-only trusted.* metadata
    (e.g. overlayfs' trusted.overlay.*) on the host that mounts it; user.* stays."""
    cap = "\x01\x00\x00\x02\x00\x04\x00\x00" + "\x00" * 12  # cap_net_bind_service
    layer = [
        E("bin", **D),
        E("bin/ping", data=b"#!", xattrs={"security.capability": cap, "user.keep": "yes"}),
        E("label", data=b"l", xattrs={"security.selinux": "system_u:object_r:shadow_t:s0"}),
        E("opq", kind="dir", mode=0o755, xattrs={"trusted.overlay.opaque": "y",
                                                  "trusted.overlay.redirect": "/etc"}),
        E("acl", data=b"a", xattrs={"system.posix_acl_access": "x", "user.a": "1"}),
    ]
    lower = [E("bin", **D), E("bin/lower", data=b"x", xattrs={"security.ima": "sig"})]
    with caplog.at_level(logging.DEBUG, logger="ociimage.flatten"):
        stats, t = squash(tmp_path, layer, lower)
    assert find(t, "bin/ping").xattrs == {"user.keep": b"yes"}
    assert find(t, "label").xattrs == {}
    assert find(t, "opq").xattrs == {}
    assert find(t, "acl").xattrs == {"user.a": b"1"}
    assert find(t, "bin/lower").xattrs == {}
    assert stats.dropped_xattrs == {"security": 3, "trusted": 2, "system": 1}
    assert not [w for w in stats.warnings if "xattr" in w]
    summary = [r for r in caplog.records if "dropped xattrs" in r.getMessage()]
    assert len(summary) == 1 and summary[0].levelno == logging.DEBUG
    assert "security.* 3" in summary[0].getMessage() and "trusted.* 2" in summary[0].getMessage()


def test_hostile_names(tmp_path, squash, caplog):
    bottom = [E("etc", **D), E("etc/shadow", data=b"secret"), E("safe", data=b"safe")]
    top = [
        E("../escape", data=b"1"),
        E("/abs", data=b"2"),
        E("./dotted", data=b"3"),
        E("a/../../x", data=b"4"),
        E("ok/../inside", data=b"5"),
        E("link", kind="symlink", linkname="/etc"),
        E("link/passwd", data=b"evil"),
        E("file", data=b"f"),
        E("file/below", data=b"evil"),
        E("hl", kind="hardlink", linkname="../../etc/shadow"),
        E("hl2", kind="hardlink", linkname="etc/shadow"),   # fine: inside the image
        E("", data=b"empty"),
        E("n" * 120 + "\0hidden", data=b"nul"),  # long enough to travel in a PAX header
        E(".wh.safe/evil", data=b"x"),
    ]
    with caplog.at_level(logging.WARNING, logger="ociimage.flatten"):
        stats, t = squash(tmp_path, top, bottom)
    assert names(t) == b("etc", "etc/shadow", "abs", "dotted", "inside", "link", "file",
                         "hl2", "safe")
    assert find(t, "hl2").ino == find(t, "etc/shadow").ino
    assert stats.skipped["hostile_name"] >= 4
    assert stats.skipped["parent_not_dir"] == 2
    assert stats.skipped["bad_hardlink"] == 1
    rec = [r for r in caplog.records if getattr(r, "reason", "") == "parent_not_dir"]
    assert {r.entry for r in rec} == {"'link/passwd'", "'file/below'"}
    assert all(r.layer == 0 for r in rec)


def test_entries_below_symlink_in_lower_layer_stay_hidden(tmp_path, squash):
    bottom = [E("lib", kind="symlink", linkname="usr/lib"), E("usr", **D), E("usr/lib", **D),
              E("usr/lib/x", data=b"x")]
    top = [E("lib", **D), E("lib/y", data=b"y")]  # directory replaces the symlink
    _, t = squash(tmp_path, top, bottom)
    assert find(t, "lib").kind == "dir"
    assert names(t) == b("lib", "lib/y", "usr", "usr/lib", "usr/lib/x")


def test_odd_but_legal_names(tmp_path, squash):
    c255, c300 = "c" * 255, "d" * 300
    layer = [
        E("new\nline", data=b"1"), E("ctl\x01\x1b[31m", data=b"2"),
        E("latin1-\udce9t\udce9", data=b"3"),       # b"latin1-\xe9t\xe9": not UTF-8
        E("utf8-\u00e9t\u00e9", data=b"4"),
        E("dir255", **D), E("dir255/" + c255, data=b"5"),
        E("dir300", **D), E("dir300/" + c300, data=b"6"),
        E("deep/" + "/".join(["p" * 200] * 15), data=b"7"),  # 3 KB path: beyond ustar, under PATH_MAX
        E("sym", kind="symlink", linkname="t" * 3000),
    ]
    stats, t = squash(tmp_path, layer)
    assert b"new\nline" in t and b"ctl\x01\x1b[31m" in t
    assert b"latin1-\xe9t\xe9" in t and "utf8-\u00e9t\u00e9".encode() in t
    assert os.fsencode("dir255/" + c255) in t
    assert find(t, "dir300") is not None and len([p for p in t if p.startswith(b"dir300/")]) == 0
    assert stats.skipped["hostile_name"] == 1
    assert any(p.endswith(b"p" * 200) and p.count(b"/") == 15 for p in t)
    assert find(t, "sym").target == b"t" * 3000


def test_duplicates_in_one_layer(tmp_path, squash, caplog):
    layer = [
        E("d", kind="dir", mode=0o700), E("d/x", data=b"x"), E("d", kind="dir", mode=0o755, uid=9),
        E("s", kind="symlink", linkname="a"), E("s", kind="symlink", linkname="b"),
        E("sf", kind="symlink", linkname="a"), E("sf", data=b"file wins"),
        E("ff", data=b"first"), E("ff", data=b"second"),
    ]
    stats, t = squash(tmp_path, layer)
    assert (find(t, "d").mode, find(t, "d").uid) == (0o755, 9)
    assert find(t, "s").target == b"b"
    assert find(t, "sf").kind == "file" and find(t, "sf").sha256 == sha(b"file wins")
    # The one case one pass cannot undo: contents already written. Kept, and said.
    assert find(t, "ff").sha256 == sha(b"first")
    assert stats.skipped["duplicate"] == 1
    assert any("'ff'" in w and "duplicate" in w for w in stats.warnings)


def test_implicit_and_explicit_directories(tmp_path, squash):
    bottom = [E("a", kind="dir", mode=0o711, uid=4, mtime=5000)]
    top = [E("a/b/c", data=b"c"), E("x/y", data=b"y")]
    _, t = squash(tmp_path, top, bottom)
    a, ab, x = find(t, "a"), find(t, "a/b"), find(t, "x")
    assert (a.mode, a.uid, a.mtime) == (0o711, 4, 5000)
    assert (ab.mode, ab.uid, ab.mtime) == (0o755, 0, 0)
    assert (x.mode, x.uid, x.mtime) == (0o755, 0, 0)


def test_output_is_deterministic_and_pax_without_names():
    layers = [
        [E("x", data=b"x" * 10_000, uid=1000, xattrs={"user.a": "1", "user.b": "2"}),
         E("d", **D), E("l", kind="hardlink", linkname="x")],
        [E("d/y", data=b"y", mtime=1)],
    ]
    outs = []
    for _ in range(2):
        out = io.BytesIO()
        flatten([io.BytesIO(layer_tar(l)) for l in layers], out)
        outs.append(out.getvalue())
    assert outs[0] == outs[1]
    with tarfile.open(fileobj=io.BytesIO(outs[0])) as tf:
        members = tf.getmembers()
    assert [m.name for m in members] == ["x", "d/y", "d", "l"]
    assert all(m.uname == "" and m.gname == "" for m in members)
    assert members[0].pax_headers == {"SCHILY.xattr.user.a": "1", "SCHILY.xattr.user.b": "2"}


def test_layers_are_drained_to_eof():
    class Layer(io.BytesIO):
        drained = False

        def drain(self):
            self.drained = True

    tar = layer_tar([E("a", data=b"a")]) + b"\0" * 100_000
    layer = Layer(tar)
    flatten([layer], io.BytesIO())
    assert layer.tell() == len(tar) and layer.drained


def test_empty_layer_and_no_end_marker():
    tar = layer_tar([E("a", data=b"a")])
    unterminated = tar[:1024]  # header + data, no zero blocks
    stats = flatten([io.BytesIO(b""), io.BytesIO(unterminated)], io.BytesIO())
    assert stats.entries == 1 and stats.layers == 2


def test_corrupt_tar():
    tar = bytearray(layer_tar([E("a", data=b"a" * 600), E("b", data=b"b")]))
    bad = bytes(tar[:1536]) + b"\xff" * 512 + bytes(tar[2048:])  # garbage second header
    with pytest.raises(CorruptLayer):
        flatten([io.BytesIO(bad)], io.BytesIO())
    with pytest.raises(CorruptLayer):  # data cut short
        flatten([io.BytesIO(bytes(tar[:1000]))], io.BytesIO())
    with pytest.raises(CorruptLayer):
        flatten([io.BytesIO(b"not a tar at all" * 100)], io.BytesIO())


def test_limits():
    layer = [E(f"f{i}", data=b"x" * 1000) for i in range(20)]
    with pytest.raises(LimitExceeded, match="more than 10 entries"):
        flatten([io.BytesIO(layer_tar(layer))], io.BytesIO(), limits=FlattenLimits(max_entries=10))
    with pytest.raises(LimitExceeded, match="contents exceed 5000"):
        flatten([io.BytesIO(layer_tar(layer))], io.BytesIO(), limits=FlattenLimits(max_bytes=5000))
    with pytest.raises(LimitExceeded, match="expand to more than"):
        flatten([io.BytesIO(layer_tar(layer) + b"\0" * 100_000)], io.BytesIO(),
                limits=FlattenLimits(max_input_bytes=50_000))
    huge = [E("x", data=b"", xattrs={"user.big": "v" * 300_000})]
    with pytest.raises(LimitExceeded, match="extended header"):
        flatten([io.BytesIO(layer_tar(huge))], io.BytesIO(),
                limits=FlattenLimits(max_header_bytes=100_000))


def test_many_entries_keep_memory_modest(tmp_path):
    """50k entries: peak RSS stays far below what holding contents would need."""
    script = textwrap.dedent("""
        import io, resource, sys, tarfile
        sys.path.insert(0, %r)
        from ociimage.flatten import flatten
        path = sys.argv[1]
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
            for i in range(50_000):
                ti = tarfile.TarInfo(f"d{i %% 100}/f{i}")
                ti.size = 4096
                tf.addfile(ti, io.BytesIO(b"x" * 4096))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with open(path, "rb") as f, open("/dev/null", "wb") as out:
            st = flatten([f], out)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(st.entries, (peak - base) // 1024)
    """) % os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "daemon")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.tar")],
                         capture_output=True, text=True, check=True)
    entries, grown_mb = map(int, res.stdout.split())
    assert entries == 50_000
    assert grown_mb < 60, f"RSS grew by {grown_mb} MB for 200 MB of contents"


def test_root_entry_sets_root_attributes_from_the_top_most_layer(tmp_path, squash):
    # umoci applies a "./" entry to the rootfs itself; so does the image.
    bottom = [E("./", kind="dir", mode=0o700, uid=7, mtime=7), E("a", data=b"a")]
    top = [E(".", kind="dir", mode=0o755, uid=0, mtime=9), E("/", kind="dir", mode=0o777)]
    _, t = squash(tmp_path, top, bottom)
    r = t[b""]
    assert (r.mode, r.uid, r.mtime) == (0o755, 0, 9)
    assert names(t) == b("a")
