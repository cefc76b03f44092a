"""The step client the SPANK plugin execs (`oci-image-step`). Kept small: it is on the per-step path.

    submit      (srun/sbatch/salloc, as the user: every option checked as the nodes check it,
                the tag pinned, a prefetch started) -> setenv/atexit records
    prepare     (slurmstepd, root, from init_post_opt) -> the step's namespace and its records
    release     (slurmstepd's exit, root, detached)
    cleanup-job (slurmd's job epilog, root, detached: what the job left on the node)
    prefetch    (started by submit, detached, as the user)
    record-job  (sbatch's exit, as the user: the digest goes into the submitted job's comment)

The arguments are ociimage.contract.STEP_COMMANDS: the plugin passes the users' options and
its plugstack.conf arguments raw (--option NAME VALUE, --plugstack KEY=VALUE), and they are
parsed and checked here (stepargs.py, plugstack.py), once. Records go to the plugin as
KEY\\0VALUE\\0 on fd 4 (contract.RECORDS; prepare adds the namespace's descriptor).
Progress and errors go to stderr, printable lines only: the plugin passes them on as they
are, to the user's terminal or srun's output. Exit status 0 only on success.
"""

from __future__ import annotations

import os
import pwd
import sys

from . import contract
from .stepargs import (build_parser as _build_parser, join_pairs, parse_devices, parse_mounts,
                       resolve_options)

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


def send_records(args, records, fds=()) -> None:
    """[(key, value), ...] to the plugin (--records-fd, its 4), with descriptors (prepare's:
    the mount namespace, then with --oci-remap-root the user namespace). stderr is closed
    first: the plugin reads it to its end before these."""
    import socket
    if any("\0" in k or "\0" in v for k, v in records):  # it would split into other records
        raise ValueError("a record holds a NUL")
    data = b"".join(k.encode() + b"\0" + v.encode("utf-8", "surrogateescape") + b"\0"
                    for k, v in records)
    if fds and not data:
        raise ValueError("a descriptor needs a record to travel with")
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # (the plugin gives prepare /dev/null there; by hand it may be the pipe)
    os.dup2(null, 2)
    os.close(null)
    sock = socket.socket(fileno=args.records_fd)
    try:
        sent = socket.send_fds(sock, [data], list(fds)) if fds else 0
        sock.sendall(data[sent:])
    finally:
        sock.close()


def _spawn_detached(argv) -> None:
    """Start argv and do not wait (a prefetch): its own session, nice 10, no terminal."""
    import subprocess
    subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                     preexec_fn=lambda: os.nice(10))


def cmd_submit(args, plug) -> int:
    """Check every option (as every node would) and pin the reference once, at submit,
    with the user's own credentials. main() has checked the options (resolve_options)."""
    import time
    from .errors import OciImageError
    image = args.image
    records = []
    if image and args.caller == "srun":
        from .srunargs import asks_multi_prog, chdir_of, parent_argv
        srun_argv = parent_argv()  # SPANK shows a plugin none of srun's own options
        if args.entrypoint and asks_multi_prog(srun_argv):
            return _die("--oci-entrypoint (or OCI_ENTRYPOINT=1) cannot be used with "
                        "srun --multi-prog: each task's program comes from the "
                        "--multi-prog file; drop one of them", 2)
        # srun takes SLURM_WORKING_DIR as -D where its command line has none
        chdir = chdir_of(srun_argv) or os.environ.get("SLURM_WORKING_DIR") or None
        if chdir:  # where the tasks start in the container (prepare: stepenv.submit_cwd)
            records.append(("setenv", "OCI_SUBMIT_CHDIR=" + os.path.normpath(
                os.path.join(os.getcwd(), chdir))))
    if not image or image.startswith("/") or args.inherited_pin:
        send_records(args, records)  # nothing to pin: no image, a SquashFS file, or pinned
        return 0
    since = int(time.time())
    insecure = [x for x in os.environ.get("OCI_IMAGE_INSECURE_REGISTRIES", "").split(",") if x]
    try:
        pinned = None
        if plug.prefetch_socket and _registry_of(image) not in insecure:
            pinned = _resolve_by_daemon(plug.prefetch_socket, image)
        if pinned is None:  # no daemon here, or it could not say: ask the registry ourselves
            pinned = _resolve_here(image, insecure)
    except OciImageError as e:
        return _die(f"--oci-image={image}: {e}", e.exit_code)
    records.append(("setenv", f"OCI_IMAGE_PINNED={pinned}"))
    # sbatch/salloc jobs may wait in the queue: worth converting meanwhile. An srun's own
    # step starts right away and its nodes pull anyway; a prefetch would only compete.
    if args.caller in ("sbatch", "salloc") and plug.prefetch_socket:
        _spawn_detached([plug.step_client, "prefetch", "--socket", plug.prefetch_socket, "--image", pinned,
                          "--node", os.uname().nodename.split(".")[0]])
    if args.caller == "sbatch" and plug.record_job:
        records += [("atexit", a) for a in ("record-job", "--image", pinned, "--since",
                                            str(since), "--sid", str(os.getsid(0)))]
    send_records(args, records)
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


def _records(container: dict, launcher: str):
    """The StepContainer (protobuf's JSON mapping: defaults left out) as prepare's records."""
    out = [("cwd", container.get("cwd") or "/")]
    out += [("env", kv) for kv in container.get("set_env", ())]
    out += [("unsetenv", name) for name in container.get("unset_env", ())]
    if container.get("argv_prefix"):  # only with --oci-entrypoint and an image that has one
        out += [("entrypoint", encode_entrypoint(container["argv_prefix"]).decode("ascii")),
                ("launcher", launcher)]
    return out


def _mount_message(m) -> dict:
    """A parsed --oci-mounts item as a Mount message (a bind's kind stays the default, "")."""
    out = {"source": m.source, "target": m.target, "read_only": m.read_only}
    if m.kind != "bind":
        out["kind"] = m.kind
    if m.options:
        out["options"] = "+".join(m.options)
    return out


class _Step:
    """What prepare and release know of the step: Slurm's ids (arguments), the job's
    environment (fd 3), this node's name and the daemon's sockets."""

    def __init__(self, args, plug):
        from . import plugstack, stepenv
        self.env = stepenv.read_job_env(args.job_env_fd)
        self.step = int(args.step)
        self.node = stepenv.node_name(self.env, self.step, args.node_id, contract.BATCH_STEP)
        self.socket = plugstack.socket_for(plug.socket, self.node)
        self.marker = plugstack.job_marker(plug.socket, self.node, args.job)

    def step_socket(self) -> str:
        from .stepsock import step_socket_path
        return step_socket_path(self.socket)


def cmd_prepare(args, plug, where) -> int:
    # The per-step path: no gRPC, no protobuf here (stepsock.py says why).
    from . import stepenv, stepsock
    from .errors import OciImageError
    if not (args.image or args.container_name) or (
            where.step == contract.BATCH_STEP and not (plug.batch_in_image or args.batch_in_image)):
        send_records(args, [])  # no image asked for, or a batch script: it runs on the host
        return 0
    try:
        mounts = (parse_mounts(plug.default_mounts, "plugstack default_mounts")
                  + parse_mounts(args.mounts, "--oci-mounts"))
        try:
            pw = pwd.getpwuid(args.uid)
            user_name, home = pw.pw_name, pw.pw_dir
        except KeyError:
            user_name, home = f"user{args.uid}", "/"
        env_names = [n for n in (args.env_names or "").split(",") if n]
        # a PrepareStepRequest (proto/ociimage/v1/ociimage.proto), field for field
        req = {"job_id": args.job, "step_id": args.step, "uid": args.uid, "gid": args.gid,
               "image": args.image,
               "mounts": [_mount_message(m) for m in mounts],
               "workdir": args.workdir or "", "cwd": stepenv.submit_cwd(where.env),
               "writable": args.writable, "mount_home": args.mount_home,
               "remap_root": args.remap_root,
               "entrypoint": args.entrypoint, "environment": where.env, "env_names": env_names,
               "allow_sqfs": plug.allow_sqfs, "node": where.node, "home": home,
               "user_name": user_name, "container_name": args.container_name or "",
               "devices": parse_devices(args.devices) if args.devices else []}
        _mark(where.marker)
        mode, columns = stepenv.progress_mode(where.env, where.step, args.node_id,
                                              contract.BATCH_STEP)
        show = None
        if mode != "none":  # one node of the step shows it
            from .progress import LiveProgress, TextProgress
            show = LiveProgress(TextProgress(sys.stderr, prefix=f"{PREFIX}: {where.node}: ",
                                             tty=mode == "tty", interval=4.0, columns=columns))
        try:
            reply = stepsock.call(where.step_socket(), {"op": "prepare", "step": req}, show,
                                  timeout=1e9)  # a first pull converts; the daemon bounds it
        finally:
            if show is not None:
                show.stop()
        container = reply.get("container")
        if not isinstance(container, dict) or not container.get("ns_path"):
            return _die("oci-imaged answered the step's prepare without a container")
        fds = [stepenv.open_namespace(container)]
        if args.remap_root:  # the tasks join it as the user, after the mount namespace
            fds.append(stepenv.open_user_namespace(container))
    except OciImageError as e:
        return _die(str(e))
    except (OSError, ValueError) as e:
        return _die(f"the step's namespace: {e}")
    send_records(args, _records(container, plug.launcher), fds)
    return 0


def _mark(marker: str) -> None:
    """The job used an image on this node: its end has something to release (cleanup-job)."""
    os.makedirs(os.path.dirname(marker), mode=0o700, exist_ok=True)
    os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))


def cmd_release(args, plug, where) -> int:
    from . import stepsock
    from .errors import OciImageError
    try:
        stepsock.call(where.step_socket(), {"op": "release", "job": args.job, "step": args.step},
                      timeout=60.0)
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
        r, fd = request(args.socket, {"op": "prefetch", "image": args.image},
                        timeout=args.timeout)
    except OciImageError as e:
        return _die(f"prefetch {args.image}: {e}")
    if fd is not None:  # never asked for one
        os.close(fd)
    print(f"{r.get('state')} {r.get('digest')}" + (f" ({r['reason']})" if r.get("reason") else ""))
    return 0


def cmd_cleanup_job(args, plug) -> int:
    """The job ended on this node: release whatever its steps left (a killed slurmstepd).
    Every job's end runs this; one without a marker (no step used an image here) ends at once."""
    from . import plugstack, stepsock
    from .errors import OciImageError
    marker = plugstack.job_marker(plug.socket, args.node, args.job)
    if not os.path.exists(marker):
        return 0
    from .stepsock import step_socket_path
    try:
        r = stepsock.call(step_socket_path(plugstack.socket_for(plug.socket, args.node)),
                          {"op": "release-job", "job": args.job}, timeout=args.timeout)
    except OciImageError as e:
        return _die(f"cleaning up after job {args.job}: {e}")
    os.unlink(marker)
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
        from .progress import printable
        sys.stderr.write(f"{PREFIX}: note: the image was not recorded in the job's comment: "
                         f"{printable(str(e))}\n")
        return 0
    if args.verbose:
        print(f"job {job}: oci-image={digest}")
    return 0


def build_parser():
    return _build_parser(__doc__.splitlines()[0])


def main(argv: "list[str] | None" = None) -> int:
    args = build_parser().parse_args(join_pairs(sys.argv[1:] if argv is None else list(argv)))
    try:
        from .errors import OciImageError
        plug = where = None
        try:
            if args.command in ("submit", "prepare", "release", "cleanup-job"):
                from . import plugstack
                plug = plugstack.parse(args.plugstack)
            if args.command in ("prepare", "release"):
                where = _Step(args, plug)
            if args.command in ("submit", "prepare"):
                # the reference's form: parsed where it is resolved (here, or this host's
                # daemon at submit; the node's daemon at prepare), with the same parser
                resolve_options(args, os.environ if args.command == "submit" else where.env,
                                parse_reference=False)
                if args.remap_root and not plug.allow_remap_root:
                    return _die("--oci-remap-root: this site does not allow it (plugstack.conf "
                                "allow_remap_root=no); run without it", 2)
        except OciImageError as e:
            return _die(str(e), e.exit_code)
        except (OSError, ValueError) as e:
            return _die(f"the step: {e}", 2)
        if args.command == "submit":
            return cmd_submit(args, plug)
        if args.command == "prepare":
            return cmd_prepare(args, plug, where)
        if args.command == "release":
            return cmd_release(args, plug, where)
        if args.command == "cleanup-job":
            return cmd_cleanup_job(args, plug)
        if args.command == "prefetch":
            return cmd_prefetch(args)
        return cmd_record_job(args)
    except KeyboardInterrupt:
        return _die("interrupted", 130)
    except Exception as e:  # the user sees one line, never a traceback
        return _die(f"internal error: {type(e).__name__}: {e}", 70)


if __name__ == "__main__":
    sys.exit(main())
