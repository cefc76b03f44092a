"""SquashFS writer: options, reproducibility, failures, and a check against umoci."""

import filecmp
import gzip
import io
import os
import shutil
import subprocess

import pytest
import zstandard

from fstree import hardlink_groups, tree_of, walk
from ocibuild import OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Entry as E
from ocibuild import compress, layer_tar, write_layout
from ociimage.errors import (CorruptLayer, InvalidArgument, LimitExceeded, NoSpace, SquashError,
                             UnsupportedMediaType)
from ociimage.flatten import FlattenLimits
from ociimage.layers import open_layer
from ociimage.squash import (SquashFSWriter, SquashOptions, find_writer, squash_layers,
                             writer_argv, writer_version)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts)")
D = dict(kind="dir", mode=0o755)
OCI_TAR = "application/vnd.oci.image.layer.v1.tar"


def blobs(layers, media_type):
    """Compressed blobs of entry lists (top-most first)."""
    return [compress(layer_tar(l), media_type) for l in layers]


def streams(layer_blobs, media_type, **kw):
    for blob in layer_blobs:
        yield open_layer(io.BytesIO(blob), media_type, **kw)


# -- options and writer discovery ---------------------------------------------

def test_options_validation():
    SquashOptions().validate()
    SquashOptions(compression="gzip", level=9, block_size=1 << 20, jobs=2).validate()
    SquashOptions(compression="lz4", level=3).validate()  # no levels: ignored
    SquashOptions(compression="xz", level=0, block_size=4096).validate()
    for bad in (dict(compression="bzip2"), dict(level=23), dict(level=0),
                dict(compression="gzip", level=10), dict(block_size=100_000),
                dict(block_size=2 << 20), dict(block_size=2048), dict(jobs=0),
                dict(level="3")):
        with pytest.raises(InvalidArgument):
            SquashOptions(**bad).validate()
    with pytest.raises(InvalidArgument):
        SquashFSWriter("/nonexistent/x", SquashOptions(compression="nope"))


def test_find_writer_prefers_tar2sqfs(tmp_path, monkeypatch):
    w = find_writer()
    assert w.name == "tar2sqfs" and w.version >= (1, 0)
    assert "tar2sqfs" in writer_version()
    argv = writer_argv(w, "/x.sqfs", SquashOptions(jobs=2))
    assert argv[-1] == "/x.sqfs" and "level=3" in argv and "zstd" in argv
    assert "--comp-extra" not in writer_argv(w, "/x", SquashOptions(compression="lz4"))
    # Debian 12's sqfstar is 4.5.1: too old to be trusted.
    sqfstar = shutil.which("sqfstar")
    only = tmp_path / "bin"
    only.mkdir()
    monkeypatch.setenv("PATH", str(only))
    with pytest.raises(SquashError, match="squashfs-tools-ng"):
        find_writer()
    if sqfstar:
        os.symlink(sqfstar, only / "sqfstar")
        version = subprocess.run([sqfstar, "-version"], capture_output=True, text=True).stdout
        if "4.5" in version.splitlines()[0]:
            with pytest.raises(SquashError, match="too old"):
                find_writer()


# -- reproducibility and media types ------------------------------------------

LAYERS = [
    [E("usr", **D), E("usr/bin", **D), E("usr/bin/tool", data=os.urandom(300_000), mode=0o755),
     E("usr/bin/alias", kind="hardlink", linkname="usr/bin/tool"), E(".wh.old")],
    [E("old", data=b"old"), E("usr", kind="dir", mode=0o700),
     E("usr/lib.so", data=b"\0" * 500_000 + b"lib", xattrs={"user.k": "v"}),
     E("lnk", kind="symlink", linkname="usr/lib.so")],
]


@pytest.mark.parametrize("media_type", [OCI_TAR, OCI_LAYER_GZIP, OCI_LAYER_ZSTD])
def test_reproducible_for_every_layer_compression(tmp_path, media_type):
    data = blobs(LAYERS, media_type)
    a, b_, c = tmp_path / "a.sqfs", tmp_path / "b.sqfs", tmp_path / "c.sqfs"
    st = squash_layers(streams(data, media_type), a, SquashOptions(jobs=1))
    squash_layers(streams(data, media_type), b_, SquashOptions(jobs=1))
    squash_layers(streams(data, media_type), c, SquashOptions(jobs=2))
    assert filecmp.cmp(a, b_, shallow=False) and filecmp.cmp(a, c, shallow=False)
    assert st.entries == 6 and st.layers == 2
    if os.geteuid() == 0:
        t = tree_of(a)
        assert set(t) == {b"", b"usr", b"usr/bin", b"usr/bin/tool", b"usr/bin/alias",
                          b"usr/lib.so", b"lnk"}


def test_options_change_the_image(tmp_path):
    data = blobs(LAYERS, OCI_TAR)
    sizes = {}
    for comp in ("zstd", "gzip", "xz", "lz4"):
        out = tmp_path / f"{comp}.sqfs"
        squash_layers(streams(data, OCI_TAR), out, SquashOptions(compression=comp, block_size=65536))
        sizes[comp] = out.stat().st_size
        res = subprocess.run(["unsquashfs", "-s", str(out)], capture_output=True, text=True)
        assert f"Compression {comp}" in res.stdout and "Block size 65536" in res.stdout
    assert len(sizes) == 4


# -- failures leave nothing behind --------------------------------------------

def test_corrupt_gzip_layer_leaves_no_file(tmp_path):
    good, bad = blobs(LAYERS, OCI_LAYER_GZIP)
    bad = bad[:len(bad) // 2]
    out = tmp_path / "out.sqfs"
    with pytest.raises(CorruptLayer):
        squash_layers(streams([good, bad], OCI_LAYER_GZIP), out)
    assert not out.exists()


def test_truncated_zstd_layer_leaves_no_file(tmp_path):
    good, bad = blobs(LAYERS, OCI_LAYER_ZSTD)
    out = tmp_path / "out.sqfs"
    with pytest.raises(CorruptLayer, match="truncated"):
        squash_layers(streams([good, bad[:-3]], OCI_LAYER_ZSTD), out)
    assert not out.exists()


def test_unsupported_media_type_leaves_no_file(tmp_path):
    out = tmp_path / "out.sqfs"

    def layers():
        yield open_layer(io.BytesIO(b""), "application/vnd.oci.image.layer.v1.tar+bzip2")

    with pytest.raises(UnsupportedMediaType):
        squash_layers(layers(), out)
    assert not out.exists()


def test_decompression_bomb(tmp_path):
    bomb = gzip.compress(layer_tar([E("zeros", data=b"\0" * (32 << 20))]))
    assert len(bomb) < 100_000
    out = tmp_path / "out.sqfs"
    with pytest.raises(LimitExceeded, match="decompression bomb"):
        squash_layers(streams([bomb], OCI_LAYER_GZIP, max_bytes=4 << 20), out)
    assert not out.exists()
    with pytest.raises(LimitExceeded):
        squash_layers(streams([bomb], OCI_LAYER_GZIP), out,
                      limits=FlattenLimits(max_input_bytes=4 << 20))
    assert not out.exists()


@root_only
def test_disk_full_raises_nospace_and_removes_the_partial_file(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        layer = [E(f"f{i}", data=os.urandom(200_000)) for i in range(40)]  # incompressible 8 MB
        out = mnt / "out.sqfs"
        with pytest.raises(NoSpace, match="no space"):
            squash_layers([io.BytesIO(layer_tar(layer))], out, SquashOptions(jobs=2))
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_writer_failure_is_squash_error(tmp_path):
    out = tmp_path / "missing-dir" / "out.sqfs"
    with pytest.raises(SquashError):
        squash_layers([io.BytesIO(layer_tar([E("a", data=b"a")]))], out)
    assert not out.exists()
    # A broken tar from the caller: the tool's own complaint comes back.
    with pytest.raises(SquashError, match="tar2sqfs failed"):
        with SquashFSWriter(tmp_path / "x.sqfs") as w:
            w.stdin.write(b"\x01" * 4096)
    assert not (tmp_path / "x.sqfs").exists()


def test_exception_in_block_kills_writer_and_removes_file(tmp_path):
    out = tmp_path / "x.sqfs"
    with pytest.raises(RuntimeError):
        with SquashFSWriter(out) as w:
            w.stdin.write(layer_tar([E("a", data=b"a" * 100_000)])[:50_000])
            raise RuntimeError("boom")
    assert w.proc.returncode is not None and not out.exists()


# -- against umoci ------------------------------------------------------------

# Layers bottom-first as in a manifest, exercising the changeset rules.
UMOCI_LAYERS = [
    [
        E("etc", **D), E("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
        E("etc/gone", data=b"whited out"), E("etc/dir-gone", **D), E("etc/dir-gone/f", data=b"f"),
        E("opq", **D), E("opq/old", data=b"old"), E("opq/olddir", **D), E("opq/olddir/o", data=b"o"),
        E("f2d", data=b"file becomes dir"),
        E("d2f", **D), E("d2f/child", data=b"child"),
        E("usr", **D), E("usr/bin", **D),
        E("usr/bin/su", data=b"#!/bin/su", mode=0o4755),
        E("usr/bin/wall", data=b"#!/bin/wall", mode=0o2755, gid=5),
        E("usr/bin/python3.11", data=os.urandom(70_000), mode=0o755, mtime=1600000000),
        E("usr/bin/python3", kind="hardlink", linkname="usr/bin/python3.11"),
        E("usr/bin/py", kind="symlink", linkname="python3"),
        E("tmp", kind="dir", mode=0o1777),
        E("home", **D), E("home/u", kind="dir", mode=0o700, uid=1000, gid=1000),
        E("home/u/.profile", data=b"export X=1\n", mode=0o600, uid=1000, gid=1000, mtime=1500000000),
        E("dev", **D), E("dev/null", kind="char", devmajor=1, devminor=3, mode=0o666),
        E("dev/loop0", kind="block", devmajor=7, devminor=0, mode=0o660, gid=6),
        E("run", **D), E("run/fifo", kind="fifo", mode=0o620),
        E("xattr", data=b"x", xattrs={"user.mime_type": "text/plain"}),
        E("lib", kind="symlink", linkname="usr/lib"),
        E("usr/lib", **D), E("usr/lib/libc.so", data=b"libc" * 1000),
    ],
    [
        E("etc/.wh.gone"), E("etc/.wh.dir-gone"),
        E("opq", kind="dir", mode=0o750), E("opq/.wh..wh..opq"), E("opq/new", data=b"new"),
        E("f2d", kind="dir", mode=0o755), E("f2d/inside", data=b"inside"),
        E("d2f", data=b"dir became file"),
        E("usr/bin/python", kind="hardlink", linkname="usr/bin/python3.11"),  # lower target
        E("etc/passwd", data=b"root:x:0:0::/root:/bin/bash\nu:x:1000:1000::/home/u:/bin/sh\n"),
        E("home/u", kind="dir", mode=0o750, uid=1000, gid=1000),
    ],
    [
        E("usr/bin/.wh.su"),
        E("tmp/.wh..wh..opq"),
        E("usr/lib/libc.so", data=b"new libc" * 1000, mtime=1700000001),
        E("etc/hosts", data=b"127.0.0.1 localhost\n"),
        E("etc/hosts.link", kind="hardlink", linkname="etc/hosts"),
    ],
]


def write_oci_layout(path, layers_bottom_first, tag="t"):
    """An OCI image layout umoci can unpack (gzip layers); its layer blobs, bottom-first."""
    return write_layout(path, layers_bottom_first, tag=tag).layers


@root_only
@pytest.mark.skipif(not shutil.which("umoci"), reason="umoci not installed")
def test_same_tree_as_umoci(tmp_path):
    layout = tmp_path / "layout"
    gz = write_oci_layout(layout, UMOCI_LAYERS)
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:t", str(bundle)], check=True,
                   capture_output=True)
    expected = walk(bundle / "rootfs")

    out = tmp_path / "image.sqfs"
    stats = squash_layers(streams(reversed(gz), OCI_LAYER_GZIP), out)
    assert not stats.warnings
    got = tree_of(out)

    del expected[b""], got[b""]
    assert set(got) == set(expected)
    # The rules were exercised, not vacuously equal.
    assert len(got) == 29
    for hidden in (b"usr/bin/su", b"etc/gone", b"etc/dir-gone", b"opq/old", b"opq/olddir",
                   b"d2f/child"):
        assert hidden not in got
    assert got[b"f2d"].kind == "dir" and got[b"d2f"].kind == "file"
    assert {got[p].kind for p in (b"dev/null", b"dev/loop0", b"run/fifo")} == {"char", "block",
                                                                              "fifo"}
    for path, want in expected.items():
        have = got[path]
        fields = ("kind", "mode", "uid", "gid", "sha256", "target", "rdev")
        assert [getattr(have, f) for f in fields] == [getattr(want, f) for f in fields], path
        if want.kind == "file":
            assert have.mtime == want.mtime, path
            assert have.xattrs == {k: v for k, v in want.xattrs.items()
                                   if k.startswith("user.")}, path
    assert hardlink_groups(got) == hardlink_groups(expected)
    assert hardlink_groups(got) == {
        frozenset({b"usr/bin/python3.11", b"usr/bin/python3", b"usr/bin/python"}),
        frozenset({b"etc/hosts", b"etc/hosts.link"})}
