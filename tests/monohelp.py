"""Shared pieces of the monolithic-image tests (test_publish.py, test_monolithic.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from images import IMAGE_CONFIG, busybox_layers
from ocibuild import Pusher

from ociimage.cache import Cache
from ociimage.pull import PullOptions, publish_entry, pull_resolved_to_cache, pull_to_cache, resolve
from ociimage.reference import parse_reference
from ociimage.registry.client import RegistryClient


def client(**kw) -> RegistryClient:
    kw.setdefault("backoff", 0.01)
    return RegistryClient(**kw)


def push_source(registry, repo: str, tag: str = "v1", **kw):
    return Pusher(registry.url).image(repo, tag, busybox_layers(**kw), config=IMAGE_CONFIG)


def file_sha(path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def convert_and_publish(c: RegistryClient, cache_dir: Path, source: str, target: str, **kw):
    """Convert source into a cache and publish it; (entry, published, resolved)."""
    options = PullOptions()
    cache = Cache(cache_dir, node="t")
    resolved = resolve(c, source, options)
    entry = pull_resolved_to_cache(c, cache, resolved, options)
    published = publish_entry(c, entry, resolved, target, **kw)
    return entry, published, resolved


def pull(c: RegistryClient, cache_dir: Path, ref: str, trusted=(), **kw):
    outcome: dict = {}
    entry = pull_to_cache(c, Cache(cache_dir, node="t"), parse_reference(ref),
                          PullOptions(trusted_squashfs=list(trusted), **kw), outcome=outcome)
    return entry, outcome.get("produced")


def layer_fetches(registry, img) -> int:
    return sum(registry.blob_fetches(d) for d in img.layer_digests)
