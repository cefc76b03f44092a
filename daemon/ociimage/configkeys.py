"""The daemon's and the CLI's configuration keys (/etc/oci-image/oci-image.conf), declared once.

ociimage.config accepts exactly these keys; scripts/gencontract.py writes the tables of
docs/configuration.md from them (tests/test_contract.py: the committed file is fresh).
Texts are markdown.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Tuple


class Key(NamedTuple):
    section: str
    name: str
    default: str   # as docs/configuration.md shows it (markdown)
    meaning: str   # markdown


#: what each section is for, above its table ("" for none)
SECTIONS: Dict[str, str] = {
    "cache": "",
    "daemon": "",
    "registries": "",
    "squash": "",
    "slurm": ("Which pending and running jobs need which cached image, so that eviction spares "
              "them\n(the Slurm-aware cache in the README)."),
}

#: what follows a section's table ("" for nothing)
AFTER: Dict[str, str] = {
    "registries": """Whatever the configuration, the daemon never connects to link-local addresses
(169.254.0.0/16, fe80::/10, where cloud metadata services answer), to `0.0.0.0`
or `::`, to multicast or broadcast addresses, nor to the metadata addresses
100.100.100.200 and fd00:ec2::254: not as a registry, not after a redirect, not
as a token realm. Names are resolved once per connection and the address
checked is the one connected to, so a name that resolves differently the next
time (DNS rebinding) gets nowhere. Credentials never follow a redirect to
another origin.""",
}

CONFIG_KEYS: Tuple[Key, ...] = (
    Key('cache', 'dir', '`/var/lib/oci-image/cache`',
        'The shared cache. Must be the same directory on every node (a shared '
        'filesystem) so that each image is converted once per cluster. Converters on '
        'different nodes exclude each other with `flock()` where it is coherent across '
        "nodes, else with claim files (`locking`). Absolute path. Root's alone: "
        'directories 0700, files 0600 (images, metadata, leases, locks), created so; a '
        'cache left by an older version (0755/0644) is narrowed when the daemon starts.'
        ' On NFS the cache must be mounted with `-o lookupcache=positive` (or `none`): '
        'with the default `lookupcache=all` a node caches "does not exist" answers and '
        'may not see an image another node just published; the daemon refuses to start '
        'without it (one line naming the option), and refuses `-o nocto` (directory '
        'listings, the leases among them, may then be `acdirmax` stale).'),
    Key('cache', 'quota', 'none',
        'Size above which unused images are evicted, least recently used first, after '
        'each conversion: `500G`, `2T`, `1024` (bytes; K/M/G/T are powers of 1024). '
        'Images held by a lease are never evicted.'),
    Key('cache', 'lease_ttl', '`600`',
        "Seconds a node's leases stay valid without its heartbeat. The daemon refreshes"
        ' one heartbeat file per node (`leases/<node>/alive`, whose mtime is the '
        'expiry) every `min(30, lease_ttl/4)` s, whatever the number of leases; leases '
        "are written once. Expiries are set and compared in the file server's time (the"
        " mtime of `leases/<node>/now`, touched for it), so on NFS nodes' clocks need "
        'not agree (NFS only: Lustre, GPFS, CephFS and BeeGFS stamp a touched file with'
        " the client's clock, so there the nodes' clocks must agree to well within "
        "`lease_ttl`, e.g. NTP). Where `now` cannot be touched the node's own clock is "
        'used, with a warning. A node that died: its leases stop counting after this '
        'and are deleted by the next `prune`/`rm` on any node. A lease no step of its '
        'node holds (a leaked release) is dropped by that node within about '
        '`lease_ttl`.'),
    Key('cache', 'lock_timeout', '`60`',
        "Seconds to wait for an image's cache lock in the short critical sections "
        '(removing or evicting an image; adding a lease takes no lock). Held longer '
        'means a stuck peer node: the request fails with one line (`timed out after … '
        'waiting for the cache lock of …`) instead of hanging. At least 1.'),
    Key('cache', 'convert_timeout', '`3600`',
        "Seconds to wait for another node's conversion of the same image (the per-image"
        ' lock), then the same one-line error. At least 1.'),
    Key('cache', 'locking', '`auto`',
        'How nodes agree on who converts an image: `flock` (an `flock()` per image; a '
        'waiting node blocks in the kernel: a few calls on the lock file per '
        'conversion), `claim` (a claim file per image, made with an atomic `link()`, '
        'kept fresh by a heartbeat every `min(5, claim_stale/4)` s; waiters look at the'
        ' published entry and the claim at most once a second), or `auto`: from the '
        "cache's mount (`/proc/self/mountinfo`), `flock` only where it is known to be "
        'coherent: local filesystems (ext4, xfs, btrfs, tmpfs, …: a single node), NFS '
        'that forwards locks (no `nolock`, no `local_lock=flock|all`), Lustre with `-o '
        'flock`, GPFS, CephFS, GFS2, OCFS2; `claim` everywhere else, among them BeeGFS '
        '(its flock is node-local unless the clients set `tuneUseGlobalFileLocks=true`:'
        ' then set `locking = flock`), FUSE filesystems and unknown types. The daemon '
        'logs the mode and why at start (`cache locking`). Every node must use the same'
        ' mode: the first daemon to start records it in `<dir>/locking.json` (only once'
        ' its mount checks passed: a daemon that fails to start records nothing), and a'
        ' daemon (or CLI) whose mode differs refuses to start with one line naming '
        'both. An `oci-image` CLI run checks a recorded mode but never records one. To '
        'switch the cluster: stop `oci-imaged` on every node (and any `oci-image` CLI '
        'run), set `locking` on every node, delete `<dir>/locking.json`, start the '
        'daemons.'),
    Key('cache', 'claim_stale', '`60`',
        '`locking = claim`: seconds a claim may go unchanged before a waiting node '
        "takes it over (the claimer died). Measured on the waiter's own monotonic clock"
        ' from the last change it saw; no clocks are compared across nodes. A claimer '
        'that lost its claim (stalled longer than this) notices at its next heartbeat '
        'or before publishing, and publishes nothing. On NFS keep it well above the '
        "attribute cache time (`actimeo`, `acregmax`). The daemon's housekeeping takes "
        "over dead claimers' claims (about every `claim_stale/2`) even when no node "
        "waits; `oci-image rm` and a node waiting for another's registry question wait "
        'at least `claim_stale` plus a poll or two (more than `lock_timeout`, or 30 s, '
        'when this is longer), so they take a dead claim over instead of timing out. At'
        ' least 2.'),
    Key('daemon', 'socket', '`/run/oci-image/oci-imaged.sock`',
        'The gRPC socket, mode 0600 (root only). Next to it the daemon also listens on '
        'the step socket, `oci-imaged-step.sock` (the name with `.sock` replaced by '
        '`-step.sock`), mode 0600 and root callers only, where the step client prepares '
        'and releases steps without gRPC.'),
    Key('daemon', 'prefetch_socket', '`oci-imaged-prefetch.sock` next to `socket`',
        'The user socket, mode 0666. Not gRPC (gRPC cannot tell the daemon who calls): '
        "one JSON request line per connection, and the kernel gives the caller's uid "
        "(`SO_PEERCRED`). Serves `resolve` (srun/sbatch/salloc at submit: a tag's digest "
        "at the registry now, with **the caller's** credential files, read as the "
        'caller), `prefetch` (srun/sbatch/salloc: pull a pinned digest with **the '
        "caller's** registry credentials), `open` (the pyxis importer: a read-only "
        'descriptor of a cached image, after the registry confirms the caller may pull '
        'it) and `publish` (`oci-image publish` by any user: converted in the shared '
        "cache and pushed with **the caller's** credentials, "
        '[monolithic.md](monolithic.md#publishing-through-oci-imaged)). `off` disables '
        'it.'),
    Key('daemon', 'prefetch_rate', '`30`',
        'New prefetch pulls started per minute, all users together (0: none).'),
    Key('daemon', 'prefetch_rate_per_user', '`10`',
        'New prefetch pulls started per minute for one uid; beyond, the answer is '
        "`skipped (this user's prefetch limit)`."),
    Key('daemon', 'prefetch_running', '`4`',
        'Prefetch pulls running at once, all users together.'),
    Key('daemon', 'prefetch_running_per_user', '`2`',
        'Prefetch pulls running at once for one uid.'),
    Key('daemon', 'prefetch_request_timeout', '`5`',
        'Seconds from connect until the request line must be complete; a silent or '
        'trickling client then gets one error line and is disconnected. Requests are at'
        ' most 4096 bytes; at most 8 connections per uid and 64 in all are served at '
        'once (more get a one-line `busy`).'),
    Key('daemon', 'publish_running', '`4`',
        '`oci-image publish` requests the daemon serves at once, all users together; '
        'one more fails at once (`RESOURCE_EXHAUSTED`, one line). `0`: the daemon '
        'publishes nothing for users (they can still publish from a cache of their own '
        'with `--cache-dir`).'),
    Key('daemon', 'publish_running_per_user', '`1`',
        'Publishes one uid may have running on this node at once (`0`: none).'),
    Key('daemon', 'publish_timeout', '`3600`',
        'Seconds one publish may take, its conversion and upload included; then it is '
        'abandoned (downloads and uploads cut, nothing partial kept) and the user gets '
        'one line naming this key. A publish is also abandoned when its client goes '
        'away (Ctrl-C), or when a progress line cannot be written to it within 30 s (it'
        ' does not read). At least 1.'),
    Key('daemon', 'runtime_dir', '`/run/oci-image`',
        'Per-node state: image mountpoints (`images/`), step namespaces (`steps/`). '
        'Must be node-local.'),
    Key('daemon', 'containers_dir', '`containers/` in `runtime_dir`',
        "Named containers (`--oci-name`): each job's writable layers on this node, "
        '`<dir>/<job>/<name>/{upper,work}`, kept across the steps of the job that name '
        'them and removed when the job ends on the node. Must be node-local and root\'s '
        "alone (the daemon creates it 0700; it refuses one that is not root's or is "
        'writable by others). Under the default `/run` the layers live in node memory and '
        'share `/run` with everything else there: best a filesystem of its own (a local '
        'partition, or a size-limited tmpfs), since a task that fills it fills whatever '
        'else lives on it; never the shared cache. Absolute path.'),
    Key('daemon', 'containers_min_free', '`1G`',
        'Space `containers_dir` must have free before a step uses a named container '
        '(`500M`, `2G`; K/M/G/T are powers of 1024; `0`: no check); below it the step '
        'fails with one line naming the node. A task that fills the disk itself gets '
        '`ENOSPC` (`No space left on device`) from its writes.'),
    Key('daemon', 'containers_per_job', '`16`',
        'How many named containers one job may have on a node (each is a mount, two with '
        '`--oci-remap-root`, in every later step\'s mount table); one more is refused in one '
        'line.'),
    Key('daemon', 'node', 'host name',
        "The name this node's leases carry."),
    Key('daemon', 'metrics', 'off',
        '`HOST:PORT` for the Prometheus endpoint, e.g. `127.0.0.1:9464`.'),
    Key('daemon', 'log_level', '`warning`',
        '`debug`, `info`, `warning` or `error`. Logs are key=value lines on stderr (the'
        ' journal under systemd); `oci-imaged --log-json` writes JSON lines.'),
    Key('daemon', 'mount_idle', '`60`',
        'Seconds an image stays loop-mounted on a node after its last step ended (so '
        'back-to-back steps do not remount).'),
    Key('daemon', 'hooks_dir', '`/etc/oci-image/hooks.d`',
        'Step hooks: executables run as root, in sorted order, for each step after its '
        'namespace is built and before its tasks enter it ([hooks.md](hooks.md)). Must '
        'be owned by root, not group/other-writable. Absolute path.'),
    Key('daemon', 'hooks_timeout', '`60`',
        'Seconds a hook may run; then its process group is killed and the step fails. '
        'At least 1.'),
    Key('daemon', 'cdi_spec_dirs', '`/etc/cdi /var/run/cdi`',
        'Where the CDI (Container Device Interface) specs that `--oci-devices` and '
        '`gpu_cdi_kind` draw on are, space separated, in priority order (a device in a '
        'later directory overrides the same device in an earlier one). Each directory '
        'and spec file must be owned by root and not group/other-writable (root binds '
        'the host paths a spec names); other files are refused, one line each in the log '
        'and in `oci-image devices`. Absolute paths. See [gpu.md](gpu.md).'),
    Key('daemon', 'gpu_cdi_kind', 'empty (off)',
        "A CDI kind, e.g. `nvidia.com/gpu`: the GPUs Slurm allocated to a step "
        "(`SLURM_STEP_GPUS`, for the batch script `SLURM_JOB_GPUS`) arrive in its "
        "container as the devices `KIND=INDEX` of this node's CDI specs, as if the user "
        "had named them in `--oci-devices`. Empty: only `--oci-devices`."),
    Key('daemon', 'max_pulls_per_uid', '`4`',
        "Distinct image pulls one user (the job's uid) may have in progress on this "
        'node. One more fails at once with `RESOURCE_EXHAUSTED` and a one-line message;'
        " other users' requests are not affected. Requests without a uid (root's own "
        '`oci-image pull`, prefetch, which is bounded by `prefetch_rate`) are not '
        'capped.'),
    Key('daemon', 'max_requests_per_uid', '`64`',
        'Pull and PrepareStep requests one user may have waiting on pulls on this node '
        '(many steps starting with the same new image are one pull and many requests). At'
        " least `max_pulls_per_uid`. The daemon's gRPC socket serves 256 requests at once"
        ' and its step socket 4096, so one user cannot hold them all; a cache hit takes '
        'no slot.'),
    Key('daemon', 'stop_timeout', '`5`',
        'Seconds SIGTERM gives in-flight requests before `oci-imaged` exits anyway. '
        'Pulls are abandoned at once (their downloads cut, their temporary files '
        "removed, nothing partial published), waits for another node's cache lock end "
        'too. Step namespaces and mounts stay for the next daemon.'),
    Key('registries', 'insecure', 'none',
        'Registries (`host[:port]`, a host, or a network such as `10.1.0.0/16`; comma '
        'separated) reached over plain HTTP. Registries on loopback addresses always '
        'are (a loopback *name* such as `localhost` must also resolve to a loopback '
        'address). Nothing else is contacted without TLS: a redirect (e.g. to blob '
        'storage) or a token realm on plain http to a host not listed here is refused '
        'with a one-line error, so list those hosts too if they are meant.'),
    Key('registries', 'connect_timeout', '`10`',
        'Seconds to open a connection to a registry, token server or blob storage (TLS '
        'handshake included).'),
    Key('registries', 'stall_timeout', '`30`',
        'Seconds a request may receive no byte at all; that attempt then fails and is '
        'retried (a download resumes where it was, with `Range`).'),
    Key('registries', 'request_timeout', '`60`',
        'Overall seconds for one registry operation: a manifest or config fetch, a '
        'token request, a ping, an existence check, one upload step (retries and their '
        'back-off included). A blob download or upload gets this plus its size at '
        '`min_rate`.'),
    Key('registries', 'min_rate', '`16K`',
        'Bytes per second (K/M: powers of 1024) a blob download must average over '
        '`rate_window`, or it is abandoned with a one-line error and not retried: a '
        'server that trickles bytes cannot hold a daemon thread. `0` turns the minimum '
        'off (the deadline above still applies).'),
    Key('registries', 'rate_window', '`60`',
        'Seconds over which `min_rate` is measured; also the least time any download '
        'gets.'),
    Key('registries', 'trusted_squashfs', 'none',
        'Sources whose ready-made SquashFS (monolithic) images may be kernel-mounted '
        'without conversion.'),
    Key('registries', 'publish_to', 'none',
        'A repository to publish every conversion to, as a monolithic image.'),
    Key('squash', 'compression', '`zstd`',
        'SquashFS compressor: zstd, gzip, xz, lz4, lzo, lzma.'),
    Key('squash', 'level', '`3`',
        'Compression level (zstd 1–22). zstd 3 is about 20× faster than zstd 15 for '
        'about 8% more bytes.'),
    Key('squash', 'jobs', '`0`',
        'Compressor threads; 0 means one per core.'),
    Key('slurm', 'jobs', '`auto`',
        'How to list jobs: `pyslurm` (only when built for the installed Slurm), `cli` '
        '(`squeue --json`), `auto` (pyslurm if it matches, else the CLI if Slurm is '
        'configured, else off), `off` (eviction spares only leased images).'),
    Key('slurm', 'conf', '',
        "The `slurm.conf` for `squeue` (default: `SLURM_CONF` or the client's default)."),
    Key('slurm', 'refresh', '`30`',
        'Seconds a job list is reused, by every node: the node that asks slurmctld '
        'keeps the jobs that name an image in a shared record of the cache, and the '
        'others reuse it while it is younger than this, so the cluster asks at most '
        'once per `refresh`, and only when it evicts (`docs/scale.md`).'),
)


def known() -> Dict[str, Tuple[str, ...]]:
    """{section: (key, ...)} in the order of the tables."""
    out: Dict[str, Tuple[str, ...]] = {}
    for k in CONFIG_KEYS:
        out[k.section] = out.get(k.section, ()) + (k.name,)
    return out
