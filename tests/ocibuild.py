"""Craft OCI images in test code and push them to a test registry.

Used where a layer must contain something real tools will not produce
(whiteouts in odd places, hostile names, hardlinks across layers). Pushing
uses the plain Distribution Spec upload (POST + PUT) with requests so the
test does not depend on the code under test.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import requests

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Entry:
    """One tar member. kind: file, dir, symlink, hardlink, char, block, fifo."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 1700000000
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Dict[str, str] = field(default_factory=dict)


_TYPES = {
    "file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE, "char": tarfile.CHRTYPE, "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def layer_tar(entries: Sequence[Entry]) -> bytes:
    """An uncompressed PAX tar with exactly these members, in this order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = _TYPES[e.kind]
            ti.mode = e.mode
            ti.uid, ti.gid = e.uid, e.gid
            ti.mtime = e.mtime
            ti.linkname = e.linkname
            ti.devmajor, ti.devminor = e.devmajor, e.devminor
            if e.xattrs:
                ti.pax_headers = {"SCHILY.xattr." + k: v for k, v in e.xattrs.items()}
            if e.kind == "file":
                ti.size = len(e.data)
                tf.addfile(ti, io.BytesIO(e.data))
            else:
                tf.addfile(ti)
    return buf.getvalue()


def compress(tar: bytes, media_type: str) -> bytes:
    if media_type.endswith("gzip"):
        return gzip.compress(tar, mtime=0)
    if media_type.endswith("zstd"):
        import zstandard
        return zstandard.ZstdCompressor().compress(tar)
    return tar


@dataclass
class Built:
    """The blobs of one image: config, layers (bottom-first) and manifest."""

    config: bytes
    layers: List[bytes]
    manifest: bytes
    manifest_type: str

    @property
    def manifest_json(self) -> dict:
        return json.loads(self.manifest)

    @classmethod
    def of(cls, layers: Sequence[Sequence[Entry]], layer_media_type: str = OCI_LAYER_GZIP,
           config: Optional[dict] = None, docker: bool = False, architecture: str = "amd64",
           os_: str = "linux") -> "Built":
        blobs, diff_ids = [], []
        for entries in layers:
            tar = layer_tar(entries)
            diff_ids.append(sha256(tar))
            blobs.append(compress(tar, layer_media_type))
        cfg = {
            "architecture": architecture, "os": os_,
            "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                       "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
        if config:
            cfg["config"].update(config)
        cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                       "digest": sha256(cfg_bytes), "size": len(cfg_bytes)},
            "layers": [{"mediaType": DOCKER_LAYER_GZIP if docker else layer_media_type,
                        "digest": sha256(b), "size": len(b)} for b in blobs],
        }
        return cls(cfg_bytes, blobs, json.dumps(manifest, sort_keys=True).encode(),
                   DOCKER_MANIFEST if docker else OCI_MANIFEST)


def write_layout(path, layers: Sequence[Sequence[Entry]], *, tag: Optional[str] = "t",
                 layer_media_type: str = OCI_LAYER_GZIP, **kw) -> Built:
    """An OCI image-layout directory holding one image (layers bottom-first), tagged tag."""
    img = Built.of(layers, layer_media_type, **kw)
    blobdir = path / "blobs" / "sha256"
    blobdir.mkdir(parents=True)
    for blob in [img.config, img.manifest] + img.layers:
        (blobdir / sha256(blob).split(":", 1)[1]).write_bytes(blob)
    entry = {"mediaType": img.manifest_type, "digest": sha256(img.manifest),
             "size": len(img.manifest)}
    if tag is not None:
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (path / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return img


@dataclass
class Pushed:
    repository: str
    tag: Optional[str]
    manifest_digest: str
    manifest: dict
    config_digest: str
    layer_digests: List[str]


class Pusher:
    def __init__(self, registry_url: str, auth=None):
        self.url = registry_url.rstrip("/")
        self.s = requests.Session()
        if auth:
            self.s.auth = auth

    def blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        if self.s.head(f"{self.url}/v2/{repo}/blobs/{digest}").status_code == 200:
            return digest
        r = self.s.post(f"{self.url}/v2/{repo}/blobs/uploads/")
        r.raise_for_status()
        loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = self.url + loc
        sep = "&" if "?" in loc else "?"
        r = self.s.put(f"{loc}{sep}digest={digest}", data=data,
                       headers={"Content-Type": "application/octet-stream"})
        r.raise_for_status()
        return digest

    def manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        r = self.s.put(f"{self.url}/v2/{repo}/manifests/{ref}", data=body,
                       headers={"Content-Type": media_type})
        r.raise_for_status()
        return sha256(body)

    def image(self, repo: str, tag: Optional[str], layers: Sequence[Sequence[Entry]],
              layer_media_type: str = OCI_LAYER_GZIP, config: Optional[dict] = None,
              docker: bool = False, architecture: str = "amd64", os_: str = "linux") -> Pushed:
        """Push an image whose layers are given bottom-first, as in a manifest."""
        img = Built.of(layers, layer_media_type, config, docker, architecture, os_)
        cfg_digest = self.blob(repo, img.config)
        layer_digests = [self.blob(repo, b) for b in img.layers]
        digest = self.manifest(repo, tag or sha256(img.manifest), img.manifest,
                               img.manifest_type)
        return Pushed(repo, tag, digest, img.manifest_json, cfg_digest, layer_digests)

    def index(self, repo: str, tag: str, images: Sequence[Pushed], platforms: Sequence[dict],
              docker: bool = False) -> str:
        mt = DOCKER_MANIFEST if docker else OCI_MANIFEST
        idx = {
            "schemaVersion": 2,
            "mediaType": DOCKER_LIST if docker else OCI_INDEX,
            "manifests": [
                {"mediaType": mt, "digest": img.manifest_digest,
                 "size": len(json.dumps(img.manifest, sort_keys=True).encode()), "platform": plat}
                for img, plat in zip(images, platforms)
            ],
        }
        body = json.dumps(idx, sort_keys=True).encode()
        return self.manifest(repo, tag, body, DOCKER_LIST if docker else OCI_INDEX)
