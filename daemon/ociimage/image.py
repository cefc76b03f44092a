"""An image as the converter sees it, wherever it lives: a small interface.

go-containerregistry's pkg/v1 has one Image interface (Manifest, ConfigFile,
Layers, each layer with Digest, Size, MediaType and Compressed()) and
several places it can come from (remote, layout, tarball). This is the same
idea, as small as the converter needs: the resolved manifest and config
(registry/manifest.py's ResolvedImage) and, per layer, its descriptor and an
`open()` giving the compressed bytes, verified against the digest by the time
they are read to their end.

Two sources implement it: RegistryImage (a registry, through RegistryClient)
and LayoutImage (an OCI image-layout directory, layout.py). flatten_image()
runs flatten over any of them, so the changeset rules are tested tar to tar
from a layout, without root, a registry or a loop mount; pull.py converts
any of them (fetch.py spools its layers), and monolithic.py downloads a
SquashFS layer of any of them.
"""

from __future__ import annotations

import abc
import functools
from typing import BinaryIO, Callable, Iterator, List, Optional

from .flatten import FlattenLimits, FlattenStats, flatten
from .layers import open_layer
from .reference import Reference
from .registry.client import RegistryClient
from .registry.manifest import Descriptor, Manifest, ResolvedImage
from .registry.platform import Platform

OnBytes = Optional[Callable[[int], None]]
OnRetry = Optional[Callable[[str], None]]


Opener = Callable[..., BinaryIO]


class Layer:
    """One layer of an image: what its descriptor says, and its compressed bytes.

    opener(descriptor, on_bytes=, on_retry=) reads the blob where it lives;
    source names the image in messages.
    """

    def __init__(self, descriptor: Descriptor, opener: Opener, source: str):
        self.descriptor = descriptor
        self.source = source
        self._opener = opener

    @property
    def digest(self) -> str:
        return self.descriptor.digest

    @property
    def size(self) -> int:
        return self.descriptor.size

    @property
    def media_type(self) -> str:
        return self.descriptor.media_type

    def open(self, on_bytes: OnBytes = None, on_retry: OnRetry = None) -> BinaryIO:
        """The compressed blob; its digest is checked when it is read to EOF."""
        return self._opener(self.descriptor, on_bytes=on_bytes, on_retry=on_retry)


class Image(abc.ABC):
    """A resolved image (one platform) and a way to read its blobs."""

    def __init__(self, resolved: ResolvedImage):
        self.resolved = resolved

    @abc.abstractmethod
    def open_blob(self, descriptor: Descriptor, *, on_bytes: OnBytes = None,
                  on_retry: OnRetry = None) -> BinaryIO:
        """A stream of one of the image's blobs, digest-verified at EOF."""

    @property
    def reference(self) -> Reference:
        """The image pinned to its manifest digest (for messages and metadata)."""
        return self.resolved.reference

    @property
    def manifest(self) -> Manifest:
        return self.resolved.manifest

    @property
    def index_digest(self) -> Optional[str]:
        """The index the manifest was chosen from, None for a single-platform image."""
        return self.resolved.index_digest

    @property
    def digest(self) -> str:
        return self.resolved.digest

    @property
    def config(self) -> dict:
        return self.resolved.config

    @property
    def platform(self) -> Platform:
        return self.resolved.platform

    def layers(self) -> List[Layer]:
        """The layers, bottom-most first, as in the manifest."""
        return [Layer(d, self.open_blob, self.reference.familiar()) for d in self.resolved.layers]


class RegistryImage(Image):
    """An image in a registry, read through a client (auth, retries, resume)."""

    def __init__(self, client: RegistryClient, resolved: ResolvedImage):
        super().__init__(resolved)
        self.client = client

    @classmethod
    def resolve(cls, client: RegistryClient, ref: Reference,
                platform: Optional[Platform] = None) -> "RegistryImage":
        return cls(client, client.resolve(ref, platform=platform))

    def open_blob(self, descriptor: Descriptor, *, on_bytes: OnBytes = None,
                  on_retry: OnRetry = None) -> BinaryIO:
        return self.client.open_blob(self.reference, descriptor, on_bytes=on_bytes,
                                     on_retry=on_retry)


def registry_layer(client: RegistryClient, ref: Reference, descriptor: Descriptor) -> Layer:
    """One blob of a registry repository as a Layer (a monolithic image's SquashFS)."""
    return Layer(descriptor, functools.partial(client.open_blob, ref), ref.familiar())


def layer_streams(image: Image, limits: Optional[FlattenLimits] = None) -> Iterator[BinaryIO]:
    """The decompressed layers, top-most first, each read one after the other in-process.

    flatten drains each to its end, so its digest is checked before the next
    is opened. pull.py has the production pipeline (parallel spooled
    downloads, child decompressors).
    """
    layers = image.layers()
    for i, layer in enumerate(reversed(layers)):
        blob = layer.open()
        try:
            stream = open_layer(blob, layer.media_type, name=f"layer {len(layers) - i} of "
                                f"{len(layers)} ({layer.digest})",
                                max_bytes=limits.layer_bound(layer.size) if limits else None)
            yield stream
        finally:
            blob.close()


def flatten_image(image: Image, out: BinaryIO, *,
                  limits: Optional[FlattenLimits] = None) -> FlattenStats:
    """Write the flattened root filesystem of `image` to out as one tar stream."""
    return flatten(layer_streams(image, limits), out, limits=limits)
