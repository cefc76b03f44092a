"""Media types of the OCI image spec and Docker's schema 2, and the Accept header."""

from __future__ import annotations

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
# Deprecated in the OCI spec but still found on old images (Windows base layers).
OCI_LAYER_NONDIST_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDIST_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDIST_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
# Schema 1 is recognised only to refuse it with a clear message.
DOCKER_SCHEMA1_MANIFEST = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

# One SquashFS holding the whole root filesystem; the media type SingularityCE
# uses in OCI-SIF, deliberately outside application/vnd.oci.image.layer.*.
SQUASHFS_LAYER = "application/vnd.sylabs.image.layer.v1.squashfs"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
ALL_MANIFEST_TYPES = MANIFEST_TYPES | INDEX_TYPES
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1_MANIFEST, DOCKER_SCHEMA1_SIGNED})

TAR_LAYER_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_NONDIST_TAR})
GZIP_LAYER_TYPES = frozenset({OCI_LAYER_GZIP, OCI_LAYER_NONDIST_GZIP, DOCKER_LAYER_GZIP,
                              DOCKER_LAYER_FOREIGN_GZIP})
ZSTD_LAYER_TYPES = frozenset({OCI_LAYER_ZSTD, OCI_LAYER_NONDIST_ZSTD})
LAYER_TYPES = TAR_LAYER_TYPES | GZIP_LAYER_TYPES | ZSTD_LAYER_TYPES

# Index types first: with them listed, a registry returns the multi-arch
# index when there is one, so the platform choice stays ours. Docker
# Distribution 2.8 answers 404 for an OCI manifest when its type is missing.
ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
ACCEPT_MANIFEST_ONLY = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST])


def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES


def is_manifest(media_type: str) -> bool:
    return media_type in MANIFEST_TYPES


def base_type(content_type: str) -> str:
    """'application/json; charset=utf-8' -> 'application/json'."""
    return content_type.split(";", 1)[0].strip().lower()


def is_squashfs_layer(media_type: str) -> bool:
    return media_type == SQUASHFS_LAYER
