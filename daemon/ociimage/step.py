"""The step client the SPANK plugin execs (`oci-image-step`). Kept small: it is on the per-step path.

    submit  [--image REF] [--mounts M]... (srun/sbatch/salloc, as the user: every option's raw
                                        value, checked as the nodes check it) -> prints the
                                        pinned REF@digest, or nothing
    prepare --socket S --job J --step S (slurmstepd, root)  -> NUL-separated records on stdout
    release --socket S --job J --step S (slurmstepd, root)
    prefetch --socket P --image REF@DIGEST (srun/sbatch/salloc, as the user, detached: never waited for)
    cleanup-job --socket S --job J --node N (slurmd's job epilog, root: what the job left on the node)
    record-job --image REF@DIGEST --since T --sid SID (sbatch's exit, as the user: the digest
                                        goes into the submitted job's comment)

The arguments are ociimage.contract.STEP_COMMANDS; prepare's stdout, parsed by the
plugin, is contract.PREPARE_RECORDS as KEY\\0VALUE\\0 (the entrypoint encoded by
encode_entrypoint). Progress and errors go to stderr, one line each, which the plugin
shows in the user's srun output. Exit status 0 only on success.
"""

from __future__ import annotations

import os
import pwd
import sys
from typing import List, Optional

from .stepargs import build_parser as _build_parser, parse_mounts, resolve_options

PREFIX = "oci-image"


def _die(message: str, code: int = 1) -> int:
    from .progress import printable  # one line, whatever the message quotes
    sys.stderr.write(f"{PREFIX}: error: {printable(message)}\n")
    sys.stderr.flush()
    return code


def cmd_submit(args) -> int:
    """Check every option (as every node would) and pin the reference once, at submit,
    with the user's own credentials. main() has checked the options (resolve_options)."""
    from .errors import OciImageError
    image = args.image
    if not image or image.startswith("/") or args.inherited_pin:
        return 0  # nothing to pin: no image, a SquashFS file the nodes check, or pinned by the job
    try:
        from .reference import parse_reference
        from .registry.client import RegistryClient
        from .registry.credentials import CredentialStore
        ref = parse_reference(image)
        if ref.digest:
            print(image)
            return 0
        insecure = [x for x in os.environ.get("OCI_IMAGE_INSECURE_REGISTRIES", "").split(",") if x]
        digest = RegistryClient(credentials=CredentialStore(),
                                insecure_registries=insecure).resolve_digest(ref)
    except OciImageError as e:
        return _die(f"--oci-image={image}: {e}")
    print(f"{image}@{digest}")
    return 0


def read_job_env(fd: int, limit: int = 4 << 20) -> dict:
    """The job's environment, NUL-separated NAME=VALUE records the plugin writes to fd.

    It does not come as this process's environment: we run as root, and a
    user's LD_PRELOAD or PYTHONPATH must not run their code as root.
    """
    if fd < 0:
        return {}
    chunks, size = [], 0
    with os.fdopen(fd, "rb", closefd=True) as f:
        while size <= limit:
            chunk = f.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    env = {}
    for rec in b"".join(chunks)[:limit].split(b"\0"):
        name, sep, value = rec.partition(b"=")
        if sep and name:
            env[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return env


_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789/._-+:=@")


def encode_entrypoint(argv) -> bytes:
    """The image's Entrypoint as plugin/oci-image-launch reads it from OCI_IMAGE_ENTRYPOINT.

    Each element is its bytes followed by ','; bytes outside A-Z a-z 0-9 / . _ - + : = @
    become %XX. Any byte but NUL round-trips (a NUL comes out as %00, which the
    launcher refuses with a clear message rather than cutting the argument).
    """
    out = bytearray()
    for arg in argv:
        try:
            raw = arg.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = arg.encode("utf-8", "surrogatepass")
        for b in raw:
            out += bytes((b,)) if b in _PLAIN else b"%%%02X" % b
        out += b","
    return bytes(out)


def _records(container) -> bytes:
    out = [b"ns", container.ns_path.encode(), b"cwd", container.cwd.encode(),
           b"holder", b"%d %d %d" % (container.holder_pid, container.holder_start,
                                     container.ns_inode)]
    for kv in container.set_env:
        out += [b"env", kv.encode()]
    for name in container.unset_env:
        out += [b"unsetenv", name.encode()]
    if container.argv_prefix:  # only with --oci-entrypoint and an image that has one
        out += [b"entrypoint", encode_entrypoint(container.argv_prefix)]
    return b"\0".join(out) + b"\0"


def cmd_prepare(args) -> int:
    from .client import DaemonClient
    from .errors import OciImageError
    from .progress import LiveProgress, ProgressEvent, TextProgress
    from .v1 import ociimage_pb2 as pb
    try:
        mounts = (parse_mounts(args.default_mounts, "plugstack default_mounts")
                  + parse_mounts(args.mounts, "--oci-mounts"))
        try:
            pw = pwd.getpwuid(args.uid)
            user_name, home = pw.pw_name, pw.pw_dir
        except KeyError:
            user_name, home = os.environ.get("USER", f"user{args.uid}"), os.environ.get("HOME", "/")
        env_names = [n for n in (args.env_names or "").split(",") if n]
        req = pb.PrepareStepRequest(
            job_id=args.job, step_id=args.step, uid=args.uid, gid=args.gid, image=args.image,
            mounts=[pb.Mount(source=s, target=d, read_only=ro) for s, d, ro in mounts],
            workdir=args.workdir or "", cwd=args.cwd or "", writable=args.writable,
            mount_home=args.mount_home, entrypoint=args.entrypoint,
            environment=read_job_env(args.job_env_fd), env_names=env_names,
            allow_sqfs=args.allow_sqfs, node=args.node or "", home=home, user_name=user_name)
        show = None
        if args.progress != "none":  # one node of the step shows it (the plugin chooses)
            node = f"{args.node}: " if args.node else ""
            show = LiveProgress(TextProgress(sys.stderr, prefix=f"{PREFIX}: {node}",
                                             tty=args.progress == "tty", interval=4.0,
                                             columns=args.columns))

        def on_progress(p):
            if show is not None:
                show(ProgressEvent(p.phase, p.message, p.current, p.total, p.layer, p.layers))

        client = DaemonClient(socket_path(args))
        try:
            container = client.prepare_step(req, on_progress)
        finally:
            if show is not None:
                show.stop()
    except OciImageError as e:
        return _die(str(e))
    sys.stdout.buffer.write(_records(container))
    sys.stdout.flush()
    return 0


def cmd_release(args) -> int:
    from .client import DaemonClient
    from .errors import OciImageError
    try:
        DaemonClient(socket_path(args)).release_step(args.job, args.step)
    except OciImageError as e:
        return _die(f"releasing step {args.job}.{args.step}: {e}")
    return 0


def cmd_prefetch(args) -> int:
    """Ask the local daemon, over its user socket, to start pulling a pinned image.

    The daemon pulls it with this user's own registry credentials (it knows the
    caller from SO_PEERCRED). Best effort: the plugin runs this detached and never
    looks at the outcome. No gRPC here: the user socket is a one-line protocol.
    """
    from .errors import OciImageError
    from .usersock import request
    if "@sha256:" not in args.image:
        return _die(f"prefetch: {args.image}: not a digest-pinned reference")
    try:
        r, fd = request(socket_path(args), {"op": "prefetch", "image": args.image},
                        timeout=args.timeout)
    except OciImageError as e:
        return _die(f"prefetch {args.image}: {e}")
    if fd is not None:  # never asked for one
        os.close(fd)
    print(f"{r.get('state')} {r.get('digest')}" + (f" ({r['reason']})" if r.get("reason") else ""))
    return 0


def cmd_cleanup_job(args) -> int:
    """The job ended on this node: release whatever its steps left (a killed slurmstepd)."""
    from .client import DaemonClient
    from .errors import OciImageError
    try:
        r = DaemonClient(socket_path(args), timeout=args.timeout).release_job(args.job)
    except OciImageError as e:
        return _die(f"cleaning up after job {args.job}: {e}")
    if r["steps"] or r["leases"]:
        print(f"job {args.job}: released {r['steps']} step(s), {r['leases']} lease(s)")
    return 0


def cmd_record_job(args) -> int:
    """sbatch has submitted a job pinned to REF@DIGEST: note the digest in the job's comment.

    So that eviction spares the image while the job waits (ociimage.slurm). Only the
    digest: squeue shows comments to everyone, and a name may be private. Best effort:
    the job runs the same without it, so this says one line and exits 0 on failure.
    """
    from .slurm import SlurmUnavailable, record_image, submitted_job
    if "@sha256:" not in args.image:
        return 0  # a .sqfs path: nothing in the cache to spare
    digest = args.image.rsplit("@", 1)[1]
    try:
        job = args.job or submitted_job(os.getuid(), args.sid if args.sid is not None
                                        else os.getsid(0), args.since)
        if job is None:
            sys.stderr.write(f"{PREFIX}: note: the submitted job was not found; its image is "
                             f"not recorded (the cache may evict it while the job waits)\n")
            return 0
        record_image(job, digest)
    except (SlurmUnavailable, ValueError) as e:
        sys.stderr.write(f"{PREFIX}: note: the image was not recorded in the job's comment: {e}\n")
        return 0
    if args.verbose:
        print(f"job {job}: oci-image={digest}")
    return 0


def socket_path(args) -> str:
    """The plugstack socket= value; %n stands for the node name (several daemons on one host)."""
    return args.socket.replace("%n", args.node)


def build_parser():
    return _build_parser(__doc__.splitlines()[0])


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("submit", "prepare"):
            from .errors import OciImageError
            try:
                resolve_options(args)
            except OciImageError as e:
                return _die(str(e), e.exit_code)
            if args.command == "prepare" and not args.image:
                return _die("prepare: no image (--image or --container-image)", 2)
        if args.command == "submit":
            return cmd_submit(args)
        if args.command == "prepare":
            return cmd_prepare(args)
        if args.command == "prefetch":
            return cmd_prefetch(args)
        if args.command == "cleanup-job":
            return cmd_cleanup_job(args)
        if args.command == "record-job":
            return cmd_record_job(args)
        return cmd_release(args)
    except KeyboardInterrupt:
        return _die("interrupted", 130)
    except Exception as e:  # the user sees one line, never a traceback
        return _die(f"internal error: {type(e).__name__}: {e}", 70)


if __name__ == "__main__":
    sys.exit(main())
