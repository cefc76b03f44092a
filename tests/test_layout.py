"""OCI image-layout directories as images (layout.py), and the image interface they share
with registries (image.py): resolution, verification, conversion, monolithic download.
Only the last test needs a registry (the one conftest starts); none needs root but the
one marked so."""

import io
import json
import os

import pytest

from fstree import names, tree_of
from ocibuild import OCI_INDEX, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Built, Entry as E, sha256
from ocibuild import Pusher, write_layout
from ociimage import monolithic
from ociimage.convert import PullOptions, convert_image
from ociimage.errors import DigestMismatch, NotFound, PlatformNotFound, RegistryProtocolError
from ociimage.image import RegistryImage, flatten_image
from ociimage.layout import LayoutImage
from ociimage.reference import parse_reference
from ociimage.registry import mediatypes as mt
from ociimage.registry.client import RegistryClient
from ociimage.registry.platform import Platform
from tartree import tree_of_tar

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="loop-mounting needs root")
LAYERS = [[E("etc", kind="dir", mode=0o755), E("etc/a", data=b"a"), E("etc/b", data=b"b")],
          [E("etc/.wh.a"), E("etc/c", data=b"c")]]


def put(layout, data: bytes) -> str:
    digest = sha256(data)
    (layout / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
    return digest


def flat_names(image):
    out = io.BytesIO()
    flatten_image(image, out)
    return names(tree_of_tar(out.getvalue()))


def test_tagged_image_resolves_and_flattens(tmp_path):
    built = write_layout(tmp_path / "app", LAYERS, tag="v1", config={"Cmd": ["/bin/true"]})
    image = LayoutImage(tmp_path / "app", tag="v1")
    assert image.digest == sha256(built.manifest)
    assert image.reference.familiar() == f"oci-layout/app:v1@{image.digest}"
    assert image.config["config"]["Cmd"] == ["/bin/true"]
    assert [l.digest for l in image.layers()] == [sha256(b) for b in built.layers]
    assert {l.media_type for l in image.layers()} == {OCI_LAYER_GZIP}
    assert flat_names(image) == {b"etc", b"etc/b", b"etc/c"}
    with pytest.raises(NotFound, match="no image tagged 'v2'"):
        LayoutImage(tmp_path / "app", tag="v2")


def test_untagged_single_entry_and_zstd_layers(tmp_path):
    write_layout(tmp_path / "z", LAYERS, tag=None, layer_media_type=OCI_LAYER_ZSTD)
    image = LayoutImage(tmp_path / "z")
    assert {l.media_type for l in image.layers()} == {OCI_LAYER_ZSTD}
    assert flat_names(image) == {b"etc", b"etc/b", b"etc/c"}


def test_platform_is_chosen_from_a_nested_index(tmp_path):
    layout = tmp_path / "multi"
    write_layout(layout, [[E("amd", data=b"x")]], tag=None, architecture="amd64")
    arm = Built.of([[E("arm", data=b"y")]], architecture="arm64")
    for blob in [arm.config, arm.manifest] + arm.layers:
        put(layout, blob)
    amd_entry = json.loads((layout / "index.json").read_text())["manifests"][0]
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        dict(amd_entry, platform={"os": "linux", "architecture": "amd64"}),
        {"mediaType": arm.manifest_type, "digest": sha256(arm.manifest),
         "size": len(arm.manifest), "platform": {"os": "linux", "architecture": "arm64"}},
    ]}).encode()
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_INDEX, "digest": put(layout, index), "size": len(index),
         "annotations": {"org.opencontainers.image.ref.name": "multi"}}]}))
    got = LayoutImage(layout, tag="multi", platform=Platform("linux", "arm64"))
    assert got.digest == sha256(arm.manifest) and got.index_digest == sha256(index)
    assert flat_names(got) == {b"arm"}
    assert flat_names(LayoutImage(layout, tag="multi", platform=Platform("linux", "amd64"))) \
        == {b"amd"}
    with pytest.raises(PlatformNotFound, match="linux/amd64, linux/arm64"):
        LayoutImage(layout, tag="multi", platform=Platform("linux", "s390x"))


def test_a_tampered_layer_fails_its_digest_check(tmp_path):
    built = write_layout(tmp_path / "t", LAYERS)
    blob = tmp_path / "t" / "blobs" / "sha256" / sha256(built.layers[0]).split(":")[1]
    data = bytearray(blob.read_bytes())
    data[-9] ^= 0xFF  # in the gzip trailer's CRC: decompresses, but is not the blob
    blob.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch, match="content digest is"):
        flatten_image(LayoutImage(tmp_path / "t"), io.BytesIO())


def test_a_manifest_that_is_not_what_the_index_names(tmp_path):
    built = write_layout(tmp_path / "m", LAYERS)
    path = tmp_path / "m" / "blobs" / "sha256" / sha256(built.manifest).split(":")[1]
    path.write_bytes(built.manifest.replace(b'"schemaVersion": 2', b'"schemaVersion":  2'))
    with pytest.raises(DigestMismatch):
        LayoutImage(tmp_path / "m")


def test_missing_and_symlinked_blobs_and_what_is_not_a_layout(tmp_path):
    built = write_layout(tmp_path / "l", LAYERS)
    blobs = tmp_path / "l" / "blobs" / "sha256"
    layer = blobs / sha256(built.layers[1]).split(":")[1]
    layer.unlink()
    with pytest.raises(NotFound, match="is missing"):
        flatten_image(LayoutImage(tmp_path / "l"), io.BytesIO())
    (tmp_path / "outside").write_bytes(built.layers[1])
    layer.symlink_to(tmp_path / "outside")
    with pytest.raises(RegistryProtocolError, match="symbolic link"):
        flatten_image(LayoutImage(tmp_path / "l"), io.BytesIO())
    (tmp_path / "l" / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    with pytest.raises(RegistryProtocolError, match="not an OCI image layout"):
        LayoutImage(tmp_path / "l")
    with pytest.raises(NotFound, match="oci-layout"):
        LayoutImage(tmp_path)


def test_conversion_takes_a_layout_image(tmp_path):
    """convert.py's pipeline (spooled parallel downloads, inflaters, tar2sqfs) on a layout."""
    write_layout(tmp_path / "c", LAYERS)
    image = LayoutImage(tmp_path / "c")
    out = tmp_path / "c.sqfs"
    meta = convert_image(image, out, PullOptions())
    assert meta["manifest_digest"] == image.digest
    assert meta["layers"] == [{"digest": l.digest, "size": l.size, "mediaType": l.media_type}
                              for l in image.layers()]
    assert meta["entries"] == 3
    assert out.read_bytes()[:4] == monolithic.SQUASHFS_MAGIC
    assert not list(tmp_path.glob("c.sqfs.layer*"))  # spool files removed


@root_only
def test_converted_layout_mounts_as_the_flattened_tree(tmp_path):
    write_layout(tmp_path / "c", LAYERS)
    image = LayoutImage(tmp_path / "c")
    convert_image(image, tmp_path / "c.sqfs", PullOptions())
    assert names(tree_of(tmp_path / "c.sqfs")) == flat_names(image) == {b"etc", b"etc/b",
                                                                        b"etc/c"}


def test_monolithic_download_takes_a_layout_layer(tmp_path):
    write_layout(tmp_path / "src", LAYERS)
    sqfs = tmp_path / "src.sqfs"
    convert_image(LayoutImage(tmp_path / "src"), sqfs, PullOptions())
    layout = tmp_path / "mono"
    write_layout(layout, [[]])
    blob = sqfs.read_bytes()
    digest = put(layout, blob)
    idx = json.loads((layout / "index.json").read_text())
    man = json.loads((layout / "blobs" / "sha256" / idx["manifests"][0]["digest"][7:]).read_text())
    man["layers"] = [{"mediaType": mt.SQUASHFS_LAYER, "digest": digest, "size": len(blob)}]
    raw = json.dumps(man).encode()
    idx["manifests"][0].update(digest=put(layout, raw), size=len(raw))
    (layout / "index.json").write_text(json.dumps(idx))
    image = LayoutImage(layout)
    assert monolithic.is_monolithic(image.manifest)
    out = tmp_path / "fetched.sqfs"
    monolithic.download_squashfs(image.layers()[0], out)
    assert out.read_bytes() == blob


def test_a_registry_image_and_a_layout_of_the_same_layers_flatten_alike(tmp_path, registry):
    """Both Image implementations through one flatten: byte-identical tar streams."""
    pushed = Pusher(registry.url).image("layout/same", "v1", LAYERS)
    with RegistryClient(backoff=0.01) as client:
        remote = RegistryImage.resolve(client, parse_reference(f"{registry.host}/layout/same:v1"),
                                       Platform("linux", "amd64"))
        from_registry = io.BytesIO()
        flatten_image(remote, from_registry)
    write_layout(tmp_path / "same", LAYERS)
    local = LayoutImage(tmp_path / "same")
    from_layout = io.BytesIO()
    flatten_image(local, from_layout)
    assert remote.digest == local.digest == pushed.manifest_digest
    assert names(tree_of_tar(from_registry.getvalue())) == {b"etc", b"etc/b", b"etc/c"}
    assert from_registry.getvalue() == from_layout.getvalue()
