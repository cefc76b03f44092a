"""An OCI image-layout directory (image-spec layout.md) as an Image.

    oci-layout            {"imageLayoutVersion": "1.0.0"}
    index.json            an image index: the images of the layout
    blobs/sha256/<hex>    every manifest, config and layer, named by digest

The image is chosen by tag (the `org.opencontainers.image.ref.name`
annotation of an index.json entry), else the only entry, else index.json
is itself the index to choose a platform from. From there it is resolved
exactly as an image in a registry is (registry/manifest.py: the same
manifest checks, platform choice and config checks), and every blob is
verified against its digest as it is read. Blob paths are made from
validated digests only, and files are opened without following a final
symlink, so no name in the layout points outside it.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import BinaryIO, Optional

from .digests import VerifyingReader
from .errors import LimitExceeded, NotFound, RegistryProtocolError
from .image import Image, OnBytes, OnRetry
from .reference import Reference
from .registry.manifest import (MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, Descriptor, Manifest,
                                parse_manifest, resolve_image)
from .registry.platform import Platform

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
REF_NAME = "org.opencontainers.image.ref.name"
#: the domain of a layout image's Reference (it names no registry; used in messages)
LAYOUT_DOMAIN = "oci-layout"
_REPO_NAME = re.compile(r"[^a-z0-9._-]+")


def _open(path: Path, what: str) -> BinaryIO:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"{what} is missing ({path})") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RegistryProtocolError(f"{what} is a symbolic link ({path})") from None
        raise
    return os.fdopen(fd, "rb")


def _read_small(path: Path, limit: int, what: str) -> bytes:
    with _open(path, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise LimitExceeded(f"{what} is over the {limit} byte limit")
    return data


class LayoutImage(Image):
    """One image (one platform) of an OCI image-layout directory."""

    def __init__(self, root, tag: Optional[str] = None, platform: Optional[Platform] = None):
        self.root = Path(root)
        self._check_layout()
        name = _REPO_NAME.sub("-", self.root.resolve().name.lower()).strip("-._") or "image"
        ref = Reference(LAYOUT_DOMAIN, name, tag=tag)
        raw = _read_small(self.root / INDEX_FILE, MAX_MANIFEST_SIZE, f"{INDEX_FILE} of {self.root}")
        index = parse_manifest(ref, raw)
        if not index.is_index:
            raise RegistryProtocolError(f"{INDEX_FILE} of {self.root} is not an image index")
        entry = self._entry(index, tag)
        top = index if entry is None else self._manifest(ref.with_digest(entry.digest), entry)
        super().__init__(resolve_image(ref, top, self._manifest, self._config, platform))

    def _check_layout(self) -> None:
        raw = _read_small(self.root / LAYOUT_FILE, 4096, f"{LAYOUT_FILE} of {self.root}")
        try:
            version = json.loads(raw).get("imageLayoutVersion")
        except (ValueError, AttributeError):
            version = None
        if not isinstance(version, str) or not version.startswith("1."):
            raise RegistryProtocolError(f"{self.root} is not an OCI image layout (its "
                                        f"{LAYOUT_FILE} names no version 1.x)")

    def _entry(self, index: Manifest, tag: Optional[str]) -> Optional[Descriptor]:
        """The index.json entry for tag; the only entry; or None: choose by platform."""
        entries = index.manifests
        if tag is not None:
            for d in entries:
                if d.annotations.get(REF_NAME) == tag:
                    return d
            raise NotFound(f"no image tagged {tag!r} in the layout {self.root}")
        if len(entries) == 1:
            return entries[0]
        return None

    def blob_path(self, digest: str) -> Path:
        algorithm, hexpart = digest.split(":", 1)
        return self.root / "blobs" / algorithm / hexpart

    def _manifest(self, ref: Reference, expected: Descriptor) -> Manifest:
        raw = _read_small(self.blob_path(expected.digest), MAX_MANIFEST_SIZE,
                          f"manifest {expected.digest} of {self.root}")
        return parse_manifest(ref, raw, "", None, expected)

    def _config(self, ref: Reference, descriptor: Descriptor) -> bytes:
        if descriptor.size > MAX_CONFIG_SIZE:
            raise LimitExceeded(f"config {descriptor.digest} of {self.root} is "
                                f"{descriptor.size} bytes, over the {MAX_CONFIG_SIZE} byte limit")
        with self.open_blob(descriptor) as f:
            return f.read()

    def open_blob(self, descriptor: Descriptor, *, on_bytes: OnBytes = None,
                  on_retry: OnRetry = None) -> BinaryIO:
        f = _open(self.blob_path(descriptor.digest), f"blob {descriptor.digest} of the layout "
                  f"{self.root}")
        return VerifyingReader(f, descriptor.digest, descriptor.size,  # type: ignore
                               name=f"blob {descriptor.digest} of {self.root}",
                               on_bytes=on_bytes)
