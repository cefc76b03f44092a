"""The manifest model: descriptors, image manifests and indexes, and their checks.

Parsing is kept apart from fetching so that a manifest read from a registry
and one read from an OCI image-layout directory (layout.py) pass the same
checks: the digest asked for (or announced), the size an index promised, one
unambiguous kind (CVE-2021-41190), a supported media type, no schema 1.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

from ..digests import ALGORITHMS, is_valid_digest, validate_digest
from ..errors import (DigestMismatch, PlatformNotFound, RegistryProtocolError,
                      UnsupportedMediaType)
from ..reference import Reference
from . import mediatypes as mt
from .platform import Platform, host_platform, select_platform

log = logging.getLogger("ociimage.registry")

MAX_MANIFEST_SIZE = 4 << 20
MAX_CONFIG_SIZE = 8 << 20


def json_object(raw: bytes, bad_json: str, not_object: str) -> dict:
    """raw parsed as a JSON object, else RegistryProtocolError with the message that fits."""
    try:
        data = json.loads(raw)
    except ValueError:
        raise RegistryProtocolError(bad_json) from None
    if not isinstance(data, dict):
        raise RegistryProtocolError(not_object)
    return data


def one_line(text: str, limit: int = 200) -> str:
    """A registry's text on one line of at most limit characters (it goes into messages)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    urls: tuple = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Optional[Platform] = None
    artifact_type: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Any, where: str = "descriptor") -> "Descriptor":
        if not isinstance(d, dict):
            raise RegistryProtocolError(f"{where}: descriptor is not a JSON object")
        media_type = d.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            raise RegistryProtocolError(f"{where}: descriptor has no mediaType")
        digest = validate_digest(d.get("digest"), what=f"digest in {where}",
                                 error=RegistryProtocolError)
        size = d.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryProtocolError(f"{where}: descriptor {digest} has no valid size")
        urls = d.get("urls") or ()
        annotations = d.get("annotations") or {}
        artifact_type = d.get("artifactType")
        return cls(media_type=media_type, digest=digest, size=size,
                   urls=(tuple(u for u in urls if isinstance(u, str))
                         if isinstance(urls, list) else ()),
                   annotations=annotations if isinstance(annotations, dict) else {},
                   platform=Platform.from_dict(d.get("platform")) if "platform" in d else None,
                   artifact_type=artifact_type if isinstance(artifact_type, str) else None)

    def to_dict(self) -> dict:
        d: Dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.urls:
            d["urls"] = list(self.urls)
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform:
            d["platform"] = self.platform.to_dict()
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        return d


@dataclass(frozen=True)
class Manifest:
    media_type: str
    digest: str
    raw: bytes = field(repr=False)
    data: dict = field(repr=False)

    @property
    def is_index(self) -> bool:
        return mt.is_index(self.media_type)

    @property
    def manifests(self) -> List[Descriptor]:
        """The entries of an index (empty for an image manifest)."""
        if not self.is_index:
            return []
        return [Descriptor.from_dict(d, f"index {self.digest}") for d in self.data["manifests"]]

    @property
    def config(self) -> Descriptor:
        if self.is_index:
            raise RegistryProtocolError(f"{self.digest} is an index, not an image manifest")
        return Descriptor.from_dict(self.data["config"], f"config of manifest {self.digest}")

    @property
    def layers(self) -> List[Descriptor]:
        if self.is_index:
            raise RegistryProtocolError(f"{self.digest} is an index, not an image manifest")
        return [Descriptor.from_dict(d, f"layer of manifest {self.digest}")
                for d in self.data["layers"]]

    @property
    def size(self) -> int:
        return len(self.raw)


@dataclass(frozen=True)
class ResolvedImage:
    #: the image reference pinned to the platform manifest's digest (tag kept)
    reference: Reference
    manifest: Manifest
    #: digest of the index the manifest was chosen from, None for a single-platform image
    index_digest: Optional[str]
    config_descriptor: Descriptor
    config: dict = field(repr=False)
    layers: List[Descriptor] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return self.manifest.digest

    @property
    def platform(self) -> Platform:
        c = self.config
        return Platform(str(c.get("os", "")), str(c.get("architecture", "")),
                        c.get("variant") if isinstance(c.get("variant"), str) else None)


@dataclass(frozen=True)
class PushedManifest:
    reference: Reference
    digest: str
    size: int
    media_type: str
    #: the registry answered OCI-Subject: it indexes `subject` itself (referrers API)
    subject_processed: bool = False

    def descriptor(self, **kw) -> Descriptor:
        return Descriptor(media_type=self.media_type, digest=self.digest, size=self.size, **kw)


def parse_manifest(ref: Reference, raw: bytes, content_type: str = "",
                   header_digest: Optional[str] = None,
                   expected: Optional[Descriptor] = None) -> Manifest:
    """Check and parse the manifest or index `ref` names, as the bytes `raw`.

    ref.digest, when set, is what raw must hash to; else header_digest (a
    registry's Docker-Content-Digest), when well-formed. content_type is the
    base type it was served as ("" from a file); expected is the descriptor
    an index gave for it (size and media type must agree).
    """
    name = ref.familiar()
    if ref.digest:
        algorithm = ref.digest.split(":", 1)[0]
        actual = f"{algorithm}:{ALGORITHMS[algorithm](raw).hexdigest()}"
        if actual != ref.digest:
            raise DigestMismatch(f"manifest of {name}: content digest is {actual}, "
                                 f"expected {ref.digest}")
        digest = ref.digest
    else:
        digest = "sha256:" + ALGORITHMS["sha256"](raw).hexdigest()
        if header_digest and is_valid_digest(header_digest.strip()):
            header_digest = header_digest.strip()
            algorithm = header_digest.split(":", 1)[0]
            actual = f"{algorithm}:{ALGORITHMS[algorithm](raw).hexdigest()}"
            if actual != header_digest:
                raise DigestMismatch(f"manifest of {name}: content digest is {actual}, "
                                     f"but the registry announced {header_digest}")
        elif header_digest:
            log.debug("ignoring malformed Docker-Content-Digest for %s", name)
    if expected is not None and expected.size != len(raw):
        raise DigestMismatch(f"manifest {digest} of {name} is {len(raw)} bytes, "
                             f"the index says {expected.size}")
    data = json_object(raw, f"manifest of {name} is not valid JSON",
                       f"manifest of {name} is not a JSON object")
    if data.get("schemaVersion") == 1 or content_type in mt.SCHEMA1_TYPES:
        raise UnsupportedMediaType(f"{name} is a Docker schema 1 image, which is not "
                                   f"supported: re-push it with a current docker or podman")
    if "layers" in data and "manifests" in data:
        # CVE-2021-41190: an ambiguous document could be read as either kind
        raise RegistryProtocolError(f"manifest of {name} is ambiguous: it has both "
                                    f"'layers' and 'manifests'")
    declared = data.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise RegistryProtocolError(f"manifest of {name} has an invalid mediaType")
    specific_ct = content_type in mt.ALL_MANIFEST_TYPES or content_type.startswith(
        "application/vnd.")
    if declared and specific_ct and content_type != declared:
        raise RegistryProtocolError(f"manifest of {name} is served as {content_type} but "
                                    f"declares mediaType {declared}")
    media_type = declared or (content_type if specific_ct else "")
    if not media_type:
        if isinstance(data.get("manifests"), list):
            media_type = mt.OCI_INDEX
        elif "config" in data and "layers" in data:
            media_type = mt.OCI_MANIFEST
    if media_type not in mt.ALL_MANIFEST_TYPES:
        raise UnsupportedMediaType(f"{name} has unsupported manifest type "
                                   f"'{one_line(media_type, 100) or 'unknown'}'")
    if mt.is_index(media_type):
        if not isinstance(data.get("manifests"), list) or "config" in data:
            raise RegistryProtocolError(f"index of {name} is malformed")
    else:
        if not isinstance(data.get("config"), dict) or not isinstance(data.get("layers"), list):
            raise RegistryProtocolError(f"manifest of {name} is malformed: it needs "
                                        f"'config' and 'layers'")
    if expected is not None and expected.media_type in mt.ALL_MANIFEST_TYPES \
            and expected.media_type != media_type:
        raise RegistryProtocolError(f"manifest {digest} of {name} is {media_type}, "
                                    f"the index says {expected.media_type}")
    return Manifest(media_type=media_type, digest=digest, raw=raw, data=data)


def parse_config(raw: bytes, name: str) -> dict:
    """An image config blob as a JSON object."""
    return json_object(raw, f"config of {name} is not valid JSON",
                       f"config of {name} is not a JSON object")


def resolve_image(ref: Reference, manifest: Manifest,
                  get_child: Callable[[Reference, Descriptor], Manifest],
                  get_config: Callable[[Reference, Descriptor], bytes],
                  platform: Optional[Platform] = None) -> ResolvedImage:
    """From the manifest or index `ref` names to the image for `platform` (default: this
    host) with its config, wherever the image lives: get_child(ref pinned to the chosen
    entry, its descriptor) gives an index entry's manifest, get_config(image ref,
    config descriptor) the config blob (verified, size-limited)."""
    want = platform or host_platform()
    index_digest = None
    image_ref = ref
    if manifest.is_index:
        index_digest = manifest.digest
        candidates = []
        for desc in manifest.manifests:
            if desc.media_type in mt.MANIFEST_TYPES:
                candidates.append((desc.platform, desc))
        chosen = select_platform(want, candidates)
        image_ref = ref.with_digest(chosen.digest)
        log.debug("%s: chose %s for %s", ref.familiar(), chosen.digest, want)
        manifest = get_child(image_ref, chosen)
        if manifest.is_index:
            raise RegistryProtocolError(f"{ref.familiar()}: nested image indexes are "
                                        f"not supported")
    else:
        image_ref = ref.with_digest(manifest.digest)
    config_desc = manifest.config
    if config_desc.media_type not in mt.CONFIG_TYPES:
        raise UnsupportedMediaType(f"{ref.familiar()} is not a container image (its config "
                                   f"is {one_line(config_desc.media_type, 100)})")
    config = parse_config(get_config(image_ref, config_desc), ref.familiar())
    layers = manifest.layers
    image = ResolvedImage(reference=image_ref, manifest=manifest, index_digest=index_digest,
                          config_descriptor=config_desc, config=config, layers=layers)
    if index_digest is None and config.get("os") and config.get("architecture"):
        have = image.platform
        if not want.can_run(have):
            if platform is not None:
                raise PlatformNotFound(f"{ref.familiar()} is built for {have}, "
                                       f"not {want}; available: {have}")
            log.debug("%s is built for %s, this host is %s", ref.familiar(), have, want)
    return image
