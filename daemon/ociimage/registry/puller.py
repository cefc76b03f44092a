"""The pull side of the Distribution Spec: resolve a reference, fetch manifests and blobs.

Every byte taken from a registry is checked against a digest before use:
manifests by the digest they were asked for (or, by tag, against the
Docker-Content-Digest header: manifest.py), blobs while streaming
(blobstream.py). The referrers API is read here; its fallback tag scheme
lives with its user (monolithic.py).
"""

from __future__ import annotations

import json
import logging
from typing import BinaryIO, Callable, List, Optional
from urllib.parse import quote, urljoin

from ..digests import is_valid_digest, validate_digest
from ..errors import LimitExceeded, RegistryProtocolError, RegistryUnavailable
from ..reference import Reference
from . import mediatypes as mt
from .auth import pull_scopes, read_limited
from .blobstream import open_blob
from .chain import RegistryTransport
from .deadlines import STREAM_ERRORS, registry_op
from .manifest import (MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, Descriptor, Manifest, ResolvedImage,
                       parse_manifest, resolve_image)
from .platform import Platform
from .responses import describe
from .retry import RETRY_STATUSES

log = logging.getLogger("ociimage.registry")

MAX_REFERRER_PAGES = 20


def next_link(header: str) -> Optional[str]:
    for part in header.split(","):
        if 'rel="next"' in part or "rel=next" in part:
            url = part.split(";", 1)[0].strip()
            if url.startswith("<") and url.endswith(">"):
                return url[1:-1]
    return None


class Puller:
    """The pull operations of one client (its transport, its manifest size limit)."""

    def __init__(self, transport: RegistryTransport, max_manifest_size: int = MAX_MANIFEST_SIZE):
        self.transport = transport
        self.deadlines = transport.deadlines
        self.max_manifest_size = max_manifest_size

    @registry_op("the ping of registry")
    def ping(self, domain: str) -> bool:
        """True when `domain` answers as a v2 registry (200, or 401 with a challenge)."""
        resp = self.transport.plain("GET", self.transport.base_url(domain) + "/v2/")
        try:
            if resp.status_code == 200:
                return True
            if resp.status_code == 401 and resp.headers.get("WWW-Authenticate"):
                return True
        finally:
            resp.close()
        if resp.status_code in RETRY_STATUSES:
            raise RegistryUnavailable(f"registry {domain} failed (HTTP {resp.status_code})")
        raise RegistryProtocolError(f"{domain} does not look like an OCI registry "
                                    f"(GET /v2/ answered HTTP {resp.status_code})")

    @registry_op("the manifest request")
    def get_manifest(self, ref: Reference, accept: str = mt.ACCEPT, *,
                     expected: Optional[Descriptor] = None) -> Manifest:
        """Fetch and verify the manifest or index `ref` names (its digest, else its tag)."""
        scopes = pull_scopes(ref)
        path = f"/v2/{ref.path}/manifests/{ref.identifier}"
        limit = self.max_manifest_size
        # the body is read inside the chain's retries: a connection cut mid-manifest is
        # retried like one cut before the answer
        resp = self.transport.request("GET", ref.domain, path, scopes, {"Accept": accept},
                                      body_limit=limit,
                                      reading=f"the manifest of {ref.familiar()}")
        if resp.status_code != 200:
            self.transport.raise_for(resp, ref.domain, scopes,
                                     f"image not found: {ref.familiar()}",
                                     f"the manifest request for {ref.familiar()}")
        raw = resp.oci_body  # type: ignore[attr-defined]
        resp.close()
        if raw is None:
            length = resp.headers.get("Content-Length", "")
            size = f" is {int(length)} bytes," if length.isdigit() and int(length) > limit \
                else " is"
            raise LimitExceeded(f"manifest of {ref.familiar()}{size} over the {limit} byte limit")
        content_type = mt.base_type(resp.headers.get("Content-Type", ""))
        return parse_manifest(ref, raw, content_type, resp.headers.get("Docker-Content-Digest"),
                              expected)

    @registry_op("the tag lookup")
    def resolve_digest(self, ref: Reference) -> str:
        """Tag -> digest cheaply (HEAD): the digest of whatever the tag names (index or
        manifest)."""
        if ref.digest:
            return ref.digest
        scopes = pull_scopes(ref)
        resp = self.transport.request("HEAD", ref.domain,
                                      f"/v2/{ref.path}/manifests/{ref.identifier}",
                                      scopes, {"Accept": mt.ACCEPT})
        if resp.status_code == 200:
            digest = (resp.headers.get("Docker-Content-Digest") or "").strip()
            resp.close()
            if is_valid_digest(digest):
                return digest
            log.debug("no usable Docker-Content-Digest on HEAD for %s; using GET", ref.familiar())
        elif resp.status_code in (405, 501):
            resp.close()
        else:
            self.transport.raise_for(resp, ref.domain, scopes, f"image not found: {ref.familiar()}",
                                     f"the manifest request for {ref.familiar()}")
        return self.get_manifest(ref).digest

    def resolve(self, ref: Reference, platform: Optional[Platform] = None) -> ResolvedImage:
        """Follow `ref` to the image manifest for `platform` (default: this host) and its config."""
        return resolve_image(
            ref, self.get_manifest(ref),
            lambda child, chosen: self.get_manifest(child, accept=mt.ACCEPT, expected=chosen),
            lambda image_ref, desc: self.fetch_blob(image_ref, desc, MAX_CONFIG_SIZE), platform)

    def open_blob(self, ref: Reference, descriptor: Descriptor,
                  on_bytes: Optional[Callable[[int], None]] = None,
                  on_retry: Optional[Callable[[str], None]] = None) -> BinaryIO:
        """A verified, resuming stream of a blob (blobstream.open_blob)."""
        return open_blob(self.transport, ref, descriptor, on_bytes, on_retry)

    def fetch_blob(self, ref: Reference, descriptor: Descriptor, max_size: int) -> bytes:
        """A small blob (config, manifest-sized JSON) read fully and verified."""
        if descriptor.size > max_size:
            raise LimitExceeded(f"blob {descriptor.digest} of {ref.familiar()} is "
                                f"{descriptor.size} bytes, over the {max_size} byte limit")
        with self.open_blob(ref, descriptor) as f:
            return f.read()

    @registry_op("the referrers request")
    def get_referrers(self, ref: Reference, digest: str,
                      artifact_type: Optional[str] = None) -> Optional[List[Descriptor]]:
        """The referrers API (`GET /v2/<name>/referrers/<digest>`), filtered by
        artifact type; None when the registry does not implement it (404), so
        the caller falls back to the tag scheme."""
        validate_digest(digest)
        scopes = pull_scopes(ref)
        path = f"/v2/{ref.path}/referrers/{digest}"
        if artifact_type:
            path += f"?artifactType={quote(artifact_type, safe='')}"
        out: List[Descriptor] = []
        url: Optional[str] = None
        for _ in range(MAX_REFERRER_PAGES):
            resp = self.transport.request("GET", ref.domain, path, scopes, {"Accept": mt.OCI_INDEX},
                                          url=url)
            if resp.status_code in (404, 405, 501) and not out and url is None:
                resp.close()
                return None
            if resp.status_code != 200:
                self.transport.raise_for(resp, ref.domain, scopes,
                                         f"referrers of {digest} not found",
                                         f"the referrers request for {digest}")
            try:
                ctype = mt.base_type(resp.headers.get("Content-Type", ""))
                applied = resp.headers.get("OCI-Filters-Applied", "")
                link = resp.headers.get("Link", "")
                raw = read_limited(resp, self.max_manifest_size)
            except STREAM_ERRORS as e:
                raise RegistryUnavailable(f"reading the referrers of {digest} failed: "
                                          f"{describe(e)}") from None
            finally:
                resp.close()
            if ctype != mt.OCI_INDEX:
                # Some servers route unknown paths to a generic 200 page.
                if not out and url is None:
                    return None
                raise RegistryProtocolError(f"referrers of {digest} came as {ctype}")
            if raw is None:
                raise LimitExceeded(f"the referrers list of {digest} is too large")
            try:
                data = json.loads(raw)
                items = data.get("manifests") or []
            except (ValueError, AttributeError):
                raise RegistryProtocolError(f"referrers list of {digest} is not valid "
                                            f"JSON") from None
            for i, d in enumerate(items):
                desc = Descriptor.from_dict(d, f"referrer {i} of {digest}")
                if artifact_type and "artifactType" not in applied \
                        and desc.artifact_type != artifact_type:
                    continue
                out.append(desc)
            nxt = next_link(link)
            if not nxt:
                break
            url = urljoin(self.transport.base_url(ref.domain) + path, nxt)
        return out
