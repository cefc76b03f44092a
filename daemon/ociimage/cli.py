"""`oci-image`: the command-line interface.

Standalone commands (`convert`, and any command given --cache-dir) work on this
machine without a daemon. Without --cache-dir, pull/ls/inspect/rm/prune go through
the local oci-imaged over its root-only socket, and publish over its user socket
(any user: the daemon publishes with the caller's own credentials, publisher.py).
This is an entry point: it turns typed errors into one-line messages and exit codes.

With --json (before or after the command) every command prints exactly one JSON
document on stdout: its result, or on failure {"error": MESSAGE, "code": STATUS,
"exit_code": N} (STATUS a gRPC status name, as on the daemon's user socket), while the
one-line message still goes to stderr (docs/json-output.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import __version__, logs
from .config import load_config, parse_size
from .errors import InvalidArgument, OciImageError

log = logging.getLogger("ociimage.cli")


def _human(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)


def _age(ts: Optional[float]) -> str:
    if not ts:
        return "-"
    s = max(0, time.time() - ts)
    for unit, secs in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= secs:
            return f"{int(s // secs)}{unit} ago"
    return f"{int(s)}s ago"


class UsageError(Exception):
    """A command line argparse refuses: exit code 2, as argparse's own."""

    status = "INVALID_ARGUMENT"
    exit_code = 2

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.line = f"{prog}: error: {message}"   # what argparse itself would print


class _Parser(argparse.ArgumentParser):
    """argparse, but a refused command line is raised (main reports it, in JSON if asked)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        raise UsageError(self.prog, message)


_JSON_HELP = ("print one JSON document on stdout: the result, or on failure "
              '{"error": MESSAGE, "code": STATUS, "exit_code": N} (the message also on stderr)')


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="oci-image",
        description="Pull OCI images and flatten them once into a SquashFS in the shared cache.")
    p.add_argument("--version", action="version", version=f"oci-image {__version__}")
    p.add_argument("--config", help="config file (default /etc/oci-image/oci-image.conf)")
    p.add_argument("--socket", help="daemon socket (default from the config file)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    # every command takes --json after its name too; SUPPRESS keeps the global one's value
    # when it is not given there
    json_after = _Parser(add_help=False)
    json_after.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="the same as --json before the command")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[json_after], **kw)

    def registry_opts(sp):
        sp.add_argument("--platform", help="os/arch[/variant] to select from a multi-arch image "
                                           "(default: this host's)")
        sp.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                        help="reach this registry over plain HTTP (loopback ones always are)")
        sp.add_argument("--trusted-squashfs", action="append", default=[],
                        metavar="HOST[:PORT][/REPO]",
                        help="also trust ready-to-mount SquashFS images from here "
                             "(adds to [registries] trusted_squashfs)")

    def squash_opts(sp):
        sp.add_argument("--compression", help="squashfs compressor (default zstd)")
        sp.add_argument("--level", type=int, help="compression level (default 3 for zstd)")
        sp.add_argument("--jobs", type=int, help="compressor threads (default: all cores)")

    c = command("convert", help="pull REF and write its flattened SquashFS to FILE (no daemon)")
    c.add_argument("reference", metavar="REF")
    c.add_argument("-o", "--output", required=True, metavar="FILE")
    registry_opts(c)
    squash_opts(c)

    pl = command("pull", help="pull REF into the shared cache; print its digest and path")
    pl.add_argument("reference", metavar="REF")
    pl.add_argument("--cache-dir", help="use this cache directly instead of the daemon")
    registry_opts(pl)
    squash_opts(pl)

    ls = command("ls", help="list cached images")
    ls.add_argument("--cache-dir", help="read this cache directly instead of asking the daemon")

    ins = command("inspect", help="show a cached image's metadata")
    ins.add_argument("digest", metavar="DIGEST")
    ins.add_argument("--cache-dir")

    rm = command("rm", help="remove cached images (refused while in use)")
    rm.add_argument("digests", nargs="+", metavar="DIGEST")
    rm.add_argument("--cache-dir")

    pub = command(
        "publish", help="push REF's SquashFS (converted first if needed) to TARGET as a "
                        "monolithic OCI image that points at REF (through oci-imaged, with "
                        "your registry credentials; standalone with --cache-dir)")
    pub.add_argument("reference", metavar="REF")
    pub.add_argument("target", metavar="TARGET",
                     help="REGISTRY/REPO[:TAG]; without a tag the image is pushed by digest "
                          "and found through REF's referrers")
    pub.add_argument("--cache-dir", help="publish standalone, from (and converting into) "
                                         "this cache directory, without oci-imaged")
    pub.add_argument("--user-socket", metavar="PATH",
                     help="oci-imaged's user socket (default: [daemon] prefetch_socket, or "
                          "oci-imaged-prefetch.sock next to --socket)")
    pub.add_argument("--chunk-size", help="upload blobs larger than this in chunks of it "
                                          "(default 32M)")
    pub.add_argument("--mount-from", action="append", default=[], metavar="REPO",
                     help="a repository of the target registry that may already hold the "
                          "SquashFS (cross-repository mount instead of an upload)")
    registry_opts(pub)
    squash_opts(pub)

    dv = command("devices", help="list the CDI devices this node's specs define "
                                 "([daemon] cdi_spec_dirs), for --oci-devices")
    dv.add_argument("--spec-dir", action="append", default=[], metavar="DIR",
                    help="read this directory instead (repeatable, in priority order)")

    pr = command("prune", help="evict unused images, least recently used first")
    pr.add_argument("--quota", help="evict only until the cache is under this size (e.g. 200G)")
    pr.add_argument("--cache-dir")
    return p


def _squash_options(args, cfg):
    from .squash import SquashOptions
    return SquashOptions(
        compression=args.compression or cfg.compression,
        level=args.level if args.level is not None else cfg.level,
        jobs=args.jobs if args.jobs is not None else (cfg.jobs or None),
    )


def _pull_options(args, cfg):
    from .pull import PullOptions
    from .registry.platform import parse_platform
    return PullOptions(squash=_squash_options(args, cfg),
                       platform=parse_platform(args.platform) if args.platform else None,
                       trusted_squashfs=list(cfg.trusted_squashfs)
                       + list(getattr(args, "trusted_squashfs", []) or []),
                       publish_to=cfg.publish_to)


def _client(args, cfg):
    from .registry.client import RegistryClient
    from .registry.credentials import CredentialStore
    return RegistryClient(credentials=CredentialStore(),
                          insecure_registries=list(cfg.insecure_registries) + args.insecure_registry,
                          limits=cfg.net_limits())


def _progress(args):
    from .progress import TextProgress
    return TextProgress(sys.stderr)


def _local_cache(args, cfg):
    from .cache import Cache
    return Cache.from_config(cfg, args.cache_dir)


def _entry_json(e) -> dict:
    return {"digest": e.digest, "path": str(e.path), "size": e.size, "last_used": e.last_used,
            "reference": e.reference, "meta": e.meta}


def cmd_convert(args, cfg) -> int:
    from .pull import convert_to_file
    out = Path(args.output)
    if out.is_dir():
        raise InvalidArgument(f"{out} is a directory; give a file name with -o")
    prog = _progress(args)
    try:
        meta = convert_to_file(_client(args, cfg), args.reference, out, _pull_options(args, cfg), prog)
    finally:
        prog.close()
    if args.json:
        print(json.dumps(meta, indent=1, sort_keys=True))
    else:
        print(f"{meta['digest']} {out}")
    return 0


def _daemon_client(args, cfg):
    from .client import DaemonClient
    return DaemonClient(args.socket or str(cfg.socket))


def cmd_pull(args, cfg) -> int:
    prog = _progress(args)
    try:
        if args.cache_dir:
            from .pull import pull_to_cache
            entry = pull_to_cache(_client(args, cfg), _local_cache(args, cfg), args.reference,
                                  _pull_options(args, cfg), prog)
            result = _entry_json(entry)
        else:
            result = _daemon_client(args, cfg).pull(args.reference, platform=args.platform,
                                                    progress=prog)
    finally:
        prog.close()
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True, default=str))
    else:
        print(f"{result['digest']} {result['path']}")
    return 0


def _uploading(show, every: float = 2.0):
    """show(ev), with the upload's bytes in the message, at most one such line every `every`
    seconds and the last (TextProgress counts bytes only for downloads, and takes each new
    message for news): `uploading  40% 12.0 MiB of 30.1 MiB`."""
    from .progress import ProgressEvent
    from .publisher import UPLOAD
    last = [-every]

    def rep(ev) -> None:
        if ev.phase == UPLOAD and ev.total and not ev.message:
            now = time.monotonic()
            if now - last[0] < every and ev.current < ev.total:
                return
            last[0] = now
            frac = min(1.0, ev.current / ev.total)
            ev = ProgressEvent(UPLOAD, f"uploading {frac * 100:3.0f}% {_human(ev.current)} of "
                                       f"{_human(ev.total)}", ev.current, ev.total)
        show(ev)
    return rep


def _user_socket(args, cfg) -> str:
    from .config import prefetch_path
    if args.user_socket:
        return args.user_socket
    if args.socket and cfg.prefetch_socket is None:
        return str(Path(args.socket).parent / "oci-imaged-prefetch.sock")
    path = prefetch_path(cfg)
    if path is None:
        raise InvalidArgument("this node's oci-imaged has no user socket ([daemon] "
                              "prefetch_socket = off): publish with --cache-dir DIR instead")
    return str(path)


def _publish_standalone(args, cfg, target, chunk, prog):
    from .cache import Cache
    from .monolithic import is_monolithic
    from .publisher import UPLOAD
    from .progress import ProgressEvent
    from .pull import publish_entry, pull_resolved_to_cache, resolve
    options = _pull_options(args, cfg)
    client = _client(args, cfg)
    cache = Cache.from_config(cfg, args.cache_dir)
    resolved = resolve(client, args.reference, options, prog)
    if is_monolithic(resolved.manifest):
        raise InvalidArgument(f"{args.reference} is already a monolithic (SquashFS) image; "
                              f"publish the image it was made from, or copy it with skopeo")
    entry = pull_resolved_to_cache(client, cache, resolved, options, prog)
    done = [0]

    def on_bytes(n: int) -> None:
        done[0] += n
        prog(ProgressEvent(UPLOAD, current=done[0], total=entry.size))

    published = publish_entry(client, entry, resolved, target, chunk_size=chunk,
                              mount_from=args.mount_from, on_bytes=on_bytes)
    return dict(published.to_json(), source=str(resolved.reference),
                source_digest=resolved.manifest.digest)


def _publish_through_daemon(args, cfg, chunk, prog):
    from . import sockclient
    for opt, given in (("--trusted-squashfs", args.trusted_squashfs),
                       ("--insecure-registry", args.insecure_registry),
                       ("--compression", args.compression), ("--level", args.level),
                       ("--jobs", args.jobs)):
        if given or given == 0:
            raise InvalidArgument(f"{opt} needs --cache-dir: oci-imaged publishes with its "
                                  f"own configuration")
    request = {"op": "publish", "image": args.reference, "target": args.target,
               "platform": args.platform or "",
               "mount_from": [m.strip() for m in args.mount_from if m.strip()]}
    if chunk is not None:
        request["chunk_size"] = chunk
    # the daemon ends every publish within publish_timeout and says so; a little more here
    reply = sockclient.stream(_user_socket(args, cfg), request, prog, cfg.publish_timeout + 60)
    reply.pop("state", None)
    return reply


def cmd_publish(args, cfg) -> int:
    from .monolithic import parse_target
    target = parse_target(args.target)
    chunk = parse_size(args.chunk_size, "--chunk-size") if args.chunk_size else None
    if chunk is not None and chunk < 1:
        raise InvalidArgument("--chunk-size must be at least 1 byte")
    prog = _progress(args)
    try:
        if args.cache_dir:
            result = _publish_standalone(args, cfg, target, chunk, _uploading(prog))
        else:
            result = _publish_through_daemon(args, cfg, chunk, _uploading(prog))
    finally:
        prog.close()
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True))
    else:
        print(f"{result['digest']} {result['reference']}")
    return 0


def _listing(args, cfg) -> List[dict]:
    if args.cache_dir:
        cache = _local_cache(args, cfg)
        leases = {}
        for le in cache.iter_leases():
            leases.setdefault(le.digest, []).append(f"{le.holder}@{le.node}")
        return [dict(_entry_json(e), users=leases.get(e.digest, []), jobs=[]) for e in cache.list()]
    return _daemon_client(args, cfg).list()


def cmd_ls(args, cfg) -> int:
    rows = _listing(args, cfg)
    if args.json:
        print(json.dumps(rows, indent=1, sort_keys=True, default=str))
        return 0
    print(f"{'DIGEST':<19} {'SIZE':>10} {'LAST USE':>10}  {'USED BY':<20} {'JOBS':<20} REFERENCE")
    for r in sorted(rows, key=lambda r: -(r.get("last_used") or 0)):
        users = ",".join(r.get("users") or []) or "-"
        jobs = ",".join(j.split()[0] for j in r.get("jobs") or []) or "-"
        print(f"{r['digest'][:19]:<19} {_human(r['size']):>10} {_age(r.get('last_used')):>10}  "
              f"{users[:20]:<20} {jobs[:20]:<20} {r.get('reference', '')}")
    return 0


def cmd_devices(args, cfg) -> int:
    """The node's CDI devices, read here (the specs are root's and world-readable)."""
    from .runtime import cdi
    registry = cdi.Registry(args.spec_dir or cfg.cdi_spec_dirs)
    rows = []
    errors = [str(e) for e in registry.errors]
    for name in registry.devices():
        try:
            edits = registry.resolve([name])
        except cdi.CDIError as e:  # defined twice at one priority: unusable
            errors.append(str(e))
            continue
        rows.append({"name": name, "spec": edits.spec_files[-1],
                     "device_nodes": [n.path for n in edits.device_nodes],
                     "mounts": [m.container_path for m in edits.mounts],
                     "env": list(edits.env), "hooks": [h.hook_name for h in edits.hooks]})
    if args.json:
        print(json.dumps({"spec_dirs": registry.dirs, "devices": rows, "errors": errors},
                         indent=1, sort_keys=True))
        return 0
    for e in errors:
        print(f"oci-image: warning: {e}", file=sys.stderr)
    if not rows:
        print(f"no CDI devices in {' '.join(registry.dirs)}", file=sys.stderr)
        return 0
    print(f"{'DEVICE':<40} SPEC")
    for r in rows:
        print(f"{r['name']:<40} {r['spec']}")
    return 0


def _full_digest(args, cfg, prefix: str) -> str:
    if prefix.startswith("sha256:") and len(prefix) == 71:
        return prefix
    matches = [r["digest"] for r in _listing(args, cfg) if r["digest"].startswith(prefix)
               or r["digest"].split(":", 1)[-1].startswith(prefix)]
    if len(matches) != 1:
        raise InvalidArgument(f"{prefix!r} matches {len(matches)} cached images; give more of the digest")
    return matches[0]


def cmd_inspect(args, cfg) -> int:
    digest = _full_digest(args, cfg, args.digest)
    if args.cache_dir:
        from .errors import NotFound
        e = _local_cache(args, cfg).get(digest)
        if e is None:
            raise NotFound(f"image {digest} is not in the cache")
        info = _entry_json(e)
    else:
        info = _daemon_client(args, cfg).inspect(digest)
    print(json.dumps(info, indent=1, sort_keys=True, default=str))
    return 0


def cmd_rm(args, cfg) -> int:
    removed = []
    for d in args.digests:   # in order; the first that cannot be removed ends the command
        digest = _full_digest(args, cfg, d)
        if args.cache_dir:
            _local_cache(args, cfg).remove(digest)
        else:
            _daemon_client(args, cfg).remove(digest)
        removed.append({"digest": digest})
        if not args.json:
            print(f"removed {digest}")
    if args.json:
        print(json.dumps(removed, indent=1, sort_keys=True))
    return 0


def cmd_prune(args, cfg) -> int:
    quota = parse_size(args.quota, "--quota") if args.quota else None
    kept: List[str] = []
    if args.cache_dir:  # no daemon, so no Slurm view: spares leased images only
        removed = [_entry_json(e) for e in _local_cache(args, cfg).prune(quota=quota)]
    else:
        removed, kept = _daemon_client(args, cfg).prune_detail(quota=quota)
    if args.json:
        print(json.dumps(removed, indent=1, sort_keys=True, default=str))
    else:
        for r in removed:
            print(f"removed {r['digest']} ({_human(r['size'])})")
        for d in kept:
            print(f"kept {d} (needed by pending or running jobs)")
        print(f"freed {_human(sum(r['size'] for r in removed))}")
    return 0


COMMANDS = {"convert": cmd_convert, "pull": cmd_pull, "ls": cmd_ls, "inspect": cmd_inspect,
            "rm": cmd_rm, "prune": cmd_prune, "publish": cmd_publish, "devices": cmd_devices}


def _wants_json(argv: List[str]) -> bool:
    """--json anywhere before a `--` (known before parsing, so a refused command line is
    reported in JSON too)."""
    return "--json" in (argv[:argv.index("--")] if "--" in argv else argv)


def _fail(as_json: bool, line: str, message: str, code: str, exit_code: int) -> int:
    """Report a failure: its line on stderr, and with --json its document on stdout."""
    print(line, file=sys.stderr)
    if as_json:
        print(json.dumps({"error": message, "code": code, "exit_code": exit_code},
                         sort_keys=True))
    return exit_code


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json = _wants_json(argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        return _fail(as_json, e.line, str(e), e.status, e.exit_code)
    logs.setup({0: "warning", 1: "info"}.get(args.verbose, "debug"))
    try:
        cfg = load_config(args.config)
        return COMMANDS[args.command](args, cfg)
    except OciImageError as e:
        return _fail(as_json, f"oci-image: error: {e}", str(e), e.status, e.exit_code)
    except KeyboardInterrupt:
        return _fail(as_json, "oci-image: interrupted", "interrupted", "CANCELLED", 130)
    except BrokenPipeError:
        return 141
    except Exception as e:  # an entry point never shows a traceback unless asked to
        log.debug("internal error", exc_info=True)
        message = f"internal error: {type(e).__name__}: {e} (run with -vv for details)"
        return _fail(as_json, f"oci-image: {message}", message, "INTERNAL", 70)


if __name__ == "__main__":
    sys.exit(main())
