"""`oci-image publish` through the daemon: an ordinary user publishes an image's SquashFS.

The cache is root's alone, so a user on a node cannot publish from it with the
standalone CLI; they ask the daemon over the user socket (usersock.py, the
caller's uid from SO_PEERCRED). What the daemon does for them is exactly what they
could do themselves with their own credentials, only without converting again:

* REF is resolved with the CALLER's registry credentials (read from their home,
  as them: asuser.py), never root's, never another user's;
* the cache entry is taken through ImageStore.pull with the caller's uid: a miss
  is converted once in the shared cache with their credentials, a hit is handed
  over only after the registry confirmed that they may pull the entry's own
  source (access.py), so nobody publishes another user's private image;
* TARGET is pushed to with the caller's credentials: the registry decides whether
  they may write there; root's identity (`publish_to`) is never used;
* the request names no file: the SquashFS is the cache entry's, opened by the
  daemon itself, and a user's request cannot make it read anything else as root.

Bounded: at most `publish_running` publishes at once and `publish_running_per_user`
per uid (one more fails at once with RESOURCE_EXHAUSTED), each within
`publish_timeout` (the user socket cancels it then, and when the caller goes away
or stops reading), upload chunks of at most MAX_CHUNK (a chunk is read into memory,
whatever a registry's OCI-Chunk-Min-Length asks for).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, Optional

from .errors import AccessDenied, CacheError, InvalidArgument, LimitExceeded
from .monolithic import is_monolithic, parse_target
from .progress import DONE, ProgressEvent, Reporter
from .pull import publish_entry, resolve
from .reference import parse_reference

log = logging.getLogger("ociimage.publisher")

#: the progress phase of the SquashFS's upload (current, total: bytes)
UPLOAD = "upload"
#: chunk sizes a caller may ask for: each chunk is read into the daemon's memory
MIN_CHUNK = 1 << 20
MAX_CHUNK = 64 << 20
MAX_MOUNT_FROM = 8
FIELDS = ("op", "image", "target", "platform", "chunk_size", "mount_from")


@dataclasses.dataclass(frozen=True)
class PublishRequest:
    image: str
    target: str
    platform: str = ""
    chunk_size: Optional[int] = None
    mount_from: tuple = ()


def _text(request: dict, key: str, limit: int, default: Optional[str] = None) -> str:
    value = request.get(key, default)
    if not isinstance(value, str) or (default is None and not value):
        raise InvalidArgument(f"publish: {key!r} must be a non-empty string")
    if len(value) > limit or any(c.isspace() or ord(c) < 32 for c in value):
        raise InvalidArgument(f"publish: {key!r} is too long or contains whitespace")
    return value


def parse_request(request: dict) -> PublishRequest:
    """A user socket request, checked field by field: nothing unknown gets through."""
    unknown = sorted(str(k)[:40] for k in request if k not in FIELDS)
    if unknown:
        raise InvalidArgument(f"publish: unknown field(s) {', '.join(unknown)} "
                              f"(known: {', '.join(FIELDS[1:])})")
    image = _text(request, "image", 1024)
    if image.startswith("/"):
        raise InvalidArgument("publish: the image must be a registry reference, not a file")
    target = _text(request, "target", 1024)
    platform = _text(request, "platform", 64, default="")
    chunk = request.get("chunk_size")
    if chunk is not None:
        if not isinstance(chunk, int) or isinstance(chunk, bool) \
                or not MIN_CHUNK <= chunk <= MAX_CHUNK:
            raise InvalidArgument(f"publish: chunk_size must be {MIN_CHUNK >> 20} to "
                                  f"{MAX_CHUNK >> 20} MiB through oci-imaged")
    mount_from = request.get("mount_from") or []
    if not isinstance(mount_from, list) or len(mount_from) > MAX_MOUNT_FROM \
            or not all(isinstance(m, str) and 0 < len(m) <= 255 and not any(
                c.isspace() for c in m) for m in mount_from):
        raise InvalidArgument(f"publish: mount_from must be a list of at most "
                              f"{MAX_MOUNT_FROM} repository names")
    parse_reference(image)      # one-line errors before anything is asked of anybody
    parse_target(target)
    return PublishRequest(image, target, platform, chunk, tuple(mount_from))


class Publisher:
    def __init__(self, store, running: int = 4, running_per_user: int = 1):
        self.store = store
        self.running = running
        self.running_per_user = running_per_user
        self._lock = threading.Lock()
        self._by_uid: Dict[int, int] = {}

    @contextmanager
    def _slot(self, uid: int) -> Iterator[None]:
        if not self.running or not self.running_per_user:
            raise AccessDenied("this node does not publish images for users ([daemon] "
                               "publish_running); ask your admin, or publish from a cache "
                               "directory of your own (oci-image publish --cache-dir DIR)")
        with self._lock:
            total = sum(self._by_uid.values())
            mine = self._by_uid.get(uid, 0)
            if mine >= self.running_per_user:
                raise LimitExceeded(f"you already have {mine} publish(es) running on this node "
                                    f"([daemon] publish_running_per_user = "
                                    f"{self.running_per_user}); wait for it to finish")
            if total >= self.running:
                raise LimitExceeded(f"oci-imaged is already publishing {total} images "
                                    f"([daemon] publish_running = {self.running}); try again "
                                    f"later")
            self._by_uid[uid] = mine + 1
        try:
            yield
        finally:
            with self._lock:
                n = self._by_uid[uid] - 1
                if n:
                    self._by_uid[uid] = n
                else:
                    del self._by_uid[uid]

    def in_progress(self) -> int:
        with self._lock:
            return sum(self._by_uid.values())

    def publish(self, uid: int, request: dict, report: Reporter) -> dict:
        """Publish for uid; the final reply of the user socket's stream (raises typed errors)."""
        req = parse_request(request)
        with self._slot(uid):
            log.info("publish started", extra={"uid": uid, "reference": req.image,
                                               "target": req.target})
            return self._publish(uid, req, report)

    def _publish(self, uid: int, req: PublishRequest, report: Reporter) -> dict:
        target = parse_target(req.target)
        client = self.store.client(uid)          # the caller's own credentials, read as them
        client.pusher.max_chunk_size = MAX_CHUNK  # the push side (registry/push.py)
        options = self.store.options(req.platform)
        resolved = resolve(client, parse_reference(req.image), options, report)
        if is_monolithic(resolved.manifest):
            raise InvalidArgument(f"{req.image} is already a monolithic (SquashFS) image; "
                                  f"publish the image it was made from, or copy it with skopeo")
        # the cache entry with the caller's rights: converted once (their credentials), or a
        # hit the registry confirms they may pull (its own source asked, access.py)
        entry = self.store.pull(str(resolved.reference), req.platform, uid, report)
        if entry.digest != resolved.manifest.digest:
            raise CacheError(f"the cache entry for {resolved.manifest.digest} is "
                             f"{entry.digest}; try again")
        # Pushed from a descriptor: an eviction (or prune) meanwhile unlinks the entry but
        # cannot take the file away mid-upload, and nothing is opened by a name again.
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise CacheError(f"image {entry.digest} was removed from the cache meanwhile; "
                             f"try again") from None
        try:
            size = os.fstat(fd).st_size
            if size != entry.size:
                raise CacheError(f"image {entry.digest} changed in the cache; try again")
            held = dataclasses.replace(entry, path=Path(f"/proc/self/fd/{fd}"))
            done = [0]

            def on_bytes(n: int) -> None:
                done[0] += n
                report(ProgressEvent(UPLOAD, current=done[0], total=size))

            report(ProgressEvent(UPLOAD, message=f"uploading to {target.familiar()}",
                                 current=0, total=size))
            published = publish_entry(client, held, resolved, target,
                                      chunk_size=req.chunk_size,
                                      mount_from=list(req.mount_from), on_bytes=on_bytes)
        finally:
            os.close(fd)
        log.info("published for a user", extra={"uid": uid, "source": str(resolved.reference),
                                                "target": str(published.reference),
                                                "blob": published.blob})
        report(ProgressEvent(DONE, message=f"published {published.reference}"))
        return dict(published.to_json(), state="published", source=str(resolved.reference),
                    source_digest=resolved.manifest.digest)

