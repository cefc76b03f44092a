"""Pull an image from a registry and flatten it into one SquashFS: into a file or into the cache.

This is the glue between the registry client (what to fetch, verified),
flatten (one streaming pass over the layers, top-most first) and the SquashFS
writer. Nothing is extracted to disk; the only file written is the SquashFS.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

from . import __version__
from .cache import Cache, CacheEntry
from .errors import OciImageError
from .flatten import FlattenLimits
from .layers import open_layer
from .progress import DONE, DOWNLOAD, RESOLVE, SQUASH, ProgressEvent, Reporter, silent
from .reference import Reference, parse_reference
from .registry.client import RegistryClient, ResolvedImage
from .registry.platform import Platform
from .squash import SquashOptions, squash_layers, writer_version

log = logging.getLogger("ociimage.pull")

# The parts of an image config the runtime needs; the rest stays in the registry.
CONFIG_KEYS = ("Env", "Entrypoint", "Cmd", "WorkingDir", "User", "Labels", "StopSignal")


@dataclass
class PullOptions:
    squash: SquashOptions = field(default_factory=SquashOptions)
    platform: Optional[Platform] = None
    limits: FlattenLimits = field(default_factory=FlattenLimits)


def image_metadata(resolved: ResolvedImage, options: PullOptions) -> dict:
    cfg = resolved.config or {}
    runtime = cfg.get("config") or {}
    return {
        "reference": str(resolved.reference),
        "manifest_digest": resolved.manifest.digest,
        "index_digest": resolved.index_digest,
        "platform": {k: cfg.get(k) for k in ("os", "architecture", "variant") if cfg.get(k)},
        "config": {k: runtime[k] for k in CONFIG_KEYS if runtime.get(k) is not None},
        "layers": [{"digest": d.digest, "size": d.size, "mediaType": d.media_type}
                   for d in resolved.layers],
        "compressed_size": sum(d.size for d in resolved.layers),
        "converter": {
            "name": "slurm-oci-image",
            "version": __version__,
            "writer": writer_version(),
            "compression": options.squash.compression,
            "level": options.squash.level,
            "block_size": options.squash.block_size,
        },
    }


class _Progress:
    """Turns byte counts from the blob readers into DOWNLOAD events."""

    def __init__(self, report: Reporter, total: int, layers: int):
        self.report, self.total, self.layers = report, total, layers
        self.done = 0
        self.layer = 0

    def on_bytes(self, n: int) -> None:
        self.done += n
        self.report(ProgressEvent(DOWNLOAD, current=self.done, total=self.total,
                                  layer=self.layer, layers=self.layers))


def _layer_streams(client: RegistryClient, resolved: ResolvedImage,
                   progress: _Progress) -> Iterator[BinaryIO]:
    """Decompressed layer streams, top-most first, each verified against its digest."""
    n = len(resolved.layers)
    for i, desc in enumerate(reversed(resolved.layers)):
        progress.layer = n - i
        raw = client.open_blob(resolved.reference, desc, on_bytes=progress.on_bytes)
        try:
            yield open_layer(raw, desc.media_type)
            # Whatever follows the tar's end must still pass through the
            # digest check, so the layer is only trusted once fully read.
            while raw.read(1 << 20):
                pass
        finally:
            close = getattr(raw, "close", None)
            if close:
                close()


def convert_resolved(client: RegistryClient, resolved: ResolvedImage, out: Path,
                     options: PullOptions, report: Reporter = silent) -> dict:
    """Write the flattened SquashFS of a resolved image to out; return its metadata."""
    total = sum(d.size for d in resolved.layers)
    progress = _Progress(report, total, len(resolved.layers))
    report(ProgressEvent(DOWNLOAD, current=0, total=total, layers=len(resolved.layers)))
    started = time.monotonic()
    stats = squash_layers(_layer_streams(client, resolved, progress), out, options.squash,
                          options.limits)
    meta = image_metadata(resolved, options)
    meta["conversion_seconds"] = round(time.monotonic() - started, 3)
    meta["entries"] = getattr(stats, "entries", None)
    report(ProgressEvent(SQUASH, message="image written"))
    return meta


def resolve(client: RegistryClient, reference, options: PullOptions,
            report: Reporter = silent) -> ResolvedImage:
    ref = reference if isinstance(reference, Reference) else parse_reference(reference)
    report(ProgressEvent(RESOLVE, message=f"resolving {ref.familiar()}"))
    return client.resolve(ref, platform=options.platform)


def convert_to_file(client: RegistryClient, reference, out, options: PullOptions,
                    report: Reporter = silent) -> dict:
    """Standalone conversion: out exists afterwards only if it is complete."""
    out = Path(out)
    resolved = resolve(client, reference, options, report)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        meta = convert_resolved(client, resolved, tmp, options, report)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    meta["digest"] = resolved.manifest.digest
    meta["size"] = out.stat().st_size
    report(ProgressEvent(DONE, message=f"wrote {out}"))
    return meta


def pull_to_cache(client: RegistryClient, cache: Cache, reference, options: PullOptions,
                  report: Reporter = silent) -> CacheEntry:
    """Resolve, then convert unless the cache already holds the digest (once per cluster)."""
    resolved = resolve(client, reference, options, report)
    digest = resolved.manifest.digest

    def on_wait(waited: float) -> None:
        report(ProgressEvent("wait", message="waiting for another node converting this image",
                             current=int(waited)))

    def producer(tmp: Path) -> dict:
        log.info("converting", extra={"reference": str(resolved.reference), "digest": digest})
        return convert_resolved(client, resolved, tmp, options, report)

    try:
        entry = cache.build(digest, producer, on_wait=on_wait)
    except OciImageError:
        raise
    report(ProgressEvent(DONE, message="image ready"))
    return entry
