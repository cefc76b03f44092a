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

from .stepargs import build_parser as _build_parser, parse_mounts, resolve_options

PREFIX = "oci-image"


def _full_site() -> None:
    """The installed wrapper starts Python with -IS (-I -S): no site-packages, no .pth files
    (they cost more than this program's whole per-step work). The per-step commands need
    only the standard library; the others (a tag resolved without a daemon, the job
    record) call this first to get the installation's packages (requests, ...) after all."""
    if sys.flags.no_site:
        import site
        site.main()


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
    insecure = [x for x in os.environ.get("OCI_IMAGE_INSECURE_REGISTRIES", "").split(",") if x]
    try:
        pinned = None
        if args.socket and _registry_of(image) not in insecure:
            pinned = _resolve_by_daemon(args.socket, image)
        if pinned is None:  # no daemon here, or it could not say: ask the registry ourselves
            pinned = _resolve_here(image, insecure)
    except OciImageError as e:
        return _die(f"--oci-image={image}: {e}")
    print(pinned)
    return 0


#: where the user's registry credentials are (credentials.py), as the daemon needs to know
_CREDENTIAL_ENV = ("HOME", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_RUNTIME_DIR")


def _registry_of(image: str) -> str:
    """The registry part of a reference as Docker splits it (no parser on this path)."""
    first, sep, _rest = image.partition("/")
    return first if sep and ("." in first or ":" in first or first == "localhost") else ""


def _resolve_by_daemon(sock: str, image: str) -> "str | None":
    """REF@digest from this host's daemon (usersock "resolve": the caller's credentials,
    the registry's answer of now), or None where the daemon cannot say.

    A warm daemon answers in milliseconds, and this process never imports the registry
    client (requests, urllib3: most of a cold lookup's time). Whatever goes wrong there
    (no daemon, busy, an older one, a registry it may not reach, credentials it cannot
    read, such as a helper program's) is asked again here, whose answer is the last word.
    """
    from .errors import OciImageError
    from .sockclient import MAX_REQUEST, line, request
    message = {"op": "resolve", "image": image,
               "env": {k: os.environ[k] for k in _CREDENTIAL_ENV
                       if os.environ.get(k, "").startswith("/")}}
    if len(line(message)) > MAX_REQUEST:
        return None
    try:
        reply, fd = request(sock, message, timeout=30.0)
    except OciImageError:
        return None
    if fd is not None:
        os.close(fd)
    digest = reply.get("digest")
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        return None
    if reply.get("pinned"):  # the reference named its digest: only that one will do
        return image if image.endswith("@" + digest) else None
    return f"{image}@{digest}"


def _resolve_here(image: str, insecure: "list[str]") -> str:
    _full_site()
    from .reference import parse_reference
    from .registry.client import RegistryClient
    from .registry.credentials import CredentialStore
    ref = parse_reference(image)
    if ref.digest:
        return image
    return f"{image}@{RegistryClient(credentials=CredentialStore(), insecure_registries=insecure).resolve_digest(ref)}"


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


def _records(container: dict) -> bytes:
    """The StepContainer (protobuf's JSON mapping: defaults left out, 64-bit integers as
    strings) as the plugin's NUL-separated records."""
    out = [b"ns", container["ns_path"].encode(), b"cwd", container.get("cwd", "").encode(),
           b"holder", b"%d %d %d" % (int(container.get("holder_pid", 0)),
                                     int(container.get("holder_start", 0)),
                                     int(container.get("ns_inode", 0)))]
    for kv in container.get("set_env", ()):
        out += [b"env", kv.encode("utf-8", "surrogateescape")]
    for name in container.get("unset_env", ()):
        out += [b"unsetenv", name.encode("utf-8", "surrogateescape")]
    if container.get("argv_prefix"):  # only with --oci-entrypoint and an image that has one
        out += [b"entrypoint", encode_entrypoint(container["argv_prefix"])]
    return b"\0".join(out) + b"\0"


def _step_socket(args) -> str:
    from .stepsock import step_socket_path
    return step_socket_path(socket_path(args))


def cmd_prepare(args) -> int:
    # The per-step path: no gRPC, no protobuf here (stepsock.py says why).
    from . import stepsock
    from .errors import OciImageError
    try:
        mounts = (parse_mounts(args.default_mounts, "plugstack default_mounts")
                  + parse_mounts(args.mounts, "--oci-mounts"))
        try:
            pw = pwd.getpwuid(args.uid)
            user_name, home = pw.pw_name, pw.pw_dir
        except KeyError:
            user_name, home = os.environ.get("USER", f"user{args.uid}"), os.environ.get("HOME", "/")
        env_names = [n for n in (args.env_names or "").split(",") if n]
        # a PrepareStepRequest (proto/ociimage/v1/ociimage.proto), field for field
        req = {"job_id": args.job, "step_id": args.step, "uid": args.uid, "gid": args.gid,
               "image": args.image,
               "mounts": [{"source": s, "target": d, "read_only": ro} for s, d, ro in mounts],
               "workdir": args.workdir or "", "cwd": args.cwd or "", "writable": args.writable,
               "mount_home": args.mount_home, "entrypoint": args.entrypoint,
               "environment": read_job_env(args.job_env_fd), "env_names": env_names,
               "allow_sqfs": args.allow_sqfs, "node": args.node or "", "home": home,
               "user_name": user_name}
        show = None
        if args.progress != "none":  # one node of the step shows it (the plugin chooses)
            from .progress import LiveProgress, TextProgress
            node = f"{args.node}: " if args.node else ""
            show = LiveProgress(TextProgress(sys.stderr, prefix=f"{PREFIX}: {node}",
                                             tty=args.progress == "tty", interval=4.0,
                                             columns=args.columns))
        try:
            reply = stepsock.call(_step_socket(args), {"op": "prepare", "step": req},
                                  show, timeout=args.timeout)
        finally:
            if show is not None:
                show.stop()
        container = reply.get("container")
        if not isinstance(container, dict) or not container.get("ns_path"):
            return _die("oci-imaged answered the step's prepare without a container")
    except OciImageError as e:
        return _die(str(e))
    sys.stdout.buffer.write(_records(container))
    sys.stdout.flush()
    return 0


def cmd_release(args) -> int:
    from . import stepsock
    from .errors import OciImageError
    try:
        stepsock.call(_step_socket(args), {"op": "release", "job": args.job, "step": args.step},
                      timeout=args.timeout)
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
    from .sockclient import request
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
    from . import stepsock
    from .errors import OciImageError
    try:
        r = stepsock.call(_step_socket(args), {"op": "release-job", "job": args.job},
                          timeout=args.timeout)
    except OciImageError as e:
        return _die(f"cleaning up after job {args.job}: {e}")
    if r.get("steps") or r.get("leases"):
        print(f"job {args.job}: released {r.get('steps', 0)} step(s), {r.get('leases', 0)} lease(s)")
    return 0


def cmd_record_job(args) -> int:
    """sbatch has submitted a job pinned to REF@DIGEST: note the digest in the job's comment.

    So that eviction spares the image while the job waits (ociimage.slurm). Only the
    digest: squeue shows comments to everyone, and a name may be private. Best effort:
    the job runs the same without it, so this says one line and exits 0 on failure.
    """
    _full_site()
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


def main(argv: "list[str] | None" = None) -> int:
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
