"""The push side of the Distribution Spec: blobs and manifests into a repository.

A blob is made to exist the cheapest way: already there (HEAD), mounted
from another repository of the same registry, else uploaded, in one PUT
when it fits in a chunk and in PATCH chunks otherwise. A chunked upload
that is interrupted asks the registry how much it holds (GET on the upload
URL, its Range) and goes on from there; an upload the registry forgot is
started over. Both count their tries with retry.py's Attempts. Scopes asked
for: `pull,push` on the target, `pull` on a mount source.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Sequence, Tuple, Union
from urllib.parse import quote, urljoin, urlsplit

import requests

from ..digests import ALGORITHMS, validate_digest
from ..errors import (DigestMismatch, LimitExceeded, OciImageError, RegistryProtocolError,
                      RegistryUnavailable)
from ..reference import Reference
from .auth import pull_scopes, push_scopes, read_limited
from .chain import RegistryTransport
from .deadlines import STREAM_ERRORS, registry_op
from .manifest import PushedManifest
from .responses import MAX_ERROR_BODY
from .retry import RETRY_STATUSES

log = logging.getLogger("ociimage.registry")

MOUNTED = "mounted"
MAX_REFERRER_PAGES = 20
DEFAULT_CHUNK_SIZE = 32 << 20


class _UploadLost(Exception):
    """The registry lost an upload session (or never finished it): start over."""


def _read_range(source, offset: int, n: int) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[offset:offset + n])
    with open(source, "rb") as f:
        f.seek(offset)
        data = f.read(n)
    if len(data) != n:
        raise OciImageError(f"{source} changed while it was being uploaded")
    return data


def _with_query(url: str, key: str, value: str) -> str:
    sep = "&" if urlsplit(url).query else "?"
    return f"{url}{sep}{key}={quote(value, safe=':')}"


def _range_end(header: Optional[str]) -> int:
    """'0-1023' -> 1024 (bytes held); '' -> 0. 'bytes=0-1023' is accepted too."""
    if not header:
        return 0
    value = header.strip()
    if value.startswith("bytes="):
        value = value[6:]
    start, _, end = value.partition("-")
    try:
        end_i = int(end)
    except ValueError:
        return 0
    return end_i + 1 if end_i >= 0 else 0


class Pusher:
    """The push operations of one client (its transport, its chunk sizes)."""

    def __init__(self, transport: RegistryTransport, chunk_size: int = DEFAULT_CHUNK_SIZE):
        self.transport = transport
        self.deadlines = transport.deadlines
        #: blobs up to this size go up in one PUT; larger ones in PATCH chunks of it
        self.chunk_size = chunk_size
        #: None, or the largest chunk (a chunk is read into memory) this client sends,
        #: whatever the registry's OCI-Chunk-Min-Length asks for: oci-imaged publishing to
        #: a registry a user chose must not read a whole image into root's memory
        self.max_chunk_size: Optional[int] = None

    @registry_op("the blob existence check")
    def blob_exists(self, ref: Reference, digest: str,
                    scopes: Optional[Sequence[str]] = None) -> bool:
        """HEAD /v2/<name>/blobs/<digest>: is the blob in this repository?"""
        scopes = list(scopes or pull_scopes(ref))
        resp = self.transport.request("HEAD", ref.domain, f"/v2/{ref.path}/blobs/{digest}", scopes)
        if resp.status_code == 200:
            resp.close()
            return True
        if resp.status_code == 404:
            resp.close()
            return False
        self.transport.raise_for(resp, ref.domain, scopes, f"blob {digest} not found",
                                 f"the existence check of blob {digest}")
        return False  # not reached

    @staticmethod
    def _location(resp: requests.Response, what: str) -> str:
        location = resp.headers.get("Location")
        if not location:
            raise RegistryProtocolError(f"the registry answered {what} without a Location")
        return urljoin(resp.url, location)

    @registry_op("the upload request")
    def _start_upload(self, ref: Reference, scopes: Sequence[str]) -> Tuple[str, int]:
        """POST /v2/<name>/blobs/uploads/ -> (upload URL, the registry's minimum chunk)."""
        resp = self.transport.request("POST", ref.domain, f"/v2/{ref.path}/blobs/uploads/", scopes,
                                      {"Content-Length": "0"})
        if resp.status_code != 202:
            self.transport.raise_for(resp, ref.domain, scopes, f"repository {ref.name} not found",
                                     f"the upload request to {ref.name}")
        location = self._location(resp, f"the upload request to {ref.name}")
        minimum = resp.headers.get("OCI-Chunk-Min-Length", "")
        resp.close()
        return location, int(minimum) if minimum.isdigit() else 0

    @registry_op("the blob mount request")
    def mount_blob(self, ref: Reference, digest: str, from_repo: str) -> Optional[str]:
        """Cross-repository mount (POST .../blobs/uploads/?mount=&from=): MOUNTED, else
        the upload URL the registry opened instead, or None when it refused."""
        scopes = push_scopes(ref, from_repo)
        path = (f"/v2/{ref.path}/blobs/uploads/?mount={quote(digest, safe=':')}"
                f"&from={quote(from_repo, safe='/')}")
        resp = self.transport.request("POST", ref.domain, path, scopes, {"Content-Length": "0"})
        try:
            if resp.status_code == 201:
                log.info("mounted blob %s into %s from %s", digest, ref.name, from_repo)
                return MOUNTED
            if resp.status_code == 202 and resp.headers.get("Location"):
                log.debug("mount of %s from %s refused; uploading", digest, from_repo)
                return self._location(resp, "the mount request")
            log.debug("mount of %s from %s answered HTTP %d", digest, from_repo,
                      resp.status_code)
            return None
        finally:
            resp.close()

    def push_blob(self, ref: Reference, source: Union[bytes, str, "os.PathLike"], digest: str,
                  size: int, *, mount_from: Sequence[str] = (),
                  chunk_size: Optional[int] = None,
                  on_bytes: Optional[Callable[[int], None]] = None) -> str:
        """Make blob `digest` exist in ref's repository; return how: "exists",
        "mounted" or "uploaded".

        Order: HEAD (already there), cross-repository mount from each of
        `mount_from` (same registry), else upload: one PUT when the blob fits
        in a chunk, PATCH chunks otherwise. An interrupted chunked upload asks
        the registry how much it has (GET on the upload URL, Range header) and
        goes on from there; an upload the registry forgot starts over.
        """
        validate_digest(digest)
        scopes = push_scopes(ref)
        if self.blob_exists(ref, digest, scopes):
            return "exists"
        location: Optional[str] = None
        for repo in mount_from:
            if not repo or repo == ref.path:
                continue
            try:
                got = self.mount_blob(ref, digest, repo)
            except OciImageError as e:  # e.g. no pull access to the source: upload instead
                log.debug("mount of %s from %s failed: %s", digest, repo, e)
                continue
            if got == MOUNTED:
                return "mounted"
            if got:
                location = got
                break
        chunk = max(1, int(chunk_size or self.chunk_size))
        restarts = self.transport.backoff.attempts()
        while True:
            minimum = 0
            if location is None:
                location, minimum = self._start_upload(ref, scopes)
            if self.max_chunk_size is not None and size > chunk \
                    and max(chunk, minimum) > self.max_chunk_size:
                raise LimitExceeded(f"registry {ref.domain} wants upload chunks of at least "
                                    f"{minimum} bytes; at most {self.max_chunk_size} are "
                                    f"sent at once")
            try:
                if size <= chunk:
                    self._upload_monolithic(ref, scopes, location, source, digest, size,
                                            on_bytes)
                else:
                    self._upload_chunked(ref, scopes, location, source, digest, size,
                                         max(chunk, minimum), on_bytes)
                return "uploaded"
            except _UploadLost as e:
                delay = restarts.next_delay()
                if delay is None:
                    raise RegistryUnavailable(f"upload of blob {digest} to {ref.name} kept "
                                              f"failing: {e}") from None
                log.info("upload of %s to %s lost (%s); starting over", digest, ref.name, e)
                location = None
                self.deadlines.sleep(delay)

    def _upload_monolithic(self, ref, scopes, location, source, digest, size, on_bytes) -> None:
        data = _read_range(source, 0, size)
        try:
            with self.deadlines.operation(f"the upload of blob {digest} to {ref.domain}",
                                          self.transport.limits.blob_deadline(size)):
                resp = self.transport.request("PUT", ref.domain, "", scopes,
                                              {"Content-Type": "application/octet-stream"},
                                              data=data,
                                              url=_with_query(location, "digest", digest),
                                              retries=0)
        except RegistryUnavailable as e:
            if self._blob_landed(ref, digest, scopes):
                return
            raise _UploadLost(str(e)) from None
        self._finish_upload(ref, scopes, resp, digest)
        if on_bytes:
            on_bytes(size)

    def _blob_landed(self, ref, digest, scopes) -> bool:
        try:
            return self.blob_exists(ref, digest, scopes)
        except OciImageError:
            return False

    def _finish_upload(self, ref, scopes, resp, digest) -> None:
        status = resp.status_code
        if status in (200, 201, 204):
            announced = (resp.headers.get("Docker-Content-Digest") or "").strip()
            resp.close()
            if announced and announced != digest:
                raise DigestMismatch(f"registry {ref.domain} stored blob {announced}, "
                                     f"we sent {digest}")
            return
        if status == 404 or status in RETRY_STATUSES:
            resp.close()
            if self._blob_landed(ref, digest, scopes):
                return
            raise _UploadLost(f"HTTP {status} on completing the upload")
        if status == 400:
            body = b""
            try:
                body = read_limited(resp, MAX_ERROR_BODY) or b""
            except STREAM_ERRORS:
                pass
            resp.close()
            if b"DIGEST_INVALID" in body:
                raise DigestMismatch(f"registry {ref.domain} says the uploaded blob does "
                                     f"not match {digest}")
            raise RegistryProtocolError(f"registry {ref.domain} refused the upload of "
                                        f"{digest} (HTTP 400)")
        self.transport.raise_for(resp, ref.domain, scopes, f"repository {ref.name} not found",
                                 f"the upload of blob {digest}")

    @registry_op("the upload status request")
    def upload_status(self, ref: Reference, scopes: Sequence[str],
                      location: str) -> Tuple[str, int]:
        """GET on an upload URL: (the URL to go on with, bytes the registry holds)."""
        resp = self.transport.request("GET", ref.domain, "", scopes, url=location)
        try:
            if resp.status_code == 404:
                raise _UploadLost("the registry no longer knows the upload")
            if resp.status_code not in (200, 204):
                self.transport.raise_for(resp, ref.domain, scopes, "upload not found",
                                         "the upload status request")
            new = urljoin(resp.url, resp.headers["Location"]) \
                if resp.headers.get("Location") else location
            return new, _range_end(resp.headers.get("Range"))
        finally:
            resp.close()

    def _upload_chunked(self, ref, scopes, location, source, digest, size, chunk,
                        on_bytes) -> None:
        offset = 0
        failures = self.transport.backoff.attempts()
        reported = 0
        while offset < size:
            n = min(chunk, size - offset)
            data = _read_range(source, offset, n)
            headers = {"Content-Type": "application/octet-stream",
                       "Content-Range": f"{offset}-{offset + n - 1}"}
            problem = ""
            try:
                with self.deadlines.operation(f"a chunk upload of blob {digest} to {ref.domain}",
                                              self.transport.limits.blob_deadline(n)):
                    resp = self.transport.request("PATCH", ref.domain, "", scopes, headers,
                                                  data=data, url=location, retries=0)
            except RegistryUnavailable as e:
                problem = str(e)
            else:
                status = resp.status_code
                if status == 202:
                    location = self._location(resp, "a chunk upload")
                    end = _range_end(resp.headers.get("Range"))
                    resp.close()
                    offset = end if end > offset else offset + n
                    failures.reset()
                    if on_bytes and offset > reported:
                        on_bytes(offset - reported)
                        reported = offset
                    continue
                if status == 404:
                    resp.close()
                    raise _UploadLost("the registry no longer knows the upload")
                if status in (416,) or status in RETRY_STATUSES:
                    problem = f"HTTP {status}"
                    resp.close()
                else:
                    self.transport.raise_for(resp, ref.domain, scopes,
                                             f"repository {ref.name} not found",
                                             f"a chunk upload of blob {digest}")
            delay = failures.next_delay()
            if delay is None:
                raise RegistryUnavailable(f"upload of blob {digest} to {ref.name} kept failing "
                                          f"at byte {offset}: {problem}")
            log.info("chunk upload of %s failed at byte %d (%s); asking the registry where to "
                     "resume in %.2fs", digest, offset, problem, delay)
            self.deadlines.sleep(delay)
            location, offset = self.upload_status(ref, scopes, location)
            if offset > size:
                raise _UploadLost(f"the registry holds {offset} bytes of a {size} byte blob")
            log.info("resuming the upload of %s at byte %d", digest, offset)
        try:
            resp = self.transport.request("PUT", ref.domain, "", scopes, {"Content-Length": "0"},
                                          url=_with_query(location, "digest", digest), retries=0)
        except RegistryUnavailable as e:
            if self._blob_landed(ref, digest, scopes):
                return
            raise _UploadLost(str(e)) from None
        self._finish_upload(ref, scopes, resp, digest)

    @registry_op("the manifest upload")
    def put_manifest(self, ref: Reference, raw: bytes, media_type: str) -> PushedManifest:
        """PUT a manifest or index under ref's tag (or, untagged, its own digest)."""
        digest = "sha256:" + ALGORITHMS["sha256"](raw).hexdigest()
        scopes = push_scopes(ref)
        identifier = ref.tag if ref.tag and not ref.digest else digest
        if ref.digest and ref.digest != digest:
            raise DigestMismatch(f"manifest for {ref.familiar()} has digest {digest}")
        resp = self.transport.request("PUT", ref.domain, f"/v2/{ref.path}/manifests/{identifier}",
                                      scopes, {"Content-Type": media_type}, data=raw)
        if resp.status_code not in (200, 201, 202):
            self.transport.raise_for(resp, ref.domain, scopes, f"repository {ref.name} not found",
                                     f"the manifest upload to {ref.familiar()}")
        announced = (resp.headers.get("Docker-Content-Digest") or "").strip()
        subject = (resp.headers.get("OCI-Subject") or "").strip()
        resp.close()
        if announced and announced != digest:
            raise DigestMismatch(f"registry {ref.domain} stored manifest {announced}, "
                                 f"we sent {digest}")
        return PushedManifest(reference=ref.with_digest(digest), digest=digest,
                              size=len(raw), media_type=media_type,
                              subject_processed=bool(subject))
