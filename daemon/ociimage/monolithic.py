"""Monolithic images: an OCI image whose one layer is the flattened SquashFS.

Publish pushes a cached SquashFS as such an image, pointing at the image it
was made from with `subject`, so any site can find it from the source digest
through the referrers API or, on registries without it (Docker Distribution
2.8), the fallback tag `sha256-<hex>` that publish maintains. Pulling one
downloads the SquashFS straight into the cache, digest verified, and only
from registries/repositories the admin trusts: the kernel parses a SquashFS
when it mounts it, so a file made elsewhere is attack surface.

Formats (docs/monolithic.md):

* manifest: OCI image manifest, `artifactType` = layer type = SQUASHFS_LAYER,
  config = the source image's OCI config with rootfs.diff_ids = [squashfs
  digest] and one history entry, `subject` = the source manifest descriptor,
  annotations under ANNOTATION_PREFIX plus org.opencontainers.image.base.*.
* fallback tag: `<alg>-<hex>` of the source digest, an OCI image index whose
  entries are the referrers (other tools' referrers are kept).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from . import __version__
from .errors import AccessDenied, CorruptLayer, InvalidArgument, NotFound, OciImageError
from .progress import FETCH, RETRY, ProgressEvent, Reporter, silent
from .reference import DEFAULT_DOMAIN, Reference, parse_reference  # noqa: F401 (re-export)
from .registry import mediatypes as mt
from .image import Image, Layer, registry_layer
from .registry.client import Descriptor, Manifest, RegistryClient

log = logging.getLogger("ociimage.monolithic")

ANNOTATION_PREFIX = "org.slurm-oci-image."
A_SOURCE_REF = ANNOTATION_PREFIX + "source.ref"
A_SOURCE_DIGEST = ANNOTATION_PREFIX + "source.digest"
A_SOURCE_INDEX = ANNOTATION_PREFIX + "source.index-digest"
A_CONVERTER = ANNOTATION_PREFIX + "converter.version"
A_WRITER = ANNOTATION_PREFIX + "converter.writer"
A_COMPRESSION = ANNOTATION_PREFIX + "compression"
A_LEVEL = ANNOTATION_PREFIX + "compression.level"
A_BLOCK_SIZE = ANNOTATION_PREFIX + "block-size"
OCI_BASE_NAME = "org.opencontainers.image.base.name"
OCI_BASE_DIGEST = "org.opencontainers.image.base.digest"

SQUASHFS_MAGIC = b"hsqs"
_SUPERBLOCK = 96


# ---- trust -----------------------------------------------------------------

def _norm_domain(domain: str) -> str:
    d = domain.strip().lower()
    if d in ("index.docker.io", "registry-1.docker.io"):
        return DEFAULT_DOMAIN
    return d


class Trust:
    """[registries] trusted_squashfs: `host[:port]` or `host[:port]/repo-prefix` entries.

    A prefix matches whole path components: `reg/hpc` trusts `reg/hpc` and
    `reg/hpc/solver`, not `reg/hpc-old`.
    """

    def __init__(self, entries: Sequence[str] = (), implicit: Sequence[str] = ()):
        self.rules = []
        for e in list(entries) + list(implicit):
            e = e.strip()
            for scheme in ("https://", "http://"):
                if e.lower().startswith(scheme):
                    e = e[len(scheme):]
            e = e.strip("/")
            if not e:
                continue
            domain, _, prefix = e.partition("/")
            self.rules.append((_norm_domain(domain), prefix.strip("/")))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def allows(self, domain: str, path: str) -> bool:
        domain = _norm_domain(domain)
        for d, prefix in self.rules:
            if d != domain:
                continue
            if not prefix or path == prefix or path.startswith(prefix + "/"):
                return True
        return False


def untrusted_error(ref: Reference, manifest: Optional[Manifest] = None) -> AccessDenied:
    source = ""
    if manifest is not None:
        src = (manifest.data.get("annotations") or {}).get(A_SOURCE_REF)
        if isinstance(src, str) and src:
            source = f" (it was made from {src[:200]}: run that instead)"
    return AccessDenied(f"{ref.familiar()} is a ready-to-mount SquashFS image from "
                        f"{ref.domain}/{ref.path}, which this site does not trust for SquashFS "
                        f"images ([registries] trusted_squashfs); it cannot be converted "
                        f"either{source}")


# ---- recognising and fetching ----------------------------------------------

def is_monolithic(manifest: Manifest) -> bool:
    """An image manifest whose only layer is a SquashFS."""
    if manifest.is_index:
        return False
    layers = manifest.data.get("layers")
    return (isinstance(layers, list) and len(layers) == 1 and isinstance(layers[0], dict)
            and layers[0].get("mediaType") == mt.SQUASHFS_LAYER)


def check_squashfs(path: Path, what: str) -> None:
    """The file starts with a SquashFS superblock that fits in it (magic 'hsqs')."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_SUPERBLOCK)
    if len(head) < _SUPERBLOCK or head[:4] != SQUASHFS_MAGIC:
        raise CorruptLayer(f"{what} is not a SquashFS image (no 'hsqs' superblock)")
    bytes_used = struct.unpack_from("<Q", head, 40)[0]
    if bytes_used > size:
        raise CorruptLayer(f"{what} is a truncated SquashFS image ({size} bytes, its "
                           f"superblock says {bytes_used})")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 << 20)
            if not b:
                return "sha256:" + h.hexdigest()
            h.update(b)


#: while a SquashFS downloads, a FETCH event at most this often (on_bytes fires for every
#: read of the verifying stream: thousands a second on a fast link) and at least whenever
#: bytes arrived after it: the step client and the nodes waiting for this one show them live
FETCH_EVERY = 0.25


def download_squashfs(layer: Layer, out: Path, report: Reporter = silent,
                      clock: Callable[[], float] = time.monotonic) -> None:
    """Stream the SquashFS blob into out; digest and size verified, then the magic.

    Progress: FETCH events (current, total = the blob's size) from the first byte to the
    last, throttled to one per FETCH_EVERY seconds, and RETRY events when the download
    resumes after trouble.
    """
    if layer.media_type != mt.SQUASHFS_LAYER:
        raise CorruptLayer(f"{layer.source}: layer {layer.digest} is {layer.media_type}, "
                           f"not a SquashFS")
    done = [0]
    last = [clock()]

    def on_bytes(n: int) -> None:
        done[0] += n
        now = clock()
        if now - last[0] >= FETCH_EVERY or done[0] >= layer.size:
            last[0] = now
            report(ProgressEvent(FETCH, current=done[0], total=layer.size))

    def on_retry(message: str) -> None:
        report(ProgressEvent(RETRY, message=message, current=done[0], total=layer.size))

    report(ProgressEvent(FETCH, current=0, total=layer.size,
                         message="downloading the ready-to-mount image"))
    with layer.open(on_bytes=on_bytes, on_retry=on_retry) as src, open(out, "wb") as f:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break  # EOF: the VerifyingReader has checked size and digest
            f.write(chunk)
    check_squashfs(out, f"layer {layer.digest} of {layer.source}")


def annotations_of(manifest: Manifest) -> dict:
    a = manifest.data.get("annotations")
    return {k: v for k, v in a.items() if isinstance(v, str)} if isinstance(a, dict) else {}


def converter_from_annotations(annotations: dict) -> dict:
    out = {"name": "slurm-oci-image"}
    for key, name in ((A_CONVERTER, "version"), (A_WRITER, "writer"),
                      (A_COMPRESSION, "compression")):
        if annotations.get(key):
            out[name] = annotations[key]
    for key, name in ((A_LEVEL, "level"), (A_BLOCK_SIZE, "block_size")):
        v = annotations.get(key, "")
        if v.isdigit():
            out[name] = int(v)
    return out


# ---- discovery -------------------------------------------------------------

def fallback_tag(digest: str) -> str:
    """The referrers tag schema of the distribution spec: `<alg>-<ref>`, at most 128 chars."""
    alg, _, hexpart = digest.partition(":")
    return f"{alg}-{hexpart}"[:128]


def repo_ref(ref: Reference, tag: Optional[str] = None) -> Reference:
    return Reference(domain=ref.domain, path=ref.path, tag=tag, digest=None)


def fallback_referrers(client: RegistryClient, repo: Reference, digest: str) -> List[Descriptor]:
    try:
        idx = client.get_manifest(repo_ref(repo, fallback_tag(digest)))
    except NotFound:
        return []
    if not idx.is_index:
        log.warning("fallback referrers tag %s:%s is not an index; ignoring it", repo.name,
                    fallback_tag(digest))
        return []
    return idx.manifests


@dataclass(frozen=True)
class Found:
    reference: Reference          # repository@monolithic manifest digest
    manifest: Manifest
    layer: Descriptor
    via: str                      # "referrers API" or "fallback tag"
    client: RegistryClient

    @property
    def annotations(self) -> dict:
        return annotations_of(self.manifest)

    def squashfs_layer(self) -> Layer:
        return registry_layer(self.client, self.reference, self.layer)


def find_monolithic(client: RegistryClient, repo: Reference, subject_digest: str) -> Optional[Found]:
    """The newest monolithic image in repo whose subject is subject_digest, verified."""
    descs = client.get_referrers(repo_ref(repo), subject_digest, mt.SQUASHFS_LAYER)
    via = "referrers API"
    if descs is None:
        descs = fallback_referrers(client, repo, subject_digest)
        via = "fallback tag"
    candidates = [d for d in descs if d.artifact_type == mt.SQUASHFS_LAYER
                  and d.media_type in mt.MANIFEST_TYPES]
    for d in reversed(candidates):  # publish appends: the last is the newest
        ref = repo_ref(repo).with_digest(d.digest)
        try:
            m = client.get_manifest(ref, accept=mt.ACCEPT_MANIFEST_ONLY, expected=d)
        except NotFound:
            continue
        subject = m.data.get("subject")
        if not is_monolithic(m) or not isinstance(subject, dict) \
                or subject.get("digest") != subject_digest:
            log.debug("referrer %s of %s is not a monolithic image of it", d.digest,
                      subject_digest)
            continue
        return Found(ref, m, m.layers[0], via, client)
    return None


# ---- publishing ------------------------------------------------------------

@dataclass(frozen=True)
class Published:
    reference: Reference      # target (tag kept) @ manifest digest
    manifest_digest: str
    squashfs_digest: str
    size: int
    blob: str                 # "uploaded", "mounted" or "exists"
    referrers: str            # "registry" (referrers API) or "fallback tag"

    def to_json(self) -> dict:
        return {"reference": str(self.reference), "digest": self.manifest_digest,
                "squashfs_digest": self.squashfs_digest, "size": self.size,
                "blob": self.blob, "referrers": self.referrers}


def parse_target(text: str) -> Reference:
    ref = parse_reference(text, default_tag=None)
    if ref.digest:
        raise InvalidArgument(f"publish target {text}: give a repository, optionally with a "
                              f"tag, not a digest")
    return ref


def _dumps(data: dict) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def build_image(source: Image, squashfs_digest: str, squashfs_size: int,
                converter: dict) -> tuple:
    """(config bytes, manifest bytes) of the monolithic form of source; deterministic."""
    cfg = copy.deepcopy(source.config) if isinstance(source.config, dict) else {}
    cfg["rootfs"] = {"type": "layers", "diff_ids": [squashfs_digest]}
    writer = converter.get("writer") or "squashfs writer"
    comp = converter.get("compression") or "?"
    cfg["history"] = [{"created_by": f"slurm-oci-image {converter.get('version', '')}: "
                                     f"{writer}, {comp} level {converter.get('level', '')}",
                       "comment": f"flattened from {source.reference}"}]
    config_raw = _dumps(cfg)
    config_digest = "sha256:" + hashlib.sha256(config_raw).hexdigest()
    annotations = {
        A_SOURCE_REF: str(source.reference),
        A_SOURCE_DIGEST: source.manifest.digest,
        A_CONVERTER: str(converter.get("version") or __version__),
        A_COMPRESSION: str(comp),
        OCI_BASE_NAME: str(source.reference),
        OCI_BASE_DIGEST: source.manifest.digest,
    }
    if source.index_digest:
        annotations[A_SOURCE_INDEX] = source.index_digest
    if converter.get("writer"):
        annotations[A_WRITER] = str(converter["writer"])
    if converter.get("level") is not None:
        annotations[A_LEVEL] = str(converter["level"])
    if converter.get("block_size") is not None:
        annotations[A_BLOCK_SIZE] = str(converter["block_size"])
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.SQUASHFS_LAYER,
        "config": {"mediaType": mt.OCI_CONFIG, "digest": config_digest, "size": len(config_raw)},
        "layers": [{"mediaType": mt.SQUASHFS_LAYER, "digest": squashfs_digest,
                    "size": squashfs_size}],
        "subject": {"mediaType": source.manifest.media_type, "digest": source.manifest.digest,
                    "size": source.manifest.size},
        "annotations": annotations,
    }
    return config_raw, _dumps(manifest)


def update_fallback_index(client: RegistryClient, repo: Reference, subject_digest: str,
                          entry: Descriptor, attempts: int = 4) -> None:
    """Read-modify-write the fallback tag's index: add entry, keep every other referrer.

    Distribution 2.8 has no conditional PUT, so a concurrent writer can
    overwrite us; read back and try again until our entry is there.
    """
    tag_ref = repo_ref(repo, fallback_tag(subject_digest))
    for _ in range(attempts):
        try:
            current = client.get_manifest(tag_ref)
            entries = list(current.data.get("manifests") or []) if current.is_index else []
        except NotFound:
            entries = []
        if any(isinstance(e, dict) and e.get("digest") == entry.digest for e in entries):
            return
        index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX,
                 "manifests": entries + [entry.to_dict()]}
        client.put_manifest(tag_ref, _dumps(index), mt.OCI_INDEX)
        check = client.get_manifest(tag_ref)
        if any(d.digest == entry.digest for d in check.manifests):
            return
        log.info("fallback tag %s changed under us; retrying", tag_ref.familiar())
    raise OciImageError(f"could not record {entry.digest} in the referrers tag "
                        f"{tag_ref.familiar()}: it keeps changing")


def publish(client: RegistryClient, sqfs: Path, source: Image, target: Reference,
            converter: dict, *, squashfs_digest: Optional[str] = None,
            mount_candidates: Sequence[Reference] = (), chunk_size: Optional[int] = None,
            on_bytes: Optional[Callable[[int], None]] = None) -> Published:
    """Push sqfs as the monolithic form of source to target (a repository, tag optional)."""
    sqfs = Path(sqfs)
    check_squashfs(sqfs, str(sqfs))
    size = sqfs.stat().st_size
    digest = squashfs_digest or file_digest(sqfs)
    mount_from: List[str] = []
    for cand in mount_candidates:
        if cand.domain != target.domain or cand.path == target.path or cand.path in mount_from:
            continue
        try:
            if client.blob_exists(repo_ref(cand), digest):
                mount_from.append(cand.path)
        except OciImageError as e:
            log.debug("cannot check %s in %s: %s", digest, cand.name, e)
    how = client.push_blob(target, sqfs, digest, size, mount_from=mount_from,
                           chunk_size=chunk_size, on_bytes=on_bytes)
    config_raw, manifest_raw = build_image(source, digest, size, converter)
    config_digest = "sha256:" + hashlib.sha256(config_raw).hexdigest()
    client.push_blob(target, config_raw, config_digest, len(config_raw))
    pushed = client.put_manifest(target, manifest_raw, mt.OCI_MANIFEST)
    if pushed.subject_processed:
        referrers = "registry"
    else:
        annotations = json.loads(manifest_raw)["annotations"]
        update_fallback_index(client, target, source.manifest.digest,
                              pushed.descriptor(artifact_type=mt.SQUASHFS_LAYER,
                                                annotations=annotations))
        referrers = "fallback tag"
    ref = target.with_digest(pushed.digest)
    log.info("published", extra={"source": str(source.reference), "target": str(ref),
                                 "blob": how, "referrers": referrers})
    return Published(ref, pushed.digest, digest, size, how, referrers)
