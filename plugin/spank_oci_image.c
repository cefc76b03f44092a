/*
 * spank_oci_image.so - the thin SPANK shim of slurm-oci-image.
 *
 * All logic lives in the Python "step client" that this plugin execs; the
 * plugin only registers options, runs the step client, and per task enters
 * the step's pinned mount namespace (setns) and changes directory.
 *
 * plugstack.conf:
 *   required /usr/lib/slurm/spank_oci_image.so step_client=/usr/libexec/oci-image-step \
 *            [socket=/run/oci-image/oci-imaged.sock] [allow_sqfs=yes|no]
 *            [default_mounts=SRC:DST[:ro|rw],...] [batch_in_image=no|yes]
 *            [launcher=/usr/libexec/oci-image/oci-image-launch]
 *            [prefetch_socket=/run/oci-image/oci-imaged-prefetch.sock|none]
 *            [record_job=yes|no]
 *            [pyxis_aliases=no|yes]
 *   pyxis_aliases=yes also registers pyxis' option names (--container-image,
 *   --container-mounts, ...) with our meanings, for sites moving from pyxis.
 *   Refused (logged, aliases not registered) when a pyxis plugin is loaded in
 *   the same process: SPANK cannot show a plugin another plugin's options, and
 *   a name registered twice is silently disabled for whichever registers
 *   second, so we look for a loaded shared object named *pyxis* instead.
 *   launcher= is the static program that runs an image's Entrypoint for
 *   --oci-entrypoint (plugin/oci-image-launch.c); default: oci-image-launch in
 *   the step client's directory.  Only steps with --oci-entrypoint use it.
 *
 * Step client contract (argv exactly as built below):
 *   local  (srun/sbatch/salloc, as the user, the user's own environment):
 *     STEP_CLIENT submit --image REF [--socket PREFETCH_SOCKET]
 *       exit 0: stdout one line "REF@sha256:<hex>"; exit != 0: stderr has the error.
 *   remote (slurmstepd, root, clean environment; the job's environment is
 *           passed as NUL-separated NAME=VALUE records on fd 3, see below):
 *     STEP_CLIENT prepare --socket S --job J --step S --uid U --gid G --node N
 *           --image IMG [--mounts M] [--workdir W] [--writable] [--mount-home 0|1]
 *           [--entrypoint] [--env-names LIST] [--default-mounts LIST]
 *           --allow-sqfs yes|no --cwd DIR --job-env-fd 3 --progress plain|tty|none
 *       started in init_post_opt and waited for in user_init, where its stderr
 *       reaches srun: progress (the step's first node only), then errors.
 *       stdout: NUL-separated key/value records:
 *         ns\0/path/to/pinned/mntns\0  (exactly once)
 *         cwd\0/dir\0                  (at most once)
 *         env\0NAME=VALUE\0            (any number)
 *         unsetenv\0NAME\0             (any number)
 *         entrypoint\0ENCODED\0         (at most once, only with --entrypoint and
 *                                      an image that has an Entrypoint; the
 *                                      encoding of plugin/oci-image-launch.c)
 *     STEP_CLIENT release --socket S --job J --step S --node N
 *   The step id is the decimal uint32 Slurm uses (batch step: 4294967291).
 *   prefetch (srun/sbatch/salloc, as the user, right after a digest was
 *           pinned; detached like release, never waited for):
 *     STEP_CLIENT prefetch --socket PREFETCH_SOCKET --image REF@sha256:<hex> --node HOST
 *   job epilog (slurmd's job epilog, root, synchronous; stdout/stderr to the slurmd log):
 *     STEP_CLIENT cleanup-job --socket S --job J --node N
 *
 * Slurm-aware cache (issue 7):
 * - Prefetch: after pinning, the local context spawns "prefetch" detached
 *   (setsid, double fork): the login node's daemon starts converting while
 *   the job waits in the queue.  The daemon's main socket is root-only, so it
 *   listens on a second socket (prefetch_socket=, mode 0666), not gRPC: it
 *   knows each caller's uid (SO_PEERCRED) and pulls digest-pinned references
 *   with that user's own credentials only (daemon/ociimage/usersock.py).
 * - Recording the digest for the daemon: neither `squeue --json` (22.05) nor
 *   `scontrol show job` shows a job's environment (OCI_IMAGE_PINNED), and
 *   init_post_opt runs before sbatch builds the job description from its
 *   own options, so no shown field can be set before submission.  sbatch
 *   has no SPANK item for the job id either (allocator context: UID/GID
 *   only).  So at sbatch's exit (slurm_spank_exit, allocator context, after
 *   "Submitted batch job"), the plugin runs, synchronously and as the user,
 *     STEP_CLIENT record-job --image REF@sha256:<hex> --since T --sid SID
 *   which finds the job just submitted (this user's newest job from this
 *   session, submitted since init_post_opt, not tagged yet) with squeue and
 *   appends " oci-image=sha256:<hex>" (the digest only, never the name) to its
 *   Comment with scontrol: stable commands rather than libslurm structures
 *   that change between releases.  Done before sbatch returns, so a shell loop
 *   of sbatch calls tags each job before the next is submitted.
 *   record_job=no disables it.
 *   salloc/srun allocations start running when the plugin could tag them;
 *   their steps hold leases while they run.
 * - slurm_spank_job_epilog (slurmd's job epilog context, root, every node
 *   the job ran on, no slurm.conf Epilog needed) runs cleanup-job, which
 *   releases whatever the job's steps left on the node (a slurmstepd killed
 *   with SIGKILL never reaches spank_exit).  It always returns 0: a failing
 *   job_epilog of a required plugin drains the node.
 *
 * Messages to the user: the step client's stderr is read line by line and
 * relayed with slurm_spank_log() (error level, no "error: " prefix); on
 * failure the last line is repeated with slurm_error().  In srun these
 * reach the terminal directly.  In slurmstepd, messages logged in
 * init_post_opt (before the step's I/O is connected to srun) only reach the
 * slurmd log, and an init_post_opt failure shows the user nothing but "task
 * launch failed: Plugin initialization failed".  So prepare's stderr is kept
 * and replayed in slurm_spank_user_init (after I/O setup; all lines on
 * failure, on node 0 only on success), and a failed prepare fails the task in
 * task_init_privileged: a user_init failure makes srun exit 0 on 22.05, a
 * task_init_privileged failure makes it exit 1.
 *
 * The child of prepare/release gets a fixed environment (PATH, LC_ALL), never
 * the job's: LD_PRELOAD/PYTHONPATH from a user would otherwise run as root.
 * The job environment goes to prepare as a memfd on fd 3 (--job-env-fd 3).
 * The working directory passed as --cwd is srun's getcwd(), exported by the
 * local context as OCI_SUBMIT_CWD (else the job's PWD, else "/").
 *
 * --oci-entrypoint: SPANK cannot add arguments to a task, and exec'ing from
 * the plugin would skip what slurmstepd does after the SPANK task hooks
 * (TaskProlog, TMPDIR, the user's rlimits, PATH lookup).  So in
 * task_init_privileged the plugin opens the launcher (still in the host's
 * mount namespace, O_CLOEXEC), enters the step's namespace, and replaces the
 * task's argv[0] (S_JOB_ARGV; slurmstepd execs task->argv, which is the
 * step's argv outside --multi-prog) with "/proc/self/fd/N", passing the
 * original argv[0] and the encoded Entrypoint in OCI_IMAGE_ARGV0 and
 * OCI_IMAGE_ENTRYPOINT.  slurmstepd's own execve then runs the launcher from
 * the host through that descriptor: nothing is placed in the image or its
 * /tmp (which a user mount could hide), and the descriptor is gone once the
 * launcher runs.  The launcher unsets both variables and execvp()s
 * Entrypoint + [argv0] + argv[1:].  Without an Entrypoint in the image,
 * --oci-entrypoint changes nothing.  Not supported with srun --multi-prog
 * (its per-task argv is not the one SPANK sees).
 */

#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <link.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/spank.h>
#include <slurm/slurm.h> /* the hostlist API only: nothing else of libslurm is used */

/* slurm.h's hostlist_t is a pointer type up to 23.02 and the struct itself from 23.11 */
#if SLURM_VERSION_NUMBER >= SLURM_VERSION_NUM(23, 11, 0)
typedef hostlist_t *oci_hostlist;
#else
typedef hostlist_t oci_hostlist;
#endif

SPANK_PLUGIN(oci_image, 1)

#define PFX "oci-image: "
#define STEP_BATCH 0xfffffffbU
#define STEP_EXTERN 0xfffffffcU
#define MAX_STDOUT (1024 * 1024)
#define MAX_LINE 4096
#define MAX_ARGS 48
#define MAX_DEFERRED 64
#define SAFE_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* ---- plugstack configuration ------------------------------------------ */

static struct {
	char step_client[PATH_MAX];
	char socket[PATH_MAX];
	char default_mounts[4096];
	char launcher[PATH_MAX];
	char prefetch_socket[PATH_MAX]; /* "": prefetch disabled */
	int record_job;
	int allow_sqfs;
	int batch_in_image;
	int pyxis_aliases;
} cfg;

/* ---- user options -------------------------------------------------------- */

enum { O_IMAGE = 1, O_MOUNTS, O_WORKDIR, O_WRITABLE, O_MOUNT_HOME, O_NO_MOUNT_HOME,
       O_ENTRYPOINT, O_ENV, O_BATCH, O_READONLY, O_NO_ENTRYPOINT, O_C_IMAGE };

static struct {
	char *image;
	char *mounts;
	char *workdir;
	char *env_names;
	int writable;
	int mount_home; /* -1: not given */
	int entrypoint;
	int batch_in_image;
} opt = { .mount_home = -1 };

/* ---- remote step state ---------------------------------------------------- */

/* A step client started by child_start() and collected by child_finish(). */
struct child {
	pid_t pid;
	int out, err; /* read ends of its stdout and stderr; -1: closed */
	const char *name;
	const char *cmd;
};


static struct {
	int prepared;     /* prepare was run (release is due) */
	int active;       /* prepare succeeded: tasks enter the namespace */
	uint32_t jobid, stepid;
	char node[256];
	char *out;        /* prepare's stdout (owned) */
	size_t out_len;
	const char *ns, *cwd;
	/* the namespace's holder: entered only if the process at holder_pid still
	 * started at holder_start and its namespace has inode ns_inode */
	unsigned long holder_pid;
	unsigned long long holder_start, ns_inode;
	const char *entrypoint; /* encoded, see oci-image-launch.c; NULL: none */
	const char *env[1024];
	size_t n_env;
	const char *unset[256];
	size_t n_unset;
	struct child prep; /* prepare, from init_post_opt until user_init */
	/* messages that must reach the user once the step's I/O is connected */
	char *deferred[MAX_DEFERRED];
	size_t n_deferred;
	int failed;
} st;

static int opt_cb(int val, const char *optarg, int remote);

static struct spank_option options[] = {
	{ "oci-image", "REF",
	  "Run the step in OCI image REF (e.g. docker.io/library/debian:12, or "
	  "REF@sha256:... ). The tag is resolved to a digest once at submit. "
	  "Env: OCI_IMAGE.", 1, O_IMAGE, opt_cb },
	{ "oci-mounts", "SRC:DST[:ro],...",
	  "Bind mount host paths into the image. Env: OCI_MOUNTS.", 1, O_MOUNTS, opt_cb },
	{ "oci-workdir", "DIR",
	  "Working directory inside the image (default: the current directory if it "
	  "exists there, else the image's). Env: OCI_WORKDIR.", 1, O_WORKDIR, opt_cb },
	{ "oci-writable", NULL,
	  "Give the step a writable (throw-away) overlay over the image. "
	  "Env: OCI_WRITABLE=1.", 0, O_WRITABLE, opt_cb },
	{ "oci-mount-home", NULL,
	  "Bind mount your home directory into the image. Env: OCI_MOUNT_HOME=1.",
	  0, O_MOUNT_HOME, opt_cb },
	{ "no-oci-mount-home", NULL,
	  "Do not bind mount your home directory. Env: OCI_MOUNT_HOME=0.",
	  0, O_NO_MOUNT_HOME, opt_cb },
	{ "oci-entrypoint", NULL,
	  "Run the image's ENTRYPOINT with the step's command as its arguments "
	  "(like docker run IMAGE CMD...); no effect for an image without one. "
	  "Env: OCI_ENTRYPOINT=1.", 0, O_ENTRYPOINT, opt_cb },
	{ "oci-env", "NAMES",
	  "Comma-separated names of host variables that override the image's ENV "
	  "(default: the image's ENV wins for names it sets). Env: OCI_ENV.",
	  1, O_ENV, opt_cb },
	{ "oci-batch-in-image", NULL,
	  "sbatch: run the batch script itself in the image too (default: the "
	  "script runs on the host and its srun steps run in the image).",
	  0, O_BATCH, opt_cb },
	SPANK_OPTIONS_TABLE_END
};

/* pyxis' names for the same things (plugstack pyxis_aliases=yes, pyxis not loaded) */
static struct spank_option pyxis_aliases[] = {
	{ "container-image", "REF",
	  "Alias of --oci-image (oci-image). Also takes pyxis' REGISTRY#IMAGE and docker://.",
	  1, O_C_IMAGE, opt_cb },
	{ "container-mounts", "SRC:DST[:ro],...", "Alias of --oci-mounts (oci-image).",
	  1, O_MOUNTS, opt_cb },
	{ "container-workdir", "DIR", "Alias of --oci-workdir (oci-image).", 1, O_WORKDIR, opt_cb },
	{ "container-writable", NULL, "Alias of --oci-writable (oci-image).", 0, O_WRITABLE, opt_cb },
	{ "container-readonly", NULL, "The image read-only, the default (oci-image).",
	  0, O_READONLY, opt_cb },
	{ "container-mount-home", NULL, "Alias of --oci-mount-home (oci-image).",
	  0, O_MOUNT_HOME, opt_cb },
	{ "no-container-mount-home", NULL, "Alias of --no-oci-mount-home (oci-image).",
	  0, O_NO_MOUNT_HOME, opt_cb },
	{ "container-env", "NAMES", "Alias of --oci-env (oci-image).", 1, O_ENV, opt_cb },
	{ "container-entrypoint", NULL, "Alias of --oci-entrypoint (oci-image).",
	  0, O_ENTRYPOINT, opt_cb },
	{ "no-container-entrypoint", NULL, "Do not run the image's ENTRYPOINT, the default "
	  "(oci-image).", 0, O_NO_ENTRYPOINT, opt_cb },
	SPANK_OPTIONS_TABLE_END
};

/* Is a pyxis plugin loaded in this process?  slurm dlopen()s every plugstack
 * plugin before calling any slurm_spank_init, so the order does not matter. */
static int find_pyxis(struct dl_phdr_info *info, size_t size, void *data)
{
	const char *name = info->dlpi_name, *base;

	(void)size;
	(void)data;
	if (name == NULL || *name == '\0')
		return 0;
	base = strrchr(name, '/');
	base = base ? base + 1 : name;
	return strstr(base, "pyxis") != NULL;
}

static int set_str(char **dst, const char *name, const char *val);

/* pyxis' REGISTRY#IMAGE and docker:// to a docker reference; USER@ is dropped */
static int set_pyxis_image(const char *val)
{
	char buf[4096];
	const char *hash, *p = val;
	int n;

	if (val == NULL || *val == '\0')
		return set_str(&opt.image, "container-image", val);
	if (strncmp(p, "docker://", 9) == 0)
		p += 9;
	hash = strchr(p, '#');
	if (hash == NULL || p[0] == '/')
		return set_str(&opt.image, "container-image", p);
	{
		const char *at = memchr(p, '@', (size_t)(hash - p));
		if (at != NULL)
			p = at + 1;
	}
	n = snprintf(buf, sizeof(buf), "%.*s/%s", (int)(hash - p), p, hash + 1);
	if (n < 0 || (size_t)n >= sizeof(buf)) {
		slurm_error(PFX "--container-image: value too long");
		return -1;
	}
	return set_str(&opt.image, "container-image", buf);
}

static int set_str(char **dst, const char *name, const char *val)
{
	char *dup;

	if (val == NULL || *val == '\0') {
		slurm_error(PFX "--%s needs a value", name);
		return -1;
	}
	if (strlen(val) > 65536 || strpbrk(val, "\n\r") != NULL) {
		slurm_error(PFX "--%s: invalid value", name);
		return -1;
	}
	dup = strdup(val);
	if (dup == NULL) {
		slurm_error(PFX "out of memory");
		return -1;
	}
	free(*dst);
	*dst = dup;
	return 0;
}

static int opt_cb(int val, const char *optarg, int remote)
{
	(void)remote;
	switch (val) {
	case O_IMAGE: return set_str(&opt.image, "oci-image", optarg);
	case O_MOUNTS: return set_str(&opt.mounts, "oci-mounts", optarg);
	case O_WORKDIR:
		if (optarg == NULL || optarg[0] != '/') {
			slurm_error(PFX "--oci-workdir must be an absolute path");
			return -1;
		}
		return set_str(&opt.workdir, "oci-workdir", optarg);
	case O_ENV: return set_str(&opt.env_names, "oci-env", optarg);
	case O_WRITABLE: opt.writable = 1; return 0;
	case O_MOUNT_HOME:
	case O_NO_MOUNT_HOME: {
		int v = (val == O_MOUNT_HOME);
		if (opt.mount_home != -1 && opt.mount_home != v) {
			slurm_error(PFX "both --oci-mount-home and --no-oci-mount-home given");
			return -1;
		}
		opt.mount_home = v;
		return 0;
	}
	case O_ENTRYPOINT: opt.entrypoint = 1; return 0;
	case O_BATCH: opt.batch_in_image = 1; return 0;
	case O_READONLY: opt.writable = 0; return 0;
	case O_NO_ENTRYPOINT: opt.entrypoint = 0; return 0;
	case O_C_IMAGE: return set_pyxis_image(optarg);
	default: return -1;
	}
}

/* Fill options that were not given from OCI_* variables (getter: getenv in
 * srun/sbatch, the job environment in slurmstepd). */
typedef const char *(*getter_f)(const char *name, void *ctx);

static int flag_env(getter_f get, void *ctx, const char *name, int *dst)
{
	const char *v = get(name, ctx);

	if (v == NULL || *v == '\0')
		return 0;
	if (strcmp(v, "1") == 0 || strcmp(v, "yes") == 0 || strcmp(v, "true") == 0)
		*dst = 1;
	else if (strcmp(v, "0") == 0 || strcmp(v, "no") == 0 || strcmp(v, "false") == 0)
		*dst = 0;
	else {
		slurm_error(PFX "%s=%s: expected 0 or 1", name, v);
		return -1;
	}
	return 0;
}

static int env_fallbacks(getter_f get, void *ctx)
{
	const char *v;
	int f;

	if (opt.image == NULL && (v = get("OCI_IMAGE", ctx)) != NULL && *v != '\0')
		if (set_str(&opt.image, "oci-image (OCI_IMAGE)", v) < 0)
			return -1;
	if (opt.image == NULL)
		return 0; /* nothing else matters without an image */
	if (opt.mounts == NULL && (v = get("OCI_MOUNTS", ctx)) != NULL && *v != '\0')
		if (set_str(&opt.mounts, "oci-mounts (OCI_MOUNTS)", v) < 0)
			return -1;
	if (opt.workdir == NULL && (v = get("OCI_WORKDIR", ctx)) != NULL && *v != '\0')
		if (opt_cb(O_WORKDIR, v, 0) < 0)
			return -1;
	if (opt.env_names == NULL && (v = get("OCI_ENV", ctx)) != NULL && *v != '\0')
		if (set_str(&opt.env_names, "oci-env (OCI_ENV)", v) < 0)
			return -1;
	if (!opt.writable && flag_env(get, ctx, "OCI_WRITABLE", &opt.writable) < 0)
		return -1;
	if (!opt.entrypoint && flag_env(get, ctx, "OCI_ENTRYPOINT", &opt.entrypoint) < 0)
		return -1;
	if (opt.mount_home == -1) {
		f = -1;
		if (flag_env(get, ctx, "OCI_MOUNT_HOME", &f) < 0)
			return -1;
		opt.mount_home = f;
	}
	return 0;
}

static const char *get_local(const char *name, void *ctx)
{
	(void)ctx;
	return getenv(name);
}

/* Look NAME up in the job environment array (no copy, no syscall). */
static const char *get_jobenv(const char *name, void *ctx)
{
	char **env = ctx;
	size_t n = strlen(name);

	for (; env != NULL && *env != NULL; env++)
		if (strncmp(*env, name, n) == 0 && (*env)[n] == '=')
			return *env + n + 1;
	return NULL;
}

/* ---- plugstack arguments ------------------------------------------------- */

static int copy_val(char *dst, size_t size, const char *key, const char *val)
{
	int n = snprintf(dst, size, "%s", val);

	if (n < 0 || (size_t)n >= size) {
		slurm_error(PFX "plugstack.conf: %s: value too long", key);
		return -1;
	}
	return 0;
}

static int yes_no(const char *key, const char *val, int *dst)
{
	if (strcmp(val, "yes") == 0)
		*dst = 1;
	else if (strcmp(val, "no") == 0)
		*dst = 0;
	else {
		slurm_error(PFX "plugstack.conf: %s=%s: expected yes or no", key, val);
		return -1;
	}
	return 0;
}

/* SRC:DST[:ro|rw],... with absolute paths */
static int check_mounts(const char *key, const char *val)
{
	const char *p = val;

	while (*p != '\0') {
		const char *end = strchr(p, ',');
		size_t len = end ? (size_t)(end - p) : strlen(p);
		const char *c1 = memchr(p, ':', len);
		const char *c2 = c1 ? memchr(c1 + 1, ':', len - (size_t)(c1 + 1 - p)) : NULL;
		size_t flen = c2 ? len - (size_t)(c2 + 1 - p) : 0;

		if (len == 0 || p[0] != '/' || c1 == NULL || c1[1] != '/' ||
		    (c2 != NULL && !((flen == 2 && (strncmp(c2 + 1, "ro", 2) == 0 ||
						     strncmp(c2 + 1, "rw", 2) == 0))))) {
			slurm_error(PFX "plugstack.conf: %s: bad entry \"%.*s\" "
				    "(expected /SRC:/DST[:ro|rw],...)", key, (int)len, p);
			return -1;
		}
		if (end == NULL)
			break;
		p = end + 1;
		if (*p == '\0') {
			slurm_error(PFX "plugstack.conf: %s: trailing comma", key);
			return -1;
		}
	}
	return 0;
}

static int parse_args(int ac, char **av)
{
	int have_client = 0;

	memset(&cfg, 0, sizeof(cfg));
	if (copy_val(cfg.socket, sizeof(cfg.socket), "socket",
		     "/run/oci-image/oci-imaged.sock") < 0 ||
	    copy_val(cfg.prefetch_socket, sizeof(cfg.prefetch_socket), "prefetch_socket",
		     "/run/oci-image/oci-imaged-prefetch.sock") < 0)
		return -1;
	cfg.record_job = 1;
	for (int i = 0; i < ac; i++) {
		const char *a = av[i];
		const char *eq = strchr(a, '=');
		size_t klen = eq ? (size_t)(eq - a) : strlen(a);
		const char *v = eq ? eq + 1 : NULL;

#define KEY(k) (klen == sizeof(k) - 1 && strncmp(a, k, klen) == 0)
		if (v == NULL || *v == '\0') {
			slurm_error(PFX "plugstack.conf: argument \"%s\": expected key=value", a);
			return -1;
		}
		if (KEY("step_client")) {
			if (v[0] != '/') {
				slurm_error(PFX "plugstack.conf: step_client=%s: must be an absolute path", v);
				return -1;
			}
			if (copy_val(cfg.step_client, sizeof(cfg.step_client), "step_client", v) < 0)
				return -1;
			have_client = 1;
		} else if (KEY("launcher")) {
			if (v[0] != '/') {
				slurm_error(PFX "plugstack.conf: launcher=%s: must be an absolute path", v);
				return -1;
			}
			if (copy_val(cfg.launcher, sizeof(cfg.launcher), "launcher", v) < 0)
				return -1;
		} else if (KEY("socket")) {
			if (v[0] != '/') {
				slurm_error(PFX "plugstack.conf: socket=%s: must be an absolute path", v);
				return -1;
			}
			if (copy_val(cfg.socket, sizeof(cfg.socket), "socket", v) < 0)
				return -1;
		} else if (KEY("prefetch_socket")) {
			if (strcmp(v, "none") == 0 || strcmp(v, "off") == 0) {
				cfg.prefetch_socket[0] = '\0';
			} else if (v[0] != '/') {
				slurm_error(PFX "plugstack.conf: prefetch_socket=%s: must be an absolute "
					    "path or none", v);
				return -1;
			} else if (copy_val(cfg.prefetch_socket, sizeof(cfg.prefetch_socket),
					    "prefetch_socket", v) < 0) {
				return -1;
			}
		} else if (KEY("record_job")) {
			if (yes_no("record_job", v, &cfg.record_job) < 0)
				return -1;
		} else if (KEY("allow_sqfs")) {
			if (yes_no("allow_sqfs", v, &cfg.allow_sqfs) < 0)
				return -1;
		} else if (KEY("batch_in_image")) {
			if (yes_no("batch_in_image", v, &cfg.batch_in_image) < 0)
				return -1;
		} else if (KEY("pyxis_aliases")) {
			if (yes_no("pyxis_aliases", v, &cfg.pyxis_aliases) < 0)
				return -1;
		} else if (KEY("default_mounts")) {
			if (check_mounts("default_mounts", v) < 0 ||
			    copy_val(cfg.default_mounts, sizeof(cfg.default_mounts),
				     "default_mounts", v) < 0)
				return -1;
		} else {
			slurm_error(PFX "plugstack.conf: unknown argument \"%.*s\"", (int)klen, a);
			return -1;
		}
#undef KEY
	}
	if (!have_client) {
		slurm_error(PFX "plugstack.conf: step_client=PATH is required");
		return -1;
	}
	if (cfg.launcher[0] == '\0') { /* default: next to the step client */
		const char *slash = strrchr(cfg.step_client, '/');
		int n = snprintf(cfg.launcher, sizeof(cfg.launcher), "%.*s/oci-image-launch",
				 (int)(slash - cfg.step_client), cfg.step_client);
		if (n < 0 || (size_t)n >= sizeof(cfg.launcher)) {
			slurm_error(PFX "plugstack.conf: step_client: path too long");
			return -1;
		}
	}
	return 0;
}

/* ---- running the step client ------------------------------------------- */

static void defer(const char *line)
{
	if (st.n_deferred < MAX_DEFERRED) {
		char *d = strdup(line);
		if (d != NULL)
			st.deferred[st.n_deferred++] = d;
	}
}

#define REDRAW "\x1b[1A\x1b[2K" /* a terminal line that replaces the one before it */

/*
 * line with its control characters (C0, DEL, C1) shown as '?': it holds paths and
 * references a user chose, and goes to terminals and the slurmd log.  Only the
 * step client's own redraw prefix, at the very start, is kept when keep_redraw.
 */
static void sanitize(char *dst, size_t size, const char *line, int keep_redraw)
{
	size_t o = 0, i = 0, n = sizeof(REDRAW) - 1;

	if (keep_redraw && strncmp(line, REDRAW, n) == 0 && size > n) {
		memcpy(dst, REDRAW, n);
		o = i = n;
	}
	for (; line[i] != '\0' && o + 1 < size; i++) {
		unsigned char c = (unsigned char)line[i];

		if (c == 0xc2 && (unsigned char)line[i + 1] >= 0x80 &&
		    (unsigned char)line[i + 1] <= 0x9f) {
			i++;
			c = '?';
		} else if ((c < 0x20 && c != '\t') || c == 0x7f) {
			c = '?';
		}
		dst[o++] = (char)c;
	}
	dst[o] = '\0';
}

/*
 * Relay one stderr line of the step client to the user, as it comes.  In
 * slurmstepd (user_init) straight to fd 2, the step's stderr on its way to srun:
 * progress is for the user, and one line every few seconds of a long wait does
 * not belong in the slurmd log.
 */
static void relay_line(const char *line)
{
	char buf[MAX_LINE + 1];

	if (spank_context() != S_CTX_REMOTE) {
		sanitize(buf, sizeof(buf), line, 0);
		slurm_spank_log("%s", buf);
		return;
	}
	sanitize(buf, sizeof(buf) - 1, line, 1);
	strcat(buf, "\n");
	for (size_t o = 0, n = strlen(buf); o < n;) {
		ssize_t w = write(STDERR_FILENO, buf + o, n - o);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return; /* nobody reads it any more: the step is going away */
		o += (size_t)w;
	}
}

/* An error line of the step client, to the user and the slurmd log. */
static void relay_error(const char *line)
{
	char buf[MAX_LINE];

	sanitize(buf, sizeof(buf), line, 0);
	slurm_error("%s", buf);
}

struct child_out {
	char *buf;       /* stdout (NUL-terminated for convenience) */
	size_t len;
	int status;      /* wait status */
};

/*
 * Feed stderr bytes; complete lines are relayed at once (progress must reach the
 * user while the work runs), except the step client's error line ("oci-image:
 * error: ..."), which is held: at the end it is shown as an error if the child
 * failed.
 */
struct linebuf { char b[MAX_LINE]; size_t n; int have_held; char held[MAX_LINE]; };

static void lb_emit(struct linebuf *lb)
{
	static const char err[] = PFX "error: ";

	if (lb->n == 0)
		return;
	lb->b[lb->n] = '\0';
	if (strncmp(lb->b, err, sizeof(err) - 1) != 0) {
		relay_line(lb->b);
	} else {
		if (lb->have_held)
			relay_line(lb->held);
		memcpy(lb->held, lb->b, lb->n + 1);
		lb->have_held = 1;
	}
	lb->n = 0;
}

static void lb_feed(struct linebuf *lb, const char *p, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (p[i] == '\n') {
			lb_emit(lb);
		} else if (lb->n < sizeof(lb->b) - 1) {
			lb->b[lb->n++] = p[i];
		} /* else: overlong line truncated */
	}
}

/* Close every descriptor >= lowest (in a child about to exec). */
static void close_from(int lowest)
{
#ifdef SYS_close_range
	if (syscall(SYS_close_range, (unsigned)lowest, ~0U, 0) == 0)
		return;
#endif
	{
		long max = sysconf(_SC_OPEN_MAX);
		for (long fd = lowest; fd < (max > 0 && max < 65536 ? max : 65536); fd++)
			close((int)fd);
	}
}

/*
 * Run argv without waiting for it: the step's completion must not wait for the
 * release (a Python process start, ~0.1 s). Double fork + setsid so that the
 * release outlives this slurmstepd and is not in its process group; it ignores
 * the SIGTERM slurmstepd sends to what is left of the step. If it is lost
 * anyway, the daemon's lease expiry and stale-step cleanup are the safety net.
 */
static int spawn_detached(char *const argv[], char *const envp[])
{
	pid_t pid = fork();
	int status;

	if (pid < 0) {
		slurm_error(PFX "fork: %s", strerror(errno));
		return -1;
	}
	if (pid == 0) {
		sigset_t all;
		int devnull;

		if (setsid() < 0 || fork() != 0)
			_exit(0);
		/* background work (a release, a prefetch, a job's cleanup): the next step's
		 * start, often the same job's right after this one, must not wait behind it.
		 * Nice 10, not 19: on a node whose CPUs the job's tasks keep busy, a release
		 * at 19 (1.5% of a core against each of them) could wait seconds and hold
		 * its lease and mount that long; at 10 it gets a tenth. */
		(void)setpriority(PRIO_PROCESS, 0, 10);
		sigemptyset(&all);
		sigprocmask(SIG_SETMASK, &all, NULL);
		signal(SIGTERM, SIG_IGN);
		signal(SIGHUP, SIG_IGN);
		devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
		if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(devnull, 1) < 0 ||
		    dup2(devnull, 2) < 0)
			_exit(127);
		close_from(3);
		execve(argv[0], argv, envp);
		_exit(127);
	}
	while (waitpid(pid, &status, 0) < 0) {
		if (errno != EINTR)
			return -1;
	}
	return (WIFEXITED(status) && WEXITSTATUS(status) == 0) ? 0 : -1;
}

/* fork+exec argv; envp NULL means inherit.  extra_fd >= 0 becomes fd 3. */
static int child_start(char *const argv[], char *const envp[], int extra_fd, int ignore_term,
		       struct child *ch)
{
	int outp[2] = { -1, -1 }, errp[2] = { -1, -1 };

	ch->pid = -1;
	ch->out = ch->err = -1;
	ch->name = argv[0];
	ch->cmd = argv[1];
	if (pipe2(outp, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0) {
		slurm_error(PFX "pipe: %s", strerror(errno));
		goto fail;
	}
	ch->pid = fork();
	if (ch->pid < 0) {
		slurm_error(PFX "fork: %s", strerror(errno));
		goto fail;
	}
	if (ch->pid == 0) {
		int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
		sigset_t all;

		sigemptyset(&all);
		sigprocmask(SIG_SETMASK, &all, NULL);
		/* slurmstepd SIGTERMs what is left of the step while spank_exit
		 * runs (release was killed by it); the child must finish. */
		if (ignore_term)
			signal(SIGTERM, SIG_IGN);
		if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(outp[1], 1) < 0 ||
		    dup2(errp[1], 2) < 0)
			_exit(127);
		if (extra_fd >= 0 && (extra_fd == 3 ? fcntl(3, F_SETFD, 0) : dup2(extra_fd, 3)) < 0)
			_exit(127); /* dup2(3, 3) would leave close-on-exec set */
		/* Nothing else of slurmstepd's: prepare outlives init_post_opt, and a
		 * pipe of slurmstepd held open by it stalled the step's launch
		 * (about 5 s) until user_init. */
		close_from(extra_fd >= 0 ? 4 : 3);
		if (envp != NULL)
			execve(argv[0], argv, envp);
		else
			execv(argv[0], argv);
		dprintf(2, PFX "cannot execute step client %s: %s\n", argv[0], strerror(errno));
		_exit(127);
	}
	close(outp[1]);
	close(errp[1]);
	ch->out = outp[0];
	ch->err = errp[0];
	return 0;
fail:
	for (int i = 0; i < 2; i++) {
		if (outp[i] >= 0)
			close(outp[i]);
		if (errp[i] >= 0)
			close(errp[i]);
	}
	return -1;
}

/* Stop a child that will not be waited for (the step ended before user_init). */
static void child_abandon(struct child *ch)
{
	if (ch->pid > 0) {
		/* SIGTERM, a few seconds to go, then SIGKILL: slurmstepd must not hang */
		kill(ch->pid, SIGTERM);
		for (int i = 0; i < 50; i++) {
			pid_t r = waitpid(ch->pid, NULL, WNOHANG);
			if (r != 0 && !(r < 0 && errno == EINTR))
				goto reaped; /* ours, or someone else reaped it: gone either way */
			usleep(100000);
		}
		kill(ch->pid, SIGKILL);
		while (waitpid(ch->pid, NULL, 0) < 0 && errno == EINTR)
			;
reaped:
		ch->pid = -1;
	}
	if (ch->out >= 0)
		close(ch->out);
	if (ch->err >= 0)
		close(ch->err);
	ch->out = ch->err = -1;
}

/*
 * Collect a started child: stdout (at most max_out bytes, else failure) into co;
 * stderr relayed line by line as it comes, its last line kept (the error, on
 * failure).  Returns 0 if the child exited 0.
 */
static int child_finish(struct child *ch, size_t max_out, struct child_out *co)
{
	struct linebuf lb;
	size_t cap = 4096;
	int rc = -1, overflow = 0;
	struct pollfd pf[2];

	memset(co, 0, sizeof(*co));
	memset(&lb, 0, sizeof(lb));
	co->buf = malloc(cap);
	if (co->buf == NULL) {
		slurm_error(PFX "out of memory");
		child_abandon(ch);
		return -1;
	}
	pf[0].fd = ch->out;
	pf[0].events = POLLIN;
	pf[1].fd = ch->err;
	pf[1].events = POLLIN;
	while (pf[0].fd >= 0 || pf[1].fd >= 0) {
		char tmp[4096];
		ssize_t n;

		if (poll(pf, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			slurm_error(PFX "poll: %s", strerror(errno));
			break;
		}
		for (int i = 0; i < 2; i++) {
			if (pf[i].fd < 0 || !(pf[i].revents & (POLLIN | POLLHUP | POLLERR)))
				continue;
			n = read(pf[i].fd, tmp, sizeof(tmp));
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				close(pf[i].fd);
				pf[i].fd = -1;
				continue;
			}
			if (i == 1) {
				lb_feed(&lb, tmp, (size_t)n);
				continue;
			}
			if (co->len + (size_t)n > max_out) {
				overflow = 1;
				continue; /* keep draining */
			}
			if (co->len + (size_t)n + 1 > cap) {
				char *nb;
				while (co->len + (size_t)n + 1 > cap)
					cap *= 2;
				nb = realloc(co->buf, cap);
				if (nb == NULL) {
					overflow = 1;
					continue;
				}
				co->buf = nb;
			}
			memcpy(co->buf + co->len, tmp, (size_t)n);
			co->len += (size_t)n;
		}
	}
	for (int i = 0; i < 2; i++)
		if (pf[i].fd >= 0)
			close(pf[i].fd);
	ch->out = ch->err = -1;
	co->buf[co->len] = '\0';
	while (waitpid(ch->pid, &co->status, 0) < 0) {
		if (errno != EINTR) {
			slurm_error(PFX "waitpid: %s", strerror(errno));
			ch->pid = -1;
			return -1;
		}
	}
	ch->pid = -1;
	lb_emit(&lb); /* flush a last line without newline */
	if (overflow) {
		slurm_error(PFX "%s: output larger than %zu bytes", ch->name, max_out);
		return -1;
	}
	if (WIFEXITED(co->status) && WEXITSTATUS(co->status) == 0) {
		if (lb.have_held)
			relay_line(lb.held);
		rc = 0;
	} else if (lb.have_held) {
		relay_error(lb.held);
	} else if (WIFSIGNALED(co->status)) {
		slurm_error(PFX "%s %s killed by signal %d", ch->name, ch->cmd, WTERMSIG(co->status));
	} else {
		slurm_error(PFX "%s %s failed with exit code %d", ch->name, ch->cmd,
			    WEXITSTATUS(co->status));
	}
	return rc;
}

static int run_child(char *const argv[], char *const envp[], int extra_fd,
		     size_t max_out, struct child_out *co, int ignore_term)
{
	struct child ch;

	if (child_start(argv, envp, extra_fd, ignore_term, &ch) < 0) {
		memset(co, 0, sizeof(*co));
		return -1;
	}
	return child_finish(&ch, max_out, co);
}

/* ---- local context: pin the digest -------------------------------------- */

static struct {
	char pinned[4096]; /* what this process pinned ("": nothing) */
	time_t since;      /* when (for finding the submitted job) */
} sub;

static char *const clean_env[] = { "PATH=" SAFE_PATH, "LC_ALL=C.UTF-8", NULL };

/* Fire and forget: the login node's daemon starts converting while the job waits. */
static void prefetch(const char *pinned)
{
	char host[256] = "";
	char *argv[10];

	if (cfg.prefetch_socket[0] == '\0')
		return;
	if (gethostname(host, sizeof(host) - 1) < 0)
		host[0] = '\0';
	host[strcspn(host, ".")] = '\0';
	argv[0] = cfg.step_client;
	argv[1] = "prefetch";
	argv[2] = "--socket";
	argv[3] = cfg.prefetch_socket;
	argv[4] = "--image";
	argv[5] = (char *)pinned;
	argv[6] = "--node";
	argv[7] = host;
	argv[8] = NULL;
	(void)spawn_detached(argv, clean_env); /* a lost prefetch only costs the nodes a pull */
}

static int pinned_matches(const char *pinned, const char *ref)
{
	const char *at = NULL, *p = pinned;

	while ((p = strstr(p, "@sha256:")) != NULL)
		at = p++;
	if (at == NULL)
		return 0;
	return strlen(ref) == (size_t)(at - pinned) && strncmp(pinned, ref, (size_t)(at - pinned)) == 0;
}

/* An absolute path with no ".." component (the daemon re-checks everything). */
static int path_ok(const char *p, size_t n)
{
	if (n == 0 || p[0] != '/')
		return 0;
	for (size_t i = 0; i + 1 < n; i++) {
		if (p[i] == '/' && p[i + 1] == '.' && (i + 2 == n || p[i + 2] == '/' ||
		    (p[i + 2] == '.' && (i + 3 == n || p[i + 3] == '/'))))
			return 0;
	}
	return 1;
}

/* --oci-mounts=SRC[:DST[:ro|rw]],...: refuse a bad value at submit, not at every step. */
static int mounts_ok(const char *v)
{
	const char *item = v;

	while (item != NULL && *item != '\0') {
		const char *end = strchr(item, ',');
		size_t len = end ? (size_t)(end - item) : strlen(item);
		const char *f[4];
		size_t fl[4];
		int nf = 0;
		const char *q = item;

		while (q < item + len && nf < 4) {
			const char *c = memchr(q, ':', (size_t)(item + len - q));
			f[nf] = q;
			fl[nf] = c ? (size_t)(c - q) : (size_t)(item + len - q);
			nf++;
			q = c ? c + 1 : item + len;
		}
		if (len > 0 && (nf > 3 || q < item + len || !path_ok(f[0], fl[0]) ||
		    (nf >= 2 && !path_ok(f[1], fl[1])) ||
		    (nf == 3 && !((fl[2] == 2 && (!strncmp(f[2], "ro", 2) || !strncmp(f[2], "rw", 2))))))) {
			slurm_error(PFX "--oci-mounts: \"%.*s\" is not SRC:DST[:ro|rw] with absolute paths and no '..' "
				    "(e.g. /scratch/me:/data:ro)", (int)(len > 200 ? 200 : len), item);
			return 0;
		}
		item = end ? end + 1 : NULL;
	}
	return 1;
}

static int local_post_opt(void)
{
	const char *pinned;
	char *argv[7];
	struct child_out co;
	char *nl;
	int rc = -1;

	if (env_fallbacks(get_local, NULL) < 0)
		return -1;
	if (opt.mounts != NULL && !mounts_ok(opt.mounts))
		return -1;
	if (opt.workdir != NULL && !path_ok(opt.workdir, strlen(opt.workdir))) {
		slurm_error(PFX "--oci-workdir: \"%.200s\" is not an absolute path", opt.workdir);
		return -1;
	}
	if (opt.image == NULL)
		return 0;
	/* slurmstepd has no SPANK item for the step's working directory and the
	 * job's PWD is whatever the user's shell exported: pass srun's real cwd.
	 * (srun --chdir=DIR is not seen here; the step client gets srun's cwd.) */
	if (spank_context() == S_CTX_LOCAL) {
		char wd[PATH_MAX];
		if (getcwd(wd, sizeof(wd)) != NULL && setenv("OCI_SUBMIT_CWD", wd, 1) < 0) {
			slurm_error(PFX "setenv: %s", strerror(errno));
			return -1;
		}
		/* progress redrawn in place on a terminal (its width, to keep each
		 * line on one row); plain lines in a file or pipe */
		struct winsize ws;
		char cols[16];
		if (isatty(STDERR_FILENO)) { /* "0": a terminal of unknown width */
			int known = ioctl(STDERR_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 20;
			snprintf(cols, sizeof(cols), "%u", known ? (unsigned)ws.ws_col : 0U);
			setenv("OCI_SUBMIT_TTY", cols, 1);
		} else {
			unsetenv("OCI_SUBMIT_TTY");
		}
	} else {
		unsetenv("OCI_SUBMIT_TTY"); /* a job's error file is no terminal */
	}
	if (opt.image[0] == '/')
		return 0; /* a SquashFS path: nothing to pin */
	pinned = getenv("OCI_IMAGE_PINNED");
	if (pinned != NULL && (pinned_matches(pinned, opt.image) || strcmp(pinned, opt.image) == 0))
		return 0; /* srun inside a job that already pinned this image */

	argv[0] = cfg.step_client;
	argv[1] = "submit";
	argv[2] = "--image";
	argv[3] = opt.image;
	argv[4] = NULL;
	if (cfg.prefetch_socket[0] != '\0') { /* this host's daemon resolves a tag fastest */
		argv[4] = "--socket";
		argv[5] = cfg.prefetch_socket;
		argv[6] = NULL;
	}
	if (run_child(argv, NULL, -1, 4096, &co, 0) < 0)
		goto out;
	nl = memchr(co.buf, '\n', co.len);
	if (nl != NULL)
		*nl = '\0';
	if (co.buf[0] == '\0' || strlen(co.buf) != (nl ? (size_t)(nl - co.buf) : co.len) ||
	    (nl != NULL && (size_t)(nl - co.buf) + 1 != co.len) || strstr(co.buf, "@sha256:") == NULL) {
		slurm_error(PFX "step client submit: unexpected output \"%.200s\"", co.buf);
		goto out;
	}
	if (setenv("OCI_IMAGE_PINNED", co.buf, 1) < 0) {
		slurm_error(PFX "setenv: %s", strerror(errno));
		goto out;
	}
	snprintf(sub.pinned, sizeof(sub.pinned), "%s", co.buf);
	sub.since = time(NULL);
	/* sbatch/salloc jobs may wait in the queue: worth converting meanwhile. An
	 * srun's own step starts right away and its nodes pull anyway; a prefetch
	 * there would only compete with them. */
	if (spank_context() == S_CTX_ALLOCATOR)
		prefetch(co.buf);
	/* setenv() is what works: srun sends its process environment to the
	 * tasks, sbatch/salloc export it to the job (spank_setenv answers
	 * ESPANK_NOT_REMOTE in srun, sbatch and salloc on 22.05). */
	rc = 0;
out:
	free(co.buf);
	return rc;
}

/* ---- remote context: prepare / enter / release ------------------------- */

/* The encoding of oci-image-launch.c: (element of [A-Za-z0-9/._-+:=@] or %XX, then ',')+ */
static int entrypoint_ok(const char *v)
{
	size_t n = strlen(v);

	if (n == 0 || v[n - 1] != ',' || n > 65536)
		return 0;
	for (const char *p = v; *p != '\0'; p++) {
		if (*p == '%') {
			if (!isxdigit((unsigned char)p[1]) || !isxdigit((unsigned char)p[2]) ||
			    (p[1] == '0' && p[2] == '0'))
				return 0;
			p += 2;
		} else if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') ||
			     (*p >= '0' && *p <= '9') || strchr("/._-+:=@,", *p) != NULL)) {
			return 0;
		}
	}
	return 1;
}

static int parse_prepare_output(void)
{
	char *p = st.out, *end = st.out + st.out_len;

	if (st.out_len == 0 || st.out[st.out_len - 1] != '\0') {
		slurm_error(PFX "step client prepare: output is not NUL-terminated records");
		return -1;
	}
	while (p < end) {
		char *key = p, *val;

		p += strlen(p) + 1;
		if (p >= end) {
			slurm_error(PFX "step client prepare: key \"%.64s\" without value", key);
			return -1;
		}
		val = p;
		p += strlen(p) + 1;
		if (strcmp(key, "ns") == 0) {
			if (st.ns != NULL || val[0] != '/') {
				slurm_error(PFX "step client prepare: bad or repeated ns");
				return -1;
			}
			st.ns = val;
		} else if (strcmp(key, "holder") == 0) {
			char tail;
			if (st.holder_pid != 0 ||
			    sscanf(val, "%lu %llu %llu%c", &st.holder_pid, &st.holder_start,
				   &st.ns_inode, &tail) != 3 || st.holder_pid == 0 || st.ns_inode == 0) {
				slurm_error(PFX "step client prepare: bad or repeated holder");
				return -1;
			}
		} else if (strcmp(key, "cwd") == 0) {
			if (st.cwd != NULL || val[0] != '/') {
				slurm_error(PFX "step client prepare: bad or repeated cwd");
				return -1;
			}
			st.cwd = val;
		} else if (strcmp(key, "env") == 0) {
			char *eq = strchr(val, '=');
			if (eq == NULL || eq == val || st.n_env >= sizeof(st.env) / sizeof(st.env[0])) {
				slurm_error(PFX "step client prepare: bad env record \"%.64s\"", val);
				return -1;
			}
			st.env[st.n_env++] = val;
		} else if (strcmp(key, "entrypoint") == 0) {
			if (st.entrypoint != NULL || !opt.entrypoint || !entrypoint_ok(val)) {
				slurm_error(PFX "step client prepare: bad or unexpected entrypoint record");
				return -1;
			}
			st.entrypoint = val;
		} else if (strcmp(key, "unsetenv") == 0) {
			if (val[0] == '\0' || strchr(val, '=') != NULL ||
			    st.n_unset >= sizeof(st.unset) / sizeof(st.unset[0])) {
				slurm_error(PFX "step client prepare: bad unsetenv record \"%.64s\"", val);
				return -1;
			}
			st.unset[st.n_unset++] = val;
		} else {
			slurm_error(PFX "step client prepare: unknown key \"%.64s\"", key);
			return -1;
		}
	}
	if (st.ns == NULL || st.holder_pid == 0) {
		slurm_error(PFX "step client prepare: no ns or holder record");
		return -1;
	}
	return 0;
}

/* The job environment as NUL-separated records in a memfd (fd 3 of the child). */
static int env_memfd(char **env)
{
	int fd = memfd_create("oci-image-job-env", MFD_CLOEXEC);

	if (fd < 0) {
		slurm_error(PFX "memfd_create: %s", strerror(errno));
		return -1;
	}
	for (; env != NULL && *env != NULL; env++) {
		size_t len = strlen(*env) + 1, off = 0;
		while (off < len) {
			ssize_t n = write(fd, *env + off, len - off);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				slurm_error(PFX "write job env: %s", strerror(errno));
				close(fd);
				return -1;
			}
			off += (size_t)n;
		}
	}
	if (lseek(fd, 0, SEEK_SET) < 0) {
		slurm_error(PFX "lseek: %s", strerror(errno));
		close(fd);
		return -1;
	}
	return fd;
}

/* slurm.h's public hostlist API; libslurmfull (linked by slurmstepd) provides it. */

/*
 * This node's Slurm name.  The job environment is no help: SLURMD_NODENAME
 * is not set yet at init_post_opt, and an srun inside a batch script passes
 * on the batch step's SLURMD_NODENAME/SLURM_TOPOLOGY_ADDR (the wrong node).  What is right: entry
 * S_JOB_NODEID of the step's node list (srun sets SLURM_STEP_NODELIST for
 * each step; the batch step runs on the job's first node).
 */
static void node_name(spank_t sp, char **jobenv)
{
	const char *v;
	uint32_t nodeid = 0;

	st.node[0] = '\0';
	v = st.stepid == STEP_BATCH ? get_jobenv("SLURM_JOB_NODELIST", jobenv)
				    : get_jobenv("SLURM_STEP_NODELIST", jobenv);
	if (v != NULL && *v != '\0' &&
	    spank_get_item(sp, S_JOB_NODEID, &nodeid) == ESPANK_SUCCESS) {
		oci_hostlist hl = slurm_hostlist_create(v);
		char *h = NULL;

		for (uint32_t i = 0; hl != NULL && i <= nodeid; i++) {
			free(h);
			h = slurm_hostlist_shift(hl);
			if (h == NULL)
				break;
		}
		if (h != NULL) {
			snprintf(st.node, sizeof(st.node), "%s", h);
			free(h);
		}
		if (hl != NULL)
			slurm_hostlist_destroy(hl);
	}
	if (st.node[0] == '\0' && gethostname(st.node, sizeof(st.node) - 1) < 0)
		snprintf(st.node, sizeof(st.node), "unknown");
}

/*
 * "<socket's directory>/jobs/<jobid>" (with %n in socket= replaced by the node
 * name): made before a step of the job is prepared on this node, so that the
 * job epilog runs the cleanup only where a job used an image. Every other job
 * ends exactly as without the plugin.
 */
static int job_marker(char *buf, size_t n, uint32_t jobid, const char *node, int make_dir)
{
	char sock[PATH_MAX], *slash;
	size_t o = 0;

	for (const char *p = cfg.socket; *p != '\0' && o + 1 < sizeof(sock); p++) {
		if (p[0] == '%' && p[1] == 'n') {
			size_t l = strlen(node);
			if (o + l + 1 >= sizeof(sock))
				return -1;
			memcpy(sock + o, node, l);
			o += l;
			p++;
		} else {
			sock[o++] = *p;
		}
	}
	sock[o] = '\0';
	slash = strrchr(sock, '/');
	if (slash == NULL || slash == sock)
		return -1;
	*slash = '\0';
	if (make_dir) {
		char dir[PATH_MAX];
		if ((size_t)snprintf(dir, sizeof(dir), "%s/jobs", sock) >= sizeof(dir) ||
		    (mkdir(dir, 0700) < 0 && errno != EEXIST))
			return -1;
	}
	return (size_t)snprintf(buf, n, "%s/jobs/%u", sock, jobid) < n ? 0 : -1;
}

/*
 * srun saw a terminal, and its stderr really goes there: not with -l (labels
 * would scramble a redraw; srun sets SLURM_LABELIO for the job, not for itself),
 * nor -o/-e to files, nor for a batch step.
 */
static int tty_progress(char **jobenv)
{
	const char *cols = get_jobenv("OCI_SUBMIT_TTY", jobenv);

	return cols != NULL && strspn(cols, "0123456789") == strlen(cols) && cols[0] != '\0' &&
	       st.stepid != STEP_BATCH && get_jobenv("SLURM_LABELIO", jobenv) == NULL &&
	       get_jobenv("SLURM_STDERRMODE", jobenv) == NULL &&
	       get_jobenv("SLURM_STDOUTMODE", jobenv) == NULL;
}

static int remote_post_opt(spank_t sp)
{
	char **jobenv = NULL;
	uid_t uid;
	gid_t gid;
	char s_job[16], s_step[16], s_uid[16], s_gid[16], s_fd[] = "3";
	const char *image, *pinned, *cwd;
	char *argv[MAX_ARGS];
	int ac = 0, fd = -1, rc = -1;
	uint32_t nodeid = 0;
	spank_err_t e;

	if (spank_get_item(sp, S_JOB_ENV, &jobenv) != ESPANK_SUCCESS)
		jobenv = NULL;
	if (env_fallbacks(get_jobenv, jobenv) < 0)
		return -1;
	if (opt.image == NULL)
		return 0;
	if ((e = spank_get_item(sp, S_JOB_STEPID, &st.stepid)) != ESPANK_SUCCESS ||
	    (e = spank_get_item(sp, S_JOB_ID, &st.jobid)) != ESPANK_SUCCESS ||
	    (e = spank_get_item(sp, S_JOB_UID, &uid)) != ESPANK_SUCCESS ||
	    (e = spank_get_item(sp, S_JOB_GID, &gid)) != ESPANK_SUCCESS) {
		slurm_error(PFX "spank_get_item: %s", spank_strerror(e));
		return -1;
	}
	if (st.stepid == STEP_EXTERN)
		return 0;
	if (st.stepid == STEP_BATCH && !(cfg.batch_in_image || opt.batch_in_image))
		return 0; /* the batch script runs on the host; its sruns use the image */

	pinned = get_jobenv("OCI_IMAGE_PINNED", jobenv);
	image = opt.image;
	if (pinned != NULL && opt.image[0] != '/' && pinned_matches(pinned, opt.image))
		image = pinned;
	cwd = get_jobenv("OCI_SUBMIT_CWD", jobenv);
	if (cwd == NULL || cwd[0] != '/')
		cwd = get_jobenv("PWD", jobenv);
	if (cwd == NULL || cwd[0] != '/')
		cwd = "/";
	node_name(sp, jobenv);
	snprintf(s_job, sizeof(s_job), "%u", st.jobid);
	snprintf(s_step, sizeof(s_step), "%u", st.stepid);
	snprintf(s_uid, sizeof(s_uid), "%u", (unsigned)uid);
	snprintf(s_gid, sizeof(s_gid), "%u", (unsigned)gid);

#define ARG(x) (argv[ac++] = (char *)(x))
	ARG(cfg.step_client); ARG("prepare");
	ARG("--socket"); ARG(cfg.socket);
	ARG("--job"); ARG(s_job);
	ARG("--step"); ARG(s_step);
	ARG("--uid"); ARG(s_uid);
	ARG("--gid"); ARG(s_gid);
	ARG("--node"); ARG(st.node);
	ARG("--image"); ARG(image);
	if (opt.mounts) { ARG("--mounts"); ARG(opt.mounts); }
	if (opt.workdir) { ARG("--workdir"); ARG(opt.workdir); }
	if (opt.writable) ARG("--writable");
	if (opt.mount_home != -1) { ARG("--mount-home"); ARG(opt.mount_home ? "1" : "0"); }
	if (opt.entrypoint) ARG("--entrypoint");
	if (opt.env_names) { ARG("--env-names"); ARG(opt.env_names); }
	if (cfg.default_mounts[0]) { ARG("--default-mounts"); ARG(cfg.default_mounts); }
	ARG("--allow-sqfs"); ARG(cfg.allow_sqfs ? "yes" : "no");
	ARG("--cwd"); ARG(cwd);
	ARG("--job-env-fd"); ARG(s_fd);
	/* one node of the step shows the wait (its first); every node shows its errors */
	ARG("--progress");
	if (spank_get_item(sp, S_JOB_NODEID, &nodeid) != ESPANK_SUCCESS || nodeid != 0)
		ARG("none");
	else
		ARG(tty_progress(jobenv) ? "tty" : "plain");
	if (tty_progress(jobenv)) {
		ARG("--columns");
		ARG(get_jobenv("OCI_SUBMIT_TTY", jobenv));
	}
	argv[ac] = NULL;
#undef ARG

	{
		char marker[PATH_MAX];
		int mfd;
		if (job_marker(marker, sizeof(marker), st.jobid, st.node, 1) == 0 &&
		    (mfd = open(marker, O_WRONLY | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600)) >= 0)
			close(mfd);
	}
	fd = env_memfd(jobenv);
	if (fd < 0)
		goto fail;
	st.prepared = 1;
	/* Started here, collected in slurm_spank_user_init: only from there does
	 * what it prints reach srun, and there it does so while the image is
	 * converted or downloaded (the user sees progress live, not afterwards). */
	if (child_start(argv, clean_env, fd, 0, &st.prep) < 0)
		goto fail;
	rc = 0;
fail:
	if (fd >= 0)
		close(fd);
	if (rc < 0) {
		/* Fail in slurm_spank_user_init instead: only from there do messages
		 * reach srun (an init_post_opt failure shows the user just "task
		 * launch failed: Plugin initialization failed"). */
		st.failed = 1;
		defer(PFX "could not start the step in the image");
	}
	return 0;
}

/* In slurm_spank_user_init: wait for prepare, relaying its progress as it comes. */
static void finish_prepare(void)
{
	struct child_out co;

	if (child_finish(&st.prep, MAX_STDOUT, &co) == 0) {
		st.out = co.buf;
		st.out_len = co.len;
		if (parse_prepare_output() == 0) {
			st.active = 1;
			return;
		}
		co.buf = NULL;
	}
	free(co.buf);
	st.failed = 1;
	slurm_error(PFX "could not start the step in the image");
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	spank_context_t ctx = spank_context();

	if (parse_args(ac, av) < 0)
		/* slurmd must keep running: it logs, steps then fail in slurmstepd */
		return ctx == S_CTX_SLURMD ? 0 : -1;
	if (cfg.pyxis_aliases && dl_iterate_phdr(find_pyxis, NULL) != 0) {
		cfg.pyxis_aliases = 0;
		if (ctx == S_CTX_SLURMD)
			slurm_error(PFX "pyxis_aliases=yes ignored: pyxis is loaded too "
				    "(its --container-* options stay pyxis')");
		else
			slurm_verbose(PFX "pyxis_aliases=yes ignored: pyxis is loaded too");
	}
	if (ctx != S_CTX_LOCAL && ctx != S_CTX_REMOTE && ctx != S_CTX_ALLOCATOR)
		return 0;
	for (int i = 0; options[i].name != NULL; i++) {
		spank_err_t e = spank_option_register(sp, &options[i]);
		if (e != ESPANK_SUCCESS) {
			slurm_error(PFX "cannot register --%s: %s", options[i].name, spank_strerror(e));
			return -1;
		}
	}
	for (int i = 0; cfg.pyxis_aliases && pyxis_aliases[i].name != NULL; i++) {
		spank_err_t e = spank_option_register(sp, &pyxis_aliases[i]);
		if (e != ESPANK_SUCCESS) {
			slurm_error(PFX "cannot register --%s: %s", pyxis_aliases[i].name,
				    spank_strerror(e));
			return -1;
		}
	}
	return 0;
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	switch (spank_context()) {
	case S_CTX_LOCAL:
	case S_CTX_ALLOCATOR:
		return local_post_opt();
	case S_CTX_REMOTE:
		return remote_post_opt(sp);
	default:
		return 0;
	}
}

/* Messages from init_post_opt, shown once the step's I/O reaches srun. */
static void relay_deferred(void)
{
	for (size_t i = 0; i < st.n_deferred; i++) {
		slurm_spank_log("%s", st.deferred[i]);
		free(st.deferred[i]);
	}
	st.n_deferred = 0;
}

int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	(void)sp;
	(void)ac;
	(void)av;
	if (spank_context() != S_CTX_REMOTE)
		return 0;
	relay_deferred();
	if (st.prep.pid > 0)
		finish_prepare();
	/* Failing here would make srun print "task launch failed" but exit 0
	 * (Slurm 22.05); the step fails in task_init_privileged instead, which
	 * gives the task a non-zero exit status that srun reports. */
	return 0;
}

/* The launcher, opened close-on-exec: slurmstepd's execve of /proc/self/fd/N
 * still finds it (a static ELF needs no second look at its path). */
static int open_launcher(void)
{
	struct stat sb;
	int fd = open(cfg.launcher, O_RDONLY | O_CLOEXEC);

	if (fd < 0) {
		slurm_error(PFX "--oci-entrypoint: cannot open the launcher %s: %s "
			    "(plugstack.conf launcher=)", cfg.launcher, strerror(errno));
		return -1;
	}
	if (fstat(fd, &sb) < 0 || !S_ISREG(sb.st_mode) || (sb.st_mode & S_IXOTH) == 0) {
		slurm_error(PFX "--oci-entrypoint: the launcher %s is not an executable file",
			    cfg.launcher);
		close(fd);
		return -1;
	}
	return fd;
}

/* Make slurmstepd exec the launcher instead of the task's argv[0]. */
static int use_launcher(spank_t sp, int fd)
{
	static char path[64];
	int argc = 0;
	char **argv = NULL;
	spank_err_t e;

	if ((e = spank_get_item(sp, S_JOB_ARGV, &argc, &argv)) != ESPANK_SUCCESS ||
	    argc < 1 || argv == NULL || argv[0] == NULL) {
		slurm_error(PFX "--oci-entrypoint: cannot get the task's command: %s",
			    e != ESPANK_SUCCESS ? spank_strerror(e) : "empty");
		return -1;
	}
	if ((e = spank_setenv(sp, "OCI_IMAGE_ARGV0", argv[0], 1)) != ESPANK_SUCCESS ||
	    (e = spank_setenv(sp, "OCI_IMAGE_ENTRYPOINT", st.entrypoint, 1)) != ESPANK_SUCCESS) {
		slurm_error(PFX "--oci-entrypoint: setenv: %s", spank_strerror(e));
		return -1;
	}
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	argv[0] = path; /* this task process's copy; slurmstepd execs it as is */
	return 0;
}

/* Field 22 (starttime) of /proc/PID/stat; 0 if unreadable. */
static unsigned long long process_start(unsigned long pid)
{
	char path[64], buf[1024], *p;
	unsigned long long start = 0;
	ssize_t n;
	int fd, field;

	snprintf(path, sizeof(path), "/proc/%lu/stat", pid);
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	if ((p = strrchr(buf, ')')) == NULL)
		return 0;
	/* after ") " comes field 3 (state); starttime is field 22 */
	for (field = 2; field < 22 && p != NULL; field++)
		p = strchr(p + 1, ' ');
	if (p != NULL)
		start = strtoull(p + 1, NULL, 10);
	return start;
}

/*
 * The step's namespace, opened through its holder's pid and verified: a
 * holder that died and whose pid was reused (by any process, in a namespace
 * of its own making) must never be entered as root.  The pid is checked by
 * its start time after the open, so the descriptor was taken while the holder
 * itself had that pid, and the namespace by its inode.
 */
static int open_holder_ns(void)
{
	char path[64];
	struct stat sb;
	int fd;

	snprintf(path, sizeof(path), "/proc/%lu/ns/mnt", st.holder_pid);
	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
		slurm_error(PFX "the step's namespace is gone (%s: %s)", path, strerror(errno));
		return -1;
	}
	if (fstat(fd, &sb) < 0 || (unsigned long long)sb.st_ino != st.ns_inode ||
	    process_start(st.holder_pid) != st.holder_start) {
		slurm_error(PFX "the step's namespace holder %lu is not the one the daemon made; "
			    "not entering it", st.holder_pid);
		close(fd);
		return -1;
	}
	return fd;
}

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	int fd, launcher_fd = -1;
	spank_err_t e;

	(void)ac;
	(void)av;
	if (!st.active)
		return st.failed ? -1 : 0;
	/* the launcher is a host path: open it before leaving the host's namespace */
	if (st.entrypoint != NULL && (launcher_fd = open_launcher()) < 0)
		return -1;
	if ((fd = open_holder_ns()) < 0)
		return -1;
	if (setns(fd, CLONE_NEWNS) < 0) {
		slurm_error(PFX "setns %s: %s", st.ns, strerror(errno));
		close(fd);
		return -1;
	}
	close(fd);
	/* No exec in the container may gain privileges (setuid/setgid bits, file
	 * capabilities), whatever a mount's flags say. */
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
		slurm_error(PFX "prctl(PR_SET_NO_NEW_PRIVS): %s", strerror(errno));
		return -1;
	}
	/* No chdir here: this is still root, and st.cwd is a path the user (or the
	 * image) chose; slurm_spank_task_init changes to it as the user. */
	for (size_t i = 0; i < st.n_env; i++) {
		const char *eq = strchr(st.env[i], '=');
		char name[256];
		size_t n = (size_t)(eq - st.env[i]);

		if (n >= sizeof(name)) {
			slurm_error(PFX "variable name too long: %.64s", st.env[i]);
			return -1;
		}
		memcpy(name, st.env[i], n);
		name[n] = '\0';
		if ((e = spank_setenv(sp, name, eq + 1, 1)) != ESPANK_SUCCESS) {
			slurm_error(PFX "setenv %s: %s", name, spank_strerror(e));
			return -1;
		}
	}
	for (size_t i = 0; i < st.n_unset; i++) {
		if ((e = spank_unsetenv(sp, st.unset[i])) != ESPANK_SUCCESS) {
			slurm_error(PFX "unsetenv %s: %s", st.unset[i], spank_strerror(e));
			return -1;
		}
	}
	if (st.entrypoint != NULL)
		return use_launcher(sp, launcher_fd);
	return 0;
}

/*
 * slurmstepd chdirs to the job's working directory AFTER task_init_privileged,
 * in the task, as the user, i.e. already inside the image: when that path is
 * missing there it prints "couldn't chdir to `DIR': No such file or
 * directory: going to /tmp instead" and the task would start in /tmp.
 * slurm_spank_task_init runs after that chdir, so the directory the step
 * client chose is applied again here (now with the user's rights).
 */
int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	(void)sp;
	(void)ac;
	(void)av;
	if (!st.active || st.cwd == NULL)
		return 0;
	if (chdir(st.cwd) < 0) {
		slurm_error(PFX "cannot change to directory %s in the image: %s", st.cwd, strerror(errno));
		return -1;
	}
	return 0;
}

/*
 * sbatch, at exit: have the step client record the pinned image's digest in
 * the comment of the job just submitted (see the header comment).  Synchronous
 * (done before sbatch returns), best effort: the job runs the same without it.
 */
static void record_job(void)
{
	char s_since[32], s_sid[32];
	char *argv[10];
	struct child_out co;

	if (!cfg.record_job || sub.pinned[0] == '\0' ||
	    strcmp(program_invocation_short_name, "sbatch") != 0)
		return;
	snprintf(s_since, sizeof(s_since), "%lld", (long long)sub.since);
	snprintf(s_sid, sizeof(s_sid), "%ld", (long)getsid(0));
	argv[0] = cfg.step_client;
	argv[1] = "record-job";
	argv[2] = "--image";
	argv[3] = sub.pinned;
	argv[4] = "--since";
	argv[5] = s_since;
	argv[6] = "--sid";
	argv[7] = s_sid;
	argv[8] = NULL;
	if (run_child(argv, NULL, -1, 4096, &co, 0) < 0)
		slurm_debug(PFX "the image was not recorded in the job's comment");
	free(co.buf);
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	char s_job[16], s_step[16];
	char *argv[12];

	(void)sp;
	(void)ac;
	(void)av;
	if (spank_context() == S_CTX_ALLOCATOR) {
		record_job();
		return 0;
	}
	if (spank_context() != S_CTX_REMOTE || !st.prepared)
		return 0;
	if (st.prep.pid > 0) /* the step ended before user_init */
		child_abandon(&st.prep);
	st.prepared = 0;
	snprintf(s_job, sizeof(s_job), "%u", st.jobid);
	snprintf(s_step, sizeof(s_step), "%u", st.stepid);
	argv[0] = cfg.step_client;
	argv[1] = "release";
	argv[2] = "--socket";
	argv[3] = cfg.socket;
	argv[4] = "--job";
	argv[5] = s_job;
	argv[6] = "--step";
	argv[7] = s_step;
	argv[8] = "--node";
	argv[9] = st.node;
	argv[10] = NULL;
	if (spawn_detached(argv, clean_env) < 0)
		slurm_info(PFX "release of job %s step %s failed (ignored)", s_job, s_step);
	return 0;
}

/*
 * The job ended on this node (slurmd's job epilog, root): whatever its steps
 * left (a step whose slurmstepd was killed never ran spank_exit) is released.
 * Detached (the daemon does the work right after).  Never fails:
 * a failing job_epilog of a required plugin drains the node.
 */
int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
	char s_job[16], node[256] = "", marker[PATH_MAX];
	const char *v;
	char *argv[10];
	uint32_t jobid = 0;

	/* slurm_spank_init is not called in the job script context (22.05) */
	if (parse_args(ac, av) < 0)
		return 0;
	if (spank_get_item(sp, S_JOB_ID, &jobid) != ESPANK_SUCCESS || jobid == 0) {
		v = getenv("SLURM_JOB_ID");
		if (v == NULL || (jobid = (uint32_t)strtoul(v, NULL, 10)) == 0)
			return 0;
	}
	v = getenv("SLURMD_NODENAME");
	if (v != NULL && *v != '\0')
		snprintf(node, sizeof(node), "%s", v);
	else if (gethostname(node, sizeof(node) - 1) < 0)
		snprintf(node, sizeof(node), "unknown");
	if (job_marker(marker, sizeof(marker), jobid, node, 0) < 0 || access(marker, F_OK) < 0)
		return 0; /* no step of this job used an image here */
	snprintf(s_job, sizeof(s_job), "%u", jobid);
	argv[0] = cfg.step_client;
	argv[1] = "cleanup-job";
	argv[2] = "--socket";
	argv[3] = cfg.socket; /* %n: the step client puts in the node name */
	argv[4] = "--job";
	argv[5] = s_job;
	argv[6] = "--node";
	argv[7] = node;
	argv[8] = NULL;
	/* Detached, like the step release: the job's end (and a standalone srun)
	 * must not wait for a Python start; the daemon does the work. */
	if (spawn_detached(argv, clean_env) < 0)
		slurm_info(PFX "job %s: cleanup could not be started", s_job);
	unlink(marker);
	return 0;
}
