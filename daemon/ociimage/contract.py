"""The contract with users and admins, declared once.

What srun/sbatch/salloc users type (the SPANK options and their environment
variables), what admins write in plugstack.conf, the exit codes, the step
client's subcommands and the records between the plugin and the step client.
Everything that shows or parses these is generated from here by
scripts/gencontract.py (plugin/options_gen.h: the C option table and the step
client's argument names; the README's tables; docs/man) or built from it at
run time (the step client's argparse parser, ociimage.stepargs), and
tests/test_contract.py fails when a generated file is stale.

Plain Python data, not TOML: Python 3.9 (RHEL 9) has no tomllib, and the step
client imports this module on every submit and step, so it stays free of
imports: not even typing (its import alone costs a step 11 ms).
"""

from __future__ import annotations

from collections import namedtuple

DEFAULT_SOCKET = "/run/oci-image/oci-imaged.sock"
DEFAULT_PREFETCH_SOCKET = "/run/oci-image/oci-imaged-prefetch.sock"

#: the one spelling of booleans, for OCI_* variables and the step client's flags
TRUE_WORDS = ("1", "yes", "true")
FALSE_WORDS = ("0", "no", "false")


#: A SPANK option of srun, sbatch and salloc.
#:   name: str  # --NAME
#:   code: str  # its C enum value (O_...), shared by its aliases
#:   arginfo: Optional[str]  # the argument's name in --help; None: a flag
#:   help: str  # what srun --help and the man page say (without "Env: ...")
#:   env: Optional[str]  # the OCI_* variable that sets it when the option is not given
#:   env_value: str  # for a flag: the value of env that means this option ("" for values)
#:   step_arg: str  # how the plugin hands the raw value to the step client
#:   doc: str  # the README's text (markdown)
Option = namedtuple("Option", "name code arginfo help env env_value step_arg doc")

OPTIONS = (
    Option("oci-image", "O_IMAGE", "REF",
           "Run the step in OCI image REF (e.g. docker.io/library/debian:12, or "
           "REF@sha256:... ). The tag is resolved to a digest once at submit.",
           "OCI_IMAGE", "", "--image",
           "run the step(s) in this image: `ubuntu:24.04`, `reg.example.org:5000/ns/img:tag`, "
           "`img@sha256:…`, or an absolute path to a `.sqfs` file (only where the site allows "
           "it: `allow_sqfs=yes`)"),
    Option("oci-mounts", "O_MOUNTS", "SRC:DST[:FLAGS],...",
           "Bind mount host paths into the image (FLAGS: ro, rw, noexec, joined by +); "
           "tmpfs:DST[:size=N+mode=M] mounts a per-step tmpfs.", "OCI_MOUNTS", "", "--mounts",
           "bind host paths into the container (absolute paths; read-write unless `:ro`; "
           "`SRC` alone mounts it at the same path; flags `+`-joined as pyxis writes them: "
           "`ro`, `rw`, `noexec`); `tmpfs:DST[:size=N+mode=M+nr_inodes=N+noexec]`: a per-step "
           "tmpfs, yours, mode 0700 unless `mode=` "
           "([docs/migrating-from-pyxis.md](docs/migrating-from-pyxis.md#mounts))"),
    Option("oci-workdir", "O_WORKDIR", "DIR",
           "Working directory inside the image (default: the current directory if it "
           "exists there, else the image's).", "OCI_WORKDIR", "", "--workdir",
           "where tasks start in the container (absolute)"),
    Option("oci-writable", "O_WRITABLE", None,
           "Give the step a writable (throw-away) overlay over the image.",
           "OCI_WRITABLE", "1", "--writable",
           "a per-step writable layer (tmpfs overlay, in node memory) over the read-only "
           "image; discarded at step end"),
    Option("oci-mount-home", "O_MOUNT_HOME", None,
           "Bind mount your home directory into the image.", "OCI_MOUNT_HOME", "1",
           "--mount-home", "mount your home directory at the same path (default: yes)"),
    Option("no-oci-mount-home", "O_NO_MOUNT_HOME", None,
           "Do not bind mount your home directory.", "OCI_MOUNT_HOME", "0", "--mount-home", ""),
    Option("oci-entrypoint", "O_ENTRYPOINT", None,
           "Run the image's ENTRYPOINT with the step's command as its arguments "
           "(like docker run IMAGE CMD...); no effect for an image without one.",
           "OCI_ENTRYPOINT", "1", "--entrypoint",
           "run the image's `Entrypoint` with your command as its arguments, like `docker run "
           "IMAGE CMD…` (default: no; not with `--multi-prog`)"),
    Option("oci-env", "O_ENV", "NAME,...",
           "Comma-separated names of host variables that override the image's ENV "
           "(default: the image's ENV wins for names it sets).", "OCI_ENV", "", "--env-names",
           "host variables that win over the image's `Env`"),
    Option("oci-remap-root", "O_REMAP_ROOT", None,
           "Be root (uid 0) inside the image, over a writable layer, through a user "
           "namespace that maps only you: root inside is you outside.",
           "OCI_REMAP_ROOT", "1", "--remap-root",
           "be uid 0 in the container (to `apt-get install` into the step's writable layer); "
           "a user namespace maps only you, so root inside is you on the host: files it "
           "creates on a bind are yours (where the site allows it: `allow_remap_root`)"),
    Option("no-oci-remap-root", "O_NO_REMAP_ROOT", None,
           "Run as yourself inside the image (the default).", "OCI_REMAP_ROOT", "0",
           "--remap-root", ""),
    Option("oci-devices", "O_DEVICES", "VENDOR/CLASS=NAME,...",
           "Inject devices from the node's CDI specs (Container Device Interface, "
           "e.g. nvidia.com/gpu=0): their device nodes, mounts, environment and hooks.",
           "OCI_DEVICES", "", "--devices",
           "devices from the site's CDI specs (`/etc/cdi`, `/var/run/cdi`), by qualified name "
           "(`vendor/class=name`, comma-separated): their device nodes, mounts, environment "
           "and hooks; `oci-image devices` lists a node's ([docs/gpu.md](docs/gpu.md))"),
    Option("oci-batch-in-image", "O_BATCH", None,
           "sbatch: run the batch script itself in the image too (default: the "
           "script runs on the host and its srun steps run in the image).", None, "", "",
           "sbatch: also run the batch script itself in the image"),
    Option("oci-name", "O_NAME", "NAME[:FLAG]",
           "A writable container of the job on each node, kept across the job's steps that "
           "name it (FLAG: auto, create, no_create). A step may then omit --oci-image.",
           "OCI_NAME", "", "--name",
           "a named container: writable, on node-local storage, kept from step to step of the "
           "job on each node and removed when the job ends; later steps may give the name "
           "alone (`NAME:create`: must not exist yet; `NAME:no_create`: must exist); see "
           "[docs/migrating-from-pyxis.md](docs/migrating-from-pyxis.md#named-containers)"),
)


#: pyxis' name for one of ours (plugstack pyxis_aliases=yes).
#:   name: str
#:   code: str
#:   arginfo: Optional[str]
#:   help: str
Alias = namedtuple("Alias", "name code arginfo help")

ALIASES = (
    Alias("container-image", "O_C_IMAGE", "REF",
          "Alias of --oci-image (oci-image). Also takes pyxis' REGISTRY#IMAGE and docker://."),
    Alias("container-mounts", "O_MOUNTS", "SRC:DST[:FLAGS],...",
          "Alias of --oci-mounts (oci-image): pyxis' flags ro+rprivate..., tmpfs:DST."),
    Alias("container-workdir", "O_WORKDIR", "DIR", "Alias of --oci-workdir (oci-image)."),
    Alias("container-writable", "O_WRITABLE", None, "Alias of --oci-writable (oci-image)."),
    Alias("container-readonly", "O_READONLY", None,
          "The image read-only, the default (oci-image)."),
    Alias("container-mount-home", "O_MOUNT_HOME", None, "Alias of --oci-mount-home (oci-image)."),
    Alias("no-container-mount-home", "O_NO_MOUNT_HOME", None,
          "Alias of --no-oci-mount-home (oci-image)."),
    Alias("container-env", "O_ENV", "NAMES", "Alias of --oci-env (oci-image)."),
    Alias("container-entrypoint", "O_ENTRYPOINT", None, "Alias of --oci-entrypoint (oci-image)."),
    Alias("no-container-entrypoint", "O_NO_ENTRYPOINT", None,
          "Do not run the image's ENTRYPOINT, the default (oci-image)."),
    Alias("container-name", "O_NAME", "NAME[:FLAG]", "Alias of --oci-name (oci-image)."),
    Alias("container-remap-root", "O_REMAP_ROOT", None,
          "Alias of --oci-remap-root (oci-image)."),
    Alias("no-container-remap-root", "O_NO_REMAP_ROOT", None,
          "Alias of --no-oci-remap-root (oci-image)."),
)


def option_usage(o: Option) -> str:
    """The text srun --help shows: the help and the variable that sets the option."""
    if o.env is None:
        return o.help
    return f"{o.help} Env: {o.env}{'=' + o.env_value if o.env_value else ''}."


#: A key=value argument after the plugin's path in plugstack.conf.
#:   name: str
#:   syntax: str  # the value's form
#:   default: str  # the README's default column (markdown)
#:   doc: str  # the README's text (markdown)
#:   man: str  # the man page's text ({socket}: the default socket)
PlugstackKey = namedtuple("PlugstackKey", "name syntax default doc man")

PLUGSTACK = (
    PlugstackKey("step_client", "PATH", "(required)",
                 "the step client: `/usr/libexec/oci-image/oci-image-step`",
                 """Required. Absolute path of the step client the plugin runs:
                 /usr/libexec/oci-image/oci-image-step from the package."""),
    PlugstackKey("socket", "PATH", f"`{DEFAULT_SOCKET}`", "the daemon's socket",
                 """The oci-imaged socket (default {socket})."""),
    PlugstackKey("launcher", "PATH", "`oci-image-launch` next to the step client",
                 "the static program that runs an image's Entrypoint for `--oci-entrypoint`",
                 """Absolute path of the static program that runs an image's
                 Entrypoint for --oci-entrypoint. Default: oci-image-launch in the step
                 client's directory (the package installs it there). Only steps with
                 --oci-entrypoint use it."""),
    PlugstackKey("allow_sqfs", "yes|no", "`no`",
                 "users may run their own `.sqfs` files (the kernel parses what a user made: "
                 "leave off unless you trust your users' files)",
                 """Whether users may give an absolute path to their own .sqfs file
                 as --oci-image (default no: the kernel would parse a file a user
                 made)."""),
    PlugstackKey("default_mounts", "SRC:DST[:FLAGS],...", "none",
                 "site mounts in every container, e.g. `/scratch:/scratch,/apps:/apps:ro`",
                 """Site bind mounts added to every container, absolute paths, e.g.
                 /scratch:/scratch,/apps:/apps:ro."""),
    PlugstackKey("batch_in_image", "no|yes", "`no`",
                 "run every batch script in its image (as `--oci-batch-in-image` does per job)",
                 """Run every batch script in the image, as --oci-batch-in-image does for
                 one job (default no: the batch script runs on the host so that it can
                 call srun)."""),
    PlugstackKey("prefetch_socket", "PATH|none", f"`{DEFAULT_PREFETCH_SOCKET}`",
                 "the daemon's user socket that srun, sbatch and salloc ask to start pulling "
                 "a pinned image while the job waits; `none` disables prefetch",
                 """The daemon's user socket (mode 0666; the daemon knows each caller's uid
                 from SO_PEERCRED and pulls digest-pinned references with that user's own
                 credentials only). After pinning the digest, srun, sbatch and salloc ask
                 the local daemon through it to start pulling the image while the job waits
                 in the queue. Default /run/oci-image/oci-imaged-prefetch.sock; none
                 disables prefetch."""),
    PlugstackKey("record_job", "yes|no", "`yes`",
                 "sbatch records the pinned digest in the job's Comment (`oci-image=sha256:…`) "
                 "so that eviction spares the images of pending jobs",
                 """Whether sbatch records the pinned image's digest in the job's Comment
                 (oci-image=sha256:..., never the image's name: squeue shows comments to
                 everyone) so that the daemons can see which pending jobs need which images
                 and eviction spares them, for a job whose owner may pull the image (default
                 yes)."""),
    PlugstackKey("pyxis_aliases", "no|yes", "`no`",
                 "also register pyxis' `--container-*` option names with this plugin's "
                 "meanings ([docs/migrating-from-pyxis.md](docs/migrating-from-pyxis.md)); "
                 "ignored when a pyxis plugin is loaded too",
                 """Also register pyxis' option names (--container-image,
                 --container-mounts, --container-workdir, --container-writable,
                 --container-readonly, --[no-]container-mount-home, --container-env,
                 --[no-]container-entrypoint, --container-name) with this plugin's meanings, for sites moving
                 from pyxis (default no). Ignored, with a message in slurmd's log, when a
                 pyxis plugin is loaded too."""),
    PlugstackKey("allow_remap_root", "yes|no", "`yes`",
                 "users may ask for `--oci-remap-root` (uid 0 inside through a user namespace "
                 "that maps only them: no privilege on the host; the kernel's own switches, "
                 "e.g. `user.max_user_namespaces=0`, refuse it too)",
                 """Whether users may ask for --oci-remap-root (default yes): uid 0 in the
                 container through a user namespace that maps only the user, which gives
                 no privilege on the host. Where the kernel disables user namespaces
                 (user.max_user_namespaces=0, kernel.unprivileged_userns_clone=0) it is
                 refused all the same, with a message saying so."""),
)


#: An exit status and what it means.
#:   code: int
#:   meaning: str
ExitCode = namedtuple("ExitCode", "code meaning")

#: the exit status of oci-image, oci-imaged and the step client (ociimage.errors: exit_code)
EXIT_CODES = (
    ExitCode(0, "success"),
    ExitCode(1, "the operation failed (not found, authentication, registry unavailable, ...)"),
    ExitCode(2, "invalid arguments, reference or configuration"),
    ExitCode(3, "the node's oci-imaged cannot be reached (not running, or its socket is not "
                "this user's to use)"),
    ExitCode(70, "internal error (run with -vv for details)"),
    ExitCode(130, "interrupted"),
)


#: what each option code sets in the step client's arguments, and a flag's value there
#: (None: the option's own value); an option's variable sets the same when it is not given
CODES = {
    "O_IMAGE": ("image", None), "O_C_IMAGE": ("container_image", None),
    "O_MOUNTS": ("mounts", None), "O_WORKDIR": ("workdir", None), "O_ENV": ("env_names", None),
    "O_WRITABLE": ("writable", "1"), "O_READONLY": ("writable", "0"),
    "O_MOUNT_HOME": ("mount_home", "1"), "O_NO_MOUNT_HOME": ("mount_home", "0"),
    "O_ENTRYPOINT": ("entrypoint", "1"), "O_NO_ENTRYPOINT": ("entrypoint", "0"),
    "O_BATCH": ("batch_in_image", "1"), "O_NAME": ("container_name", None),
    "O_REMAP_ROOT": ("remap_root", "1"), "O_NO_REMAP_ROOT": ("remap_root", "0"),
    "O_DEVICES": ("devices", None),
}

#: set by the plugin after a submit that passed: a checksum of what it checked (the options,
#: their variables, the plugstack arguments), so that an srun inside the job with the same
#: ones does not run submit again
CHECKED_VAR = "OCI_IMAGE_CHECKED"

#: slurmstepd's step id of a job's batch script (Slurm's SLURM_BATCH_SCRIPT)
BATCH_STEP = 0xFFFFFFFB


#: A key of the KEY\\0VALUE\\0 records a step client command sends the plugin on fd 4.
#:   command: str  # the subcommand that sends it
#:   key: str
#:   count: str  # "1", "0..1", "any"
#:   meaning: str
Record = namedtuple("Record", "command key count meaning")

RECORDS = (
    Record("submit", "setenv", "any", "NAME=VALUE for srun's, sbatch's or salloc's environment "
                                      "(OCI_IMAGE_PINNED), which they pass on to the job"),
    Record("submit", "atexit", "any", "one argument each of a step client call sbatch makes at "
                                      "its exit (record-job)"),
    Record("prepare", "env", "any", "NAME=VALUE to set in the tasks' environment"),
    Record("prepare", "unsetenv", "any", "NAME to remove from the tasks' environment"),
    Record("prepare", "cwd", "0..1", "the tasks' working directory in the image"),
    Record("prepare", "entrypoint", "0..1", "the image's Entrypoint, encoded for "
                                            "oci-image-launch (only with --oci-entrypoint)"),
    Record("prepare", "launcher", "0..1", "the launcher's path (with entrypoint)"),
)
#: prepare also passes the step's mount namespace as a descriptor (SCM_RIGHTS) with its
#: records; a prepare that exits 0 without one leaves the step on the host (a batch script)


#: One argument of a step client subcommand (what the plugin passes).
#:   flag: str
#:   kind: str = "str"  # str | int | float | flag | store_true | append | pair
#:   default: object = None
#:   required: bool = False
#:   help: Optional[str] = None
#:   choices: Optional[Tuple[str, ...]] = None
Arg = namedtuple("Arg", "flag kind default required help choices",
                 defaults=("str", None, False, None, None))

_PLUGSTACK = Arg("--plugstack", "append", help="one plugstack.conf argument, KEY=VALUE, raw")
_OPTION = Arg("--option", "pair", help="NAME VALUE: an option as given (a flag's VALUE: empty)")
_RECORDS = Arg("--records-fd", "int", 4, help="the socket the records go to (the plugin's: 4)")
_STEP = (Arg("--job", required=True), Arg("--step", required=True),
         Arg("--uid", "int", required=True), Arg("--gid", "int", required=True),
         Arg("--node-id", "int", 0, help="the node's index in the step (S_JOB_NODEID)"),
         Arg("--job-env-fd", "int", -1, help="the job's environment, NAME=VALUE\\0 records"))

#: the step client's subcommands and arguments; the plugin builds exactly these argv
STEP_COMMANDS = {
    # srun/sbatch/salloc, as the user: check every option, pin the digest, prefetch
    "submit": (_PLUGSTACK, _OPTION, _RECORDS,
               Arg("--caller", default="srun", help="srun, sbatch or salloc")),
    # slurmstepd (user_init), root: the step's namespace, its records
    "prepare": _STEP + (_PLUGSTACK, _OPTION, _RECORDS),
    # slurmstepd (exit), root, detached
    "release": _STEP + (_PLUGSTACK,),
    # slurmd's job epilog, root, detached: what the job left on this node
    "cleanup-job": (Arg("--job", required=True), Arg("--node", default=""), _PLUGSTACK,
                    Arg("--timeout", "float", 60.0)),
    # submit, detached (sbatch, salloc): the login node's daemon pulls while the job waits
    "prefetch": (Arg("--socket", required=True), Arg("--image", required=True),
                 Arg("--node", default=""), Arg("--timeout", "float", 10.0)),
    # sbatch's exit (submit's atexit records), as the user: the digest in the job's comment
    "record-job": (Arg("--image", required=True), Arg("--since", "float", 0.0),
                   Arg("--sid", "int", None),
                   Arg("--job", default="", help="the job (default: find the one just submitted)"),
                   Arg("--verbose", "store_true", False)),
}
