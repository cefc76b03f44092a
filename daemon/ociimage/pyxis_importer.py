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
    platform manifest digest with the USER's own registry credentials, then ask
    the node's oci-imaged on its user socket ([daemon] prefetch_socket, mode 0666)
    to "open" that digest. The shared cache is root's alone (0700/0600: no user
    reads it by path), and the daemon knows who asks (SO_PEERCRED): only after
    the registry confirms that uid may pull the image does it pass back an open,
    read-only descriptor of the cached SquashFS (SCM_RIGHTS). On a miss it pulls
    the image with the user's own credentials ("prefetch") and we ask again.
    enroot create then needs a PATH it can open as the user. /proc/self/fd/N
    will not do: opening a /proc fd link checks the file's own mode (0600
    root) again, and we exit before enroot runs. So we copy the descriptor's
    bytes (copy_file_range: a reflink where the filesystems allow) into a file
    of the user's own, 0600 in a 0700 directory of theirs ($TMPDIR or /tmp,
    oci-image-pyxis.<uid>/, refused unless it is a real directory owned by the
    user and closed to others), and print that path. The copy costs one
    sequential write of the compressed image per step and node; enroot create
    unpacks the whole file right after anyway.
  as root (an admin running it by hand, a prolog): ask the daemon on its main
    socket to pull with the job user's credentials (SLURM_JOB_UID) and print
    the path it answers (root may read the cache).
  release: remove this step's copies (SLURM_JOB_ID.SLURM_STEP_ID.*); the cache
    entry itself belongs to the shared cache and its LRU rules. Idempotent,
    always exits 0.

Site settings come from the config file (the importer= plugstack argument
takes no arguments); a wrapper script may pass --config/--cache-dir/--socket
/--prefetch-socket/--timeout before the operation.
"""

from __future__ import annotations

import argparse
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
    """docker://[USER@][REGISTRY#]IMAGE[:TAG|@DIGEST] -> what `docker pull` takes: the one
    translator, the one the step client uses for --container-image (ociimage.stepargs)."""
    from .errors import InvalidArgument
    from .stepargs import enroot_uri_to_reference as translate
    try:
        return translate(uri)
    except InvalidArgument as e:
        raise ImportError_(str(e)) from None


def _load_config(path: Optional[str]):
    from .config import load_config
    return load_config(path)


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


def _step_tag() -> str:
    """What names this step's copies, so that release removes exactly those."""
    job = os.environ.get("SLURM_JOB_ID", "")
    step = os.environ.get("SLURM_STEP_ID", "")
    tag = f"{job or 'nojob'}.{step or 'nostep'}"
    return tag if all(c.isalnum() or c in "._-" for c in tag) else "nojob.nostep"


def _copy_dir(args, create: bool) -> Optional[int]:
    """An O_DIRECTORY descriptor of the user's private copy directory (None: none yet)."""
    base = Path(args.copy_dir or os.environ.get("TMPDIR") or "/tmp")
    d = base / f"oci-image-pyxis.{os.getuid()}"
    if create:
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise ImportError_(f"cannot create {d}: {e.strerror}") from None
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ImportError_(f"cannot use {d}: {e.strerror} (it must be a directory of yours)") from None
    st = os.fstat(fd)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        os.close(fd)
        # someone else's directory (planted in a shared /tmp): never write into it
        raise ImportError_(f"{d} is not a private directory of uid {os.getuid()}; remove it")
    return fd


def _copy_out(src: int, size: int, dir_fd: int, name: str) -> None:
    tmp = f".{name}.{os.getpid()}.tmp"
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o600, dir_fd=dir_fd)
    try:
        done, in_kernel = 0, True
        while done < size:
            n = -1
            if in_kernel:
                try:
                    n = os.copy_file_range(src, out, size - done, done, done)
                except OSError:  # not across these filesystems (EXDEV, ENOSYS...): plain reads
                    in_kernel = False
            if not in_kernel:
                n = os.pwrite(out, os.pread(src, min(1 << 20, size - done), done), done)
            if n <= 0:
                raise ImportError_(f"the image ended after {done} of {size} bytes")
            done += n
        os.close(out)
        out = -1
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        if out >= 0:
            os.close(out)
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


def _private_copy(src: int, reply: dict, args) -> Path:
    size, digest = int(reply["size"]), str(reply["digest"])
    if os.pread(src, 4, 0) != b"hsqs":
        raise ImportError_(f"the daemon handed over something that is not a SquashFS for {digest}")
    dir_fd = _copy_dir(args, create=True)
    try:
        name = f"{_step_tag()}.{digest.split(':', 1)[1][:16]}.sqfs"
        _copy_out(src, size, dir_fd, name)
    except OSError as e:
        raise ImportError_(f"cannot copy the image for enroot: {e.strerror or e}") from None
    finally:
        os.close(dir_fd)
    base = Path(args.copy_dir or os.environ.get("TMPDIR") or "/tmp")
    return base / f"oci-image-pyxis.{os.getuid()}" / name


def get_as_user(reference: str, cfg, args) -> Path:
    from .config import prefetch_path
    from .errors import OciImageError
    from .sockclient import request
    insecure = list(cfg.insecure_registries) + list(args.insecure_registry or [])
    pinned = _resolve_as_user(reference, insecure)
    sock = args.prefetch_socket or (str(prefetch_path(cfg)) if prefetch_path(cfg) else None)
    if not sock:
        raise ImportError_(f"{reference}: the daemon's user socket is disabled "
                           f"([daemon] prefetch_socket), and the cache is root's alone")
    deadline = time.monotonic() + args.timeout
    said = False
    while True:
        try:
            reply, fd = request(sock, {"op": "open", "image": pinned}, timeout=60)
            if fd is not None:
                try:
                    return _private_copy(fd, reply, args)
                finally:
                    os.close(fd)
            # not in the cache: the daemon pulls it with this user's credentials
            reply, fd = request(sock, {"op": "prefetch", "image": pinned}, timeout=60)
            if fd is not None:
                os.close(fd)
        except OciImageError as e:
            raise ImportError_(f"{reference}: {e}") from None
        if reply.get("state") == "skipped":
            raise ImportError_(f"{reference}: oci-imaged did not pull {pinned} "
                               f"({reply.get('reason') or 'see its log'}); try again later")
        if not said:
            _say(f"pulling and converting {reference} into the shared cache")
            said = True
        if time.monotonic() > deadline:
            raise ImportError_(f"{reference}: not in the cache after {args.timeout:.0f} s")
        time.sleep(0.5)


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
    """Remove this step's private copies (see the module docstring); idempotent."""
    if os.geteuid() == 0:
        return 0  # root printed the cache's own path: nothing was copied
    try:
        dir_fd = _copy_dir(args, create=False)
    except ImportError_ as e:
        _say(f"warning: {e}")
        return 0
    if dir_fd is None:
        return 0
    prefix = _step_tag() + "."
    try:
        for name in os.listdir(dir_fd):
            if name.startswith(prefix) and name.endswith(".sqfs"):
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
    finally:
        os.close(dir_fd)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PREFIX, description="pyxis importer backed by the "
                                "slurm-oci-image shared cache (plugstack: importer=PATH).")
    p.add_argument("--config", help="config file (default: $OCI_IMAGE_CONFIG or "
                   "/etc/oci-image/oci-image.conf)")
    p.add_argument("--socket", help="oci-imaged's main socket, used as root")
    p.add_argument("--prefetch-socket", help="oci-imaged's user socket ([daemon] prefetch_socket), "
                   "used as a user")
    p.add_argument("--copy-dir", help="where a user's private copy goes, in a 0700 directory "
                   "oci-image-pyxis.UID (default: $TMPDIR or /tmp)")
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
