"""Pull an image from a registry into one SquashFS: into a file or into the cache.

This decides where the SquashFS comes from: the image itself when it is
monolithic (from a trusted repository), a monolithic referrer found in a
trusted repository, else a conversion (convert.py: flatten in one streaming
pass, then the SquashFS writer). Nothing is extracted to disk; the only file
written is the SquashFS. The cache entry is built under the cache's lock and
single flight; publish_to pushes a fresh conversion back to the site's
repository.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from pathlib import Path
from typing import Callable, Optional, Sequence

from . import monolithic
from .cache import UMASK as cache_umask
from .cache import Cache, CacheEntry
from .convert import PullOptions, convert_image, image_metadata
from .errors import InvalidArgument, OciImageError
from .image import RegistryImage, registry_layer
from .progress import DONE, DOWNLOAD, FETCH, RESOLVE, WAIT, ProgressEvent, Reporter, silent
from .reference import Reference, parse_reference
from .registry.client import RegistryClient, ResolvedImage
from .registry.platform import Platform, host_platform
from .verdicts import SharedAnswers

log = logging.getLogger("ociimage.pull")


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
        if monolithic.is_monolithic(resolved.manifest):
            # Already a SquashFS: the file is the layer itself (verified); writing a
            # file mounts nothing, so no trust is needed here.
            monolithic.download_squashfs(RegistryImage(client, resolved).layers()[0], tmp,
                                         report)
            meta = _fetched_metadata(resolved, options, resolved.reference, resolved.layers[0],
                                     monolithic.annotations_of(resolved.manifest), "reference")
        else:
            meta = convert_image(RegistryImage(client, resolved), tmp, options, report)
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


def _discover(client: RegistryClient, resolved: ResolvedImage, options: PullOptions,
              site_client: Optional[RegistryClient]) -> Optional[monolithic.Found]:
    """A monolithic referrer of resolved in a trusted place: its own repository (if trusted),
    then the publish_to repository. Registry trouble here only means: convert."""
    trust = options.trust()
    if not options.discover or not trust:
        return None
    src = resolved.reference
    places = []
    if trust.allows(src.domain, src.path):
        places.append((client, monolithic.repo_ref(src)))
    if options.publish_to:
        try:
            target = monolithic.parse_target(options.publish_to)
            if (target.domain, target.path) != (src.domain, src.path):
                places.append((site_client or client, target))
        except OciImageError as e:
            log.warning("bad [registries] publish_to", extra={"error": str(e)})
    for cl, repo in places:
        try:
            found = monolithic.find_monolithic(cl, repo, resolved.manifest.digest)
        except OciImageError as e:
            log.warning("looking for a ready-to-mount image failed",
                        extra={"repository": repo.name, "error": str(e)})
            continue
        if found and cl is not client and not _made_from(found, src):
            # Found with the site's identity: only for the repository the caller just
            # resolved with their own credentials. Otherwise anyone who can serve a private
            # image's manifest from a registry of their own would get its SquashFS.
            log.warning("a ready-to-mount image of the publish_to repository was made from "
                        "another repository than the one asked for: converting instead",
                        extra={"repository": repo.name, "asked": str(src)})
            continue
        if found:
            return found
    return None


def _made_from(found: monolithic.Found, src: Reference) -> bool:
    made = found.annotations.get(monolithic.A_SOURCE_REF)
    try:
        ref = parse_reference(made) if isinstance(made, str) else None
    except OciImageError:
        return False
    return ref is not None and (ref.domain, ref.path) == (src.domain, src.path)


def _fetched_metadata(resolved: ResolvedImage, options: PullOptions, found_ref: Reference,
                      layer, annotations: dict, via: str) -> dict:
    meta = image_metadata(resolved, options)
    meta["converter"] = monolithic.converter_from_annotations(annotations)
    meta["origin"] = {"kind": "fetched", "from": str(found_ref), "via": via,
                      "squashfs_digest": layer.digest}
    meta["squashfs_digest"] = layer.digest
    return meta


def _producer(client: RegistryClient, resolved: ResolvedImage, options: PullOptions,
              report: Reporter, site_client: Optional[RegistryClient],
              outcome: dict) -> Callable[[Path], dict]:
    """producer(tmp) for Cache.build: writes resolved's SquashFS to tmp, returns its metadata.

    A monolithic image (one SquashFS layer) is downloaded as is, only from a
    trusted repository (refused here, before anything is written, otherwise).
    An ordinary image is downloaded from a monolithic referrer in a trusted
    repository when there is one, else converted.
    """
    digest = resolved.manifest.digest
    ref = resolved.reference
    if monolithic.is_monolithic(resolved.manifest):
        if not options.trust().allows(ref.domain, ref.path):
            raise monolithic.untrusted_error(ref, resolved.manifest)

        def fetch(tmp: Path) -> dict:
            log.info("fetching ready-to-mount image", extra={"reference": str(ref),
                                                             "digest": digest})
            layer = resolved.layers[0]
            monolithic.download_squashfs(registry_layer(client, ref, layer), tmp, report)
            outcome["produced"] = "fetched"
            return _fetched_metadata(resolved, options, ref, layer,
                                     monolithic.annotations_of(resolved.manifest), "reference")
        return fetch

    def produce(tmp: Path) -> dict:
        found = _discover(client, resolved, options, site_client)
        if found is not None:
            try:
                log.info("fetching the ready-to-mount form instead of converting",
                         extra={"reference": str(ref), "digest": digest,
                                "from": str(found.reference), "via": found.via})
                monolithic.download_squashfs(found.squashfs_layer(), tmp, report)
                outcome["produced"] = "fetched"
                return _fetched_metadata(resolved, options, found.reference, found.layer,
                                         found.annotations, found.via)
            except OciImageError as e:
                log.warning("cannot use the ready-to-mount image; converting",
                            extra={"from": str(found.reference), "error": str(e)})
        log.info("converting", extra={"reference": str(ref), "digest": digest})
        outcome["converting"] = True  # a failure from here on is a failed conversion
        meta = convert_image(RegistryImage(client, resolved), tmp, options, report)
        outcome["produced"] = "converted"
        return meta
    return produce


def _waiting(report: Reporter):
    def on_wait(waited: float, builder: Optional[dict] = None) -> None:
        # builder: what the cache knows of the other node's progress (None: nothing)
        # The builder's bytes go in current/total, so that the step's user sees rate and
        # ETA of the conversion they wait for, as if it ran on their node.
        message = "waiting for another node converting this image"
        done = total = 0
        if builder and builder.get("node"):
            # a monolithic image is fetched, not converted: say what the other node does
            doing = "fetching" if builder.get("phase") == FETCH else "converting"
            message = f"waiting for node {builder['node']} {doing} this image"
            d, t = builder.get("done"), builder.get("total")
            if isinstance(d, int) and isinstance(t, int) and 0 <= d <= t and t > 0:
                done, total = d, t
        report(ProgressEvent(WAIT, message=message, current=done, total=total))
    return on_wait


def _noting(cache: Cache, digest: str, report: Reporter) -> Reporter:
    """report, also telling the cache how far the build of digest is: the nodes waiting
    for it read that (Cache.note_progress: a no-op unless this process builds digest)."""
    def rep(ev: ProgressEvent) -> None:
        if ev.phase in (DOWNLOAD, FETCH) and ev.total:
            cache.note_progress(digest, ev.phase, ev.current, ev.total)
        report(ev)
    return rep


def _umasked(options: PullOptions) -> PullOptions:
    # The shared cache is root's alone: the SquashFS writer creates its output
    # with the cache's umask, never readable by others (Cache._publish checks).
    return dataclasses.replace(options, squash=dataclasses.replace(options.squash,
                                                                   umask=cache_umask))


def pull_resolved_to_cache(client: RegistryClient, cache: Cache, resolved: ResolvedImage,
                           options: PullOptions, report: Reporter = silent, *,
                           site_client: Optional[RegistryClient] = None,
                           outcome: Optional[dict] = None) -> CacheEntry:
    """The cache entry for a resolved image, made once per cluster.

    The entry is keyed by the image manifest's own digest however it is made
    (see _producer). `outcome` receives produced = "converted" | "fetched" |
    None (cache hit).
    """
    outcome = outcome if outcome is not None else {}
    outcome["produced"] = None
    outcome["resolved"] = resolved
    producer = _producer(client, resolved, _umasked(options),
                         _noting(cache, resolved.manifest.digest, report), site_client, outcome)
    entry = cache.build(resolved.manifest.digest, producer, on_wait=_waiting(report))
    report(ProgressEvent(DONE, message="image ready"))
    return entry


class _BuiltUnderManifest(Exception):
    """Raised out of the producer of an index digest's build: the entry is the manifest's.

    Internal control flow, never seen outside pull_pinned_to_cache: Cache.build
    removes the (empty) temporary file and releases the index digest's build
    right, publishing nothing under the index digest.
    """

    def __init__(self, entry: CacheEntry):
        super().__init__(entry.digest)
        self.entry = entry


def platform_key(platform: Optional[Platform]) -> str:
    """The platform an index digest is resolved for, as recorded (default: this host's)."""
    return str((platform or host_platform()).normalized())


def cached_pinned(cache: Cache, digest: str, platform: Optional[Platform],
                  answers: Optional[SharedAnswers] = None) -> Optional[CacheEntry]:
    """The entry for a digest-pinned reference, without the registry: the digest's own, or
    the one recorded for it when it is an index (for platform)."""
    entry = cache.get(digest)
    if entry is not None:
        return entry
    manifest = (answers or SharedAnswers(cache)).resolved(digest, platform_key(platform))
    return cache.get(manifest) if manifest else None


def _same_repository(entry: CacheEntry, ref: Reference) -> bool:
    try:
        source = parse_reference(entry.reference)
    except OciImageError:
        return False
    return (source.domain, source.path) == (ref.domain, ref.path)


def pull_pinned_to_cache(client: RegistryClient, cache: Cache, ref: Reference,
                         options: PullOptions, report: Reporter = silent, *,
                         site_client: Optional[RegistryClient] = None,
                         outcome: Optional[dict] = None,
                         on_resolved: Optional[Callable[[ResolvedImage], None]] = None
                         ) -> CacheEntry:
    """The cache entry for REF@digest, with at most one node of the cluster asking the registry.

    A node that misses the cache first waits for the right to build under the
    digest the reference names (Cache.build): the one that gets it resolves
    (manifest, config: the only registry requests), converts and publishes;
    the others then find the entry and ask the registry nothing. When the
    digest is an image index, the entry is the platform manifest's (keyed by
    its digest, built under its own build right while the index's is held),
    and `index digest + platform -> manifest digest` is recorded for every
    node (verdicts.SharedAnswers.resolved). outcome["resolved_here"] is True
    when this call asked the registry with client (whose credentials were
    therefore accepted), so a caller that did not may check access itself;
    on_resolved(resolved) is told at that moment.
    """
    outcome = outcome if outcome is not None else {}
    outcome.setdefault("produced", None)
    outcome["resolved_here"] = False
    digest = ref.digest
    if not digest:
        raise InvalidArgument(f"{ref.familiar()} does not name a digest")
    answers = SharedAnswers(cache)
    platform = platform_key(options.platform)

    waiting = _waiting(report)
    report = _noting(cache, digest, report)

    def producer(tmp: Path) -> dict:
        # Holding the build right of the digest asked for: first what a node that held
        # it before may have published (an index's entry lives under another digest).
        entry = cached_pinned(cache, digest, options.platform, answers)
        if entry is not None:
            raise _BuiltUnderManifest(entry)
        resolved = resolve(client, ref, options, report)
        outcome["resolved_here"] = True
        outcome["resolved"] = resolved
        if on_resolved is not None:
            on_resolved(resolved)
        if resolved.manifest.digest == digest:
            return _producer(client, resolved, _umasked(options), report, site_client,
                             outcome)(tmp)
        entry = pull_resolved_to_cache(client, cache, resolved, options, report,
                                       site_client=site_client, outcome=outcome)
        if outcome.get("produced") or _same_repository(entry, resolved.reference):
            # Recorded only for an index of the entry's own source: any user can serve
            # indexes naming a cached manifest from a registry of their own, and each
            # would leave a record for good (the caller's access check refuses them).
            answers.record_resolved(digest, platform, entry.digest)
        raise _BuiltUnderManifest(entry)

    try:
        entry = cache.build(digest, producer, on_wait=waiting)
    except _BuiltUnderManifest as built:
        entry = built.entry
        cache.touch(entry.digest)
    report(ProgressEvent(DONE, message="image ready"))
    return entry


def pull_to_cache(client: RegistryClient, cache: Cache, reference, options: PullOptions,
                  report: Reporter = silent, *, site_client: Optional[RegistryClient] = None,
                  outcome: Optional[dict] = None) -> CacheEntry:
    """Resolve, then fetch or convert unless the cache already holds the digest.

    A digest-pinned reference goes through pull_pinned_to_cache (the registry
    is asked only on a miss, by one node). With options.publish_to, a
    conversion made here is published there (best effort, after the entry is
    in the cache) unless the caller takes care of it (outcome given: see
    publish_conversion).
    """
    ref = reference if isinstance(reference, Reference) else parse_reference(reference)
    mine = outcome is None
    outcome = {} if outcome is None else outcome
    if ref.digest:
        entry = cached_pinned(cache, ref.digest, options.platform)
        if entry is not None:
            outcome["produced"] = None
            cache.touch(entry.digest)
            report(ProgressEvent(DONE, message="image ready"))
            return entry
        entry = pull_pinned_to_cache(client, cache, ref, options, report,
                                     site_client=site_client, outcome=outcome)
    else:
        resolved = resolve(client, ref, options, report)
        entry = pull_resolved_to_cache(client, cache, resolved, options, report,
                                       site_client=site_client, outcome=outcome)
    if mine and outcome.get("produced") == "converted" and options.publish_to:
        publish_conversion(site_client or client, entry, outcome["resolved"],
                           options.publish_to)
    return entry


def publish_entry(client: RegistryClient, entry: CacheEntry, resolved: ResolvedImage, target,
                  *, chunk_size: Optional[int] = None, mount_from: Sequence[str] = (),
                  on_bytes=None) -> "monolithic.Published":
    """Push a cache entry as the monolithic form of resolved to target.

    The SquashFS is mounted instead of uploaded when it is already in another
    repository of the target registry: where it was fetched from, the
    source's repository, or one of mount_from (REPO or REGISTRY/REPO).
    """
    target_ref = target if isinstance(target, Reference) else monolithic.parse_target(target)
    meta = entry.meta
    candidates = [resolved.reference]
    for m in mount_from:
        m = m.strip("/")
        if "/" in m and ("." in m.split("/", 1)[0] or ":" in m.split("/", 1)[0]
                         or m.startswith("localhost/")):
            candidates.append(monolithic.parse_target(m))
        else:
            candidates.append(monolithic.Reference(target_ref.domain, m))
    origin = meta.get("origin") or {}
    if origin.get("kind") == "fetched" and origin.get("from"):
        try:
            candidates.insert(0, parse_reference(origin["from"]))
        except OciImageError:
            pass
    return monolithic.publish(client, entry.path, RegistryImage(client, resolved), target_ref,
                              meta.get("converter") or {},
                              squashfs_digest=meta.get("squashfs_digest"),
                              mount_candidates=candidates, chunk_size=chunk_size,
                              on_bytes=on_bytes)


def publish_conversion(client: RegistryClient, entry: CacheEntry, resolved: ResolvedImage,
                       target: str) -> Optional["monolithic.Published"]:
    """[registries] publish_to: best effort; a failure is logged, never raised."""
    try:
        published = publish_entry(client, entry, resolved, target)
    except Exception as e:  # noqa: BLE001 - publishing must never fail a pull
        log.warning("publishing the conversion failed",
                    extra={"reference": str(resolved.reference), "target": target,
                           "error": str(e)})
        return None
    log.info("published the conversion", extra={"reference": str(resolved.reference),
                                                "target": str(published.reference)})
    return published
