"""`oci-image-pyxis-importer`: serve pyxis (>= 0.21) from the shared cache.

pyxis' importer contract (NVIDIA/pyxis importers/README.md, importer.c):

    plugstack.conf:   required spank_pyxis.so importer=/usr/bin/oci-image-pyxis-importer
    IMPORTER get URI  URI is an enroot URI, docker://[USER@][REGISTRY#]IMAGE[:TAG|@DIGEST]
                      (pyxis prepends docker:// when the user gave no scheme).
                      stdout: the absolute path of a squashfs file, one line, nothing
                      else; progress and errors on stderr (pyxis shows stderr when we
                      fail); exit 0 on success, non-zero on failure.
    IMPORTER release  called after `enroot create` has unpacked the file (on success
                      and on failure), often twice per step: idempotent, exit 0.

pyxis runs both in slurmstepd's container-create path, forked, stdin /dev/null,
as the JOB'S USER (setregid/setreuid to the job's uid and gid), with an
environment made of slurmstepd's PATH plus the job's environment (minus PATH,
LD_LIBRARY_PATH, LD_PRELOAD, SLURM_PROCID, SLURM_LOCALID, SLURM_TASK_PID,
PMIX_RANK, PMI_FD and ENROOT_* settings), plus ENROOT_MOUNT_HOME /
ENROOT_REMAP_ROOT / ENROOT_ROOTFS_WRITABLE when the user chose them,
PYXIS_RUNTIME_PATH and PYXIS_VERSION. `enroot create` then reads the file as
that user, so the path printed must be readable by them.

What we do:
  as the job's user (how pyxis runs us): resolve the reference to its
    platform manifest digest with the USER's own registry credentials (so a
    private image is only served to users the registry lets see it), look the
    digest up in the shared cache ([cache] dir of /etc/oci-image/oci-image.conf,
    or --cache-dir); on a miss, ask the node's oci-imaged to pull it through its
    prefetch socket (mode 0666; the daemon pulls with its own credentials) and
    wait until the SquashFS is published; print its path (files in the cache are
    0644). The image is converted once per cluster, like `srun --oci-image`.
  as root (an admin running it by hand, a prolog): ask the daemon on its main
    socket to pull with the job user's credentials (SLURM_JOB_UID) and print
    the path it answers.
  release: nothing to free: the file belongs to the shared cache, used by
    everyone, and is evicted by the cache's own LRU rules. Always exits 0.

Site settings come from the config file (the importer= plugstack argument
takes no arguments); a wrapper script may pass --config/--cache-dir/--socket
/--prefetch-socket/--timeout before the operation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

PREFIX = "oci-image-pyxis-importer"


class ImportError_(Exception):
    pass


def _say(msg: str) -> None:
    sys.stderr.write(f"{PREFIX}: {msg}\n")
    sys.stderr.flush()


def enroot_uri_to_reference(uri: str) -> str:
    """docker://[USER@][REGISTRY#]IMAGE[:TAG|@DIGEST] -> what `docker pull` takes.

    Without REGISTRY# the image is on Docker Hub (enroot's default), exactly as
    for a reference without a registry. USER@ names the enroot credentials entry
    to use; we use the user's docker/podman login instead, so it is dropped.
    """
    text = uri.strip()
    if text.startswith("dockerd://") or text.startswith("podman://"):
        raise ImportError_(f"{uri}: images from a local Docker/Podman daemon are not supported; "
                           f"push the image to a registry")
    if text.startswith("docker://"):
        text = text[len("docker://"):]
    elif "://" in text:
        raise ImportError_(f"{uri}: unsupported URI scheme (expected docker://)")
    if not text:
        raise ImportError_(f"{uri!r}: empty image reference")
    head, sep, rest = text.partition("#")
    if sep:
        if "@" in head:  # USER@REGISTRY#IMAGE
            head = head.rsplit("@", 1)[1]
        if not head or not rest:
            raise ImportError_(f"{uri}: expected [USER@][REGISTRY#]IMAGE[:TAG]")
        return f"{head}/{rest}"
    # no registry: a USER@ prefix can only be told apart from IMAGE@DIGEST by the digest
    if "@" in text and not text.split("@", 1)[1].startswith("sha256:"):
        text = text.split("@", 1)[1]
    return text


def _load_config(path: Optional[str]):
    from .config import load_config
    return load_config(path)


def _cache_lookup(cache_dir: Path, digest: str) -> Optional[Path]:
    """The published SquashFS of digest in the shared cache, or None (read-only: no Cache())."""
    from .cache import entry_name
    stem = entry_name(digest)
    sqfs = cache_dir / "images" / f"{stem}.sqfs"
    meta = cache_dir / "images" / f"{stem}.json"
    try:
        size = json.loads(meta.read_text(encoding="utf-8")).get("size")
        if sqfs.stat().st_size == size:
            return sqfs
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _resolve_as_user(reference: str, insecure: List[str]) -> str:
    """REF -> REPO@<platform manifest digest>, with the calling user's own credentials."""
    from .reference import parse_reference
    from .registry.client import RegistryClient
    from .registry.credentials import CredentialStore
    client = RegistryClient(credentials=CredentialStore(), insecure_registries=insecure)
    try:
        return str(client.resolve(parse_reference(reference)).reference)
    finally:
        client.close()


def get_as_user(reference: str, cfg, args) -> Path:
    from .client import DaemonClient
    from .config import prefetch_path
    from .errors import OciImageError
    insecure = list(cfg.insecure_registries) + list(args.insecure_registry or [])
    pinned = _resolve_as_user(reference, insecure)
    digest = pinned.rsplit("@", 1)[1]
    cache_dir = Path(args.cache_dir or cfg.cache_dir)
    hit = _cache_lookup(cache_dir, digest)
    if hit:
        return hit
    sock = args.prefetch_socket or (str(prefetch_path(cfg)) if prefetch_path(cfg) else None)
    if not sock:
        raise ImportError_(f"{reference} is not in the cache {cache_dir} and the daemon's "
                           f"prefetch socket is disabled ([daemon] prefetch_socket)")
    client = DaemonClient(sock, timeout=30)
    deadline = time.monotonic() + args.timeout
    said = False
    try:
        while True:
            try:
                state = client.prefetch(pinned)["state"]
            except OciImageError as e:
                raise ImportError_(f"{reference}: {e}") from None
            hit = _cache_lookup(cache_dir, digest)
            if hit:
                return hit
            if state == "skipped":
                raise ImportError_(f"{reference}: oci-imaged could not pull {pinned} (it pulls "
                                   f"with the site's credentials; see its log), or it is busy: "
                                   f"try again later")
            if not said:
                _say(f"pulling and converting {reference} into the shared cache")
                said = True
            if time.monotonic() > deadline:
                raise ImportError_(f"{reference}: not in the cache after {args.timeout:.0f} s")
            time.sleep(0.5)
    finally:
        client.close()


def get_as_root(reference: str, cfg, args) -> Path:
    from .client import DaemonClient
    uid = os.environ.get("SLURM_JOB_UID")
    client = DaemonClient(args.socket or str(cfg.socket), timeout=args.timeout)
    try:
        img = client.pull(reference, uid=int(uid) if uid and uid.isdigit() else None)
    finally:
        client.close()
    return Path(img["path"])


def cmd_get(args) -> int:
    from .errors import OciImageError
    try:
        reference = enroot_uri_to_reference(args.uri)
        cfg = _load_config(args.config)
        path = get_as_root(reference, cfg, args) if os.geteuid() == 0 else \
            get_as_user(reference, cfg, args)
    except (ImportError_, OciImageError) as e:
        _say(f"error: {e}")
        return 1
    if not path.is_absolute():
        _say(f"error: the cache path {path} is not absolute")
        return 1
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()
    return 0


def cmd_release(args) -> int:
    # Nothing is ours to free (see the module docstring); idempotent by construction.
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PREFIX, description="pyxis importer backed by the "
                                "slurm-oci-image shared cache (plugstack: importer=PATH).")
    p.add_argument("--config", help="config file (default: $OCI_IMAGE_CONFIG or "
                   "/etc/oci-image/oci-image.conf)")
    p.add_argument("--cache-dir", help="the shared cache directory (default: [cache] dir)")
    p.add_argument("--socket", help="oci-imaged's main socket, used as root")
    p.add_argument("--prefetch-socket", help="oci-imaged's prefetch socket, used as a user")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds to wait for a conversion (default 3600)")
    sub = p.add_subparsers(dest="op")
    sub.required = True
    g = sub.add_parser("get", help="print the path of the squashfs of URI")
    g.add_argument("uri")
    sub.add_parser("release", help="release what get took (nothing; idempotent)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if e.code in (0, None) else 2
    try:
        return cmd_get(args) if args.op == "get" else cmd_release(args)
    except KeyboardInterrupt:
        _say("error: interrupted")
        return 130
    except Exception as e:  # pyxis shows stderr: one line, never a traceback
        _say(f"error: internal error: {type(e).__name__}: {e}")
        return 70


if __name__ == "__main__":
    sys.exit(main())
