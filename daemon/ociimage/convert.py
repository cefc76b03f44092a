"""Convert an image into one SquashFS: its layers flattened in one streaming pass.

The layers of any image.Image (a registry's, an OCI layout's) download at
once into spool files (fetch.Prefetcher), are decompressed by a child
process where a fast inflater is installed (inflate.py), flattened top-most
first (flatten.py) and fed to the SquashFS writer (squash.py). Progress is
reported as the conversion reads the layers. PullOptions is what a pull or a
conversion is configured with.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, Optional, Sequence, Tuple

from . import __version__, cancel
from .errors import CorruptLayer, DigestMismatch
from .fetch import DEFAULT_PARALLEL, Prefetcher
from .flatten import FlattenLimits
from .image import Image
from .inflate import inflater_name, open_spooled_layer
from .layers import compression_of
from .monolithic import Trust
from .progress import DOWNLOAD, RETRY, SQUASH, ProgressEvent, Reporter, silent
from .registry.manifest import ResolvedImage
from .registry.platform import Platform
from .squash import SquashOptions, squash_layers, writer_version

# The parts of an image config the runtime needs; the rest stays in the registry.
CONFIG_KEYS = ("Env", "Entrypoint", "Cmd", "WorkingDir", "User", "Labels", "StopSignal")


@dataclass
class PullOptions:
    squash: SquashOptions = field(default_factory=SquashOptions)
    platform: Optional[Platform] = None
    limits: FlattenLimits = field(default_factory=FlattenLimits)
    #: [registries] trusted_squashfs: where ready-to-mount SquashFS images may come from
    trusted_squashfs: Sequence[str] = ()
    #: [registries] publish_to: REGISTRY/REPO where conversions are published (and looked for)
    publish_to: Optional[str] = None
    #: look for a monolithic referrer in trusted repositories before converting
    discover: bool = True
    #: layer downloads at once while converting (fetch.Prefetcher)
    parallel_downloads: int = DEFAULT_PARALLEL
    #: child decompressors tried per compression, best first (None: inflate.TOOLS; {}: none,
    #: always decompress in-process)
    inflaters: Optional[Dict[str, Sequence[Tuple[str, ...]]]] = None

    def trust(self) -> Trust:
        # publish_to is the site's own repository for conversions: trusted by configuration
        return Trust(self.trusted_squashfs, [self.publish_to] if self.publish_to else [])


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
        "origin": {"kind": "converted"},
    }


class _Progress:
    """DOWNLOAD events while a conversion runs: compressed bytes converted of the total.

    The layers download ahead of the conversion (fetch.Prefetcher), so what is
    shown is how far the conversion has read them: the figure that reaches the
    total when the last layer is read (then the writer finishes the image). A
    thread reports every TICK seconds, whatever the conversion is waiting for;
    an exception from the reporter (the pull was cancelled) is raised in the
    conversion at its next read (check()).
    """

    TICK = 0.5

    def __init__(self, report: Reporter, total: int, layers: int):
        self.report, self.total, self.layers = report, total, layers
        self.done = 0
        self.layer = 0
        self.error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _emit(self, ev: ProgressEvent) -> None:
        with self._lock:
            if self.error is not None:
                return
            try:
                self.report(ev)
            except BaseException as e:  # noqa: BLE001 - raised in the conversion by check()
                self.error = e

    def event(self) -> ProgressEvent:
        return ProgressEvent(DOWNLOAD, current=self.done, total=self.total, layer=self.layer,
                             layers=self.layers)

    def tick(self) -> None:
        self._emit(self.event())

    def on_retry(self, message: str) -> None:
        self._emit(ProgressEvent(RETRY, message=message, current=self.done, total=self.total,
                                 layer=self.layer, layers=self.layers))

    def on_bytes(self, n: int) -> None:
        self.done += n

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def __enter__(self) -> "_Progress":
        self.tick()
        token = cancel.current()

        def tick() -> None:
            with cancel.scope(token):
                while not self._stop.wait(self.TICK):
                    self.tick()
        self._thread = threading.Thread(target=tick, name="convert-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _layer_streams(image: Image, spool_base: Path, progress: _Progress, options: PullOptions,
                   reading: dict) -> Iterator[BinaryIO]:
    """Decompressed layer streams, top-most first, each verified against its digest.

    All layers download at once (bounded, fetch.Prefetcher) into spool files
    named after spool_base; each is decompressed by a child process where a
    fast inflater is installed (inflate.py), else in a thread.
    reading["spool"] is the layer being read, reading["check"] what raises
    when the conversion must stop.
    """
    layers = list(reversed(image.layers()))
    n = len(layers)
    limits = options.limits
    with Prefetcher(layers, spool_base,
                    parallel=options.parallel_downloads,
                    on_retry=progress.on_retry) as fetcher:
        def check() -> None:
            progress.check()
            fetcher.check()

        reading["check"] = check
        for i, layer in enumerate(layers):
            desc = layer.descriptor
            progress.layer = n - i
            spool = reading["spool"] = fetcher.reading(i)
            stream = open_spooled_layer(
                spool, compression_of(desc.media_type), check=check, on_bytes=progress.on_bytes,
                name=f"layer {n - i} of {n} ({desc.digest})",
                max_bytes=limits.layer_bound(desc.size) if limits else None,
                tools=options.inflaters)
            try:
                yield stream
                # Whatever follows the tar's end must still pass through the
                # digest check, so the layer is only trusted once fully read.
                stream.drain()
            finally:
                stream.close()
        # every layer read (current == total): the writer finishes the image now
        progress.tick()


_VERDICT_WAIT = 2.0  # seconds a broken layer's download may take to give its digest verdict


def convert_image(image: Image, out: Path, options: PullOptions,
                  report: Reporter = silent) -> dict:
    """Write the flattened SquashFS of an image to out; return its metadata."""
    resolved = image.resolved
    total = sum(d.size for d in resolved.layers)
    started = time.monotonic()
    with _Progress(report, total, len(resolved.layers)) as progress:
        reading: dict = {}
        layers = _layer_streams(image, out, progress, options, reading)
        try:
            stats = squash_layers(layers, out, options.squash, options.limits)
        except CorruptLayer:
            # A damaged tar or compressed stream may be a blob that is not what the
            # manifest says: the download's verdict on the layer is the better error.
            # Not worth the rest of a blob the manifest may say is a terabyte: a verdict
            # that is not in after a moment is not waited for (the downloads are stopped).
            spool = reading.get("spool")
            if spool is not None:
                verdict = spool.verdict(reading["check"], wait=_VERDICT_WAIT)
                if isinstance(verdict, DigestMismatch):
                    raise verdict from None
            raise
        finally:
            # at once, not when the traceback lets go of it: stops the downloads and
            # removes their spool files
            layers.close()
    meta = image_metadata(resolved, options)
    meta["converter"]["inflaters"] = sorted({inflater_name(compression_of(d.media_type),
                                                           options.inflaters)
                                             for d in resolved.layers})
    meta["conversion_seconds"] = round(time.monotonic() - started, 3)
    meta["entries"] = getattr(stats, "entries", None)
    report(ProgressEvent(SQUASH, message="image written"))
    return meta
