/*
 * A test harness for the plugin's C, without a cluster: the option callbacks, the
 * variable fallbacks, the record parser, the plugstack parser, the line sanitiser and
 * spawn_detached, against stubs of the few slurm_* / spank_* functions they call.
 * The plugin's parts are included so that their static functions are reachable; fork()
 * goes through harness_fork, which can be told to fail (a failed fork cannot be
 * provoked otherwise as root).  Run by tests/test_plugin_harness.py; exit 0 = all passed.
 */
#define _GNU_SOURCE
#include <sys/types.h>
#define fork harness_fork
static pid_t harness_fork(void);
#include "../dispatch.c"
#include "../args.c"
#include "../child.c"
#include "../local.c"
#include "../remote.c"
#include "../task.c"
#undef fork
pid_t fork(void); /* <unistd.h> declared it under the macro's name */

#include <stdarg.h>

static int fail_fork_at = -1, forks; /* the fork that fails (0-based, this process only) */
static char last_error[4096];

static pid_t harness_fork(void)
{
	if (forks++ == fail_fork_at) {
		errno = EAGAIN;
		return -1;
	}
	return fork();
}

#define LOGGER(name)                                                            \
	void name(const char *fmt, ...)                                         \
	{                                                                       \
		va_list ap;                                                     \
		va_start(ap, fmt);                                              \
		vsnprintf(last_error, sizeof(last_error), fmt, ap);             \
		va_end(ap);                                                     \
	}
LOGGER(slurm_error)
LOGGER(slurm_info)
LOGGER(slurm_verbose)
LOGGER(slurm_debug)
LOGGER(slurm_spank_log)

spank_context_t spank_context(void) { return S_CTX_LOCAL; }
const char *spank_strerror(spank_err_t e) { (void)e; return "stub"; }
spank_err_t spank_option_register(spank_t s, struct spank_option *o) { (void)s; (void)o; return ESPANK_SUCCESS; }
spank_err_t spank_get_item(spank_t s, spank_item_t i, ...) { (void)s; (void)i; return ESPANK_ERROR; }
spank_err_t spank_setenv(spank_t s, const char *n, const char *v, int o) { (void)s; (void)n; (void)v; (void)o; return ESPANK_SUCCESS; }
spank_err_t spank_unsetenv(spank_t s, const char *n) { (void)s; (void)n; return ESPANK_SUCCESS; }
oci_hostlist slurm_hostlist_create(const char *h) { (void)h; return NULL; }
char *slurm_hostlist_shift(oci_hostlist h) { (void)h; return NULL; }
void slurm_hostlist_destroy(oci_hostlist h) { (void)h; }

static int failures;
#define CHECK(cond) do { if (!(cond)) { failures++; printf("FAIL %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, #cond, last_error); } else printf("ok %s\n", #cond); } while (0)

static void reset_opt(void)
{
	free(opt.image); free(opt.c_image); free(opt.mounts); free(opt.workdir);
	free(opt.env_names); free(opt.writable); free(opt.mount_home); free(opt.entrypoint);
	memset(&opt, 0, sizeof(opt));
}

static const char *fake_env(const char *name, void *ctx)
{
	return get_jobenv(name, ctx);
}

/* prepare's stdout as the parser sees it (st.out), len bytes of s */
static int parse(const char *s, size_t len)
{
	static char buf[4096];
	memset(&st, 0, sizeof(st));
	memcpy(buf, s, len);
	st.out = buf;
	st.out_len = len;
	return parse_prepare_output();
}
#define PARSE(lit) parse(lit, sizeof(lit) - 1)

int main(void)
{
	char *args_ok[] = { "step_client=/usr/bin/true", "record_job=TRUE", "allow_sqfs=1" };
	char *args_bad[] = { "step_client=/usr/bin/true", "allow_sqfs=maybe" };
	char *spawn_argv[] = { "/bin/true", NULL };
	char *env[] = { "OCI_IMAGE=from/env:1", "OCI_WRITABLE=yes", "OCI_MOUNTS=/a:", "OCI_MOUNT_HOME=no", NULL };

	/* option callbacks: raw values kept, no checks of their own (the step client's job) */
	CHECK(opt_cb(O_MOUNTS, "/a:/b:", 0) == 0 && strcmp(opt.mounts, "/a:/b:") == 0);
	CHECK(opt_cb(O_C_IMAGE, "u@reg#img", 0) == 0 && strcmp(opt.c_image, "u@reg#img") == 0);
	CHECK(opt_cb(O_WORKDIR, "relative", 0) == 0 && strcmp(opt.workdir, "relative") == 0);
	CHECK(opt_cb(O_WRITABLE, NULL, 0) == 0 && strcmp(opt.writable, "1") == 0);
	CHECK(opt_cb(O_READONLY, NULL, 0) == 0 && strcmp(opt.writable, "0") == 0);
	CHECK(opt_cb(O_MOUNT_HOME, NULL, 0) == 0 && opt_cb(O_NO_MOUNT_HOME, NULL, 0) == -1);
	CHECK(opt_cb(O_IMAGE, "", 0) == -1 && strstr(last_error, "needs a value") != NULL);
	CHECK(opt.given == 1);
	reset_opt();

	/* variables fill what was not given, raw; an option wins over its variable */
	CHECK(opt_cb(O_MOUNTS, "/x:/y", 0) == 0);
	CHECK(env_fallbacks(fake_env, env) == 0);
	CHECK(strcmp(opt.image, "from/env:1") == 0 && strcmp(opt.writable, "yes") == 0);
	CHECK(strcmp(opt.mounts, "/x:/y") == 0 && strcmp(opt.mount_home, "no") == 0);
	reset_opt();
	CHECK(opt_cb(O_C_IMAGE, "reg#img", 0) == 0 && env_fallbacks(fake_env, env) == 0 &&
	      opt.image == NULL); /* --container-image is the image: OCI_IMAGE is not taken */
	reset_opt();

	/* the record parser */
	CHECK(PARSE("ns\0/run/ns\0holder\0001 2 3\0cwd\0/w\0env\0A=1\0unsetenv\0B\0") == 0 &&
	      strcmp(st.ns, "/run/ns") == 0 && st.holder_pid == 1 && st.ns_inode == 3 &&
	      st.n_env == 1 && st.n_unset == 1);
	CHECK(PARSE("cwd\0/w\0") == -1);                              /* no ns, no holder */
	CHECK(PARSE("ns\0/n\0holder\0001 2 3\0cwd\0/a\0cwd\0/b\0") == -1); /* repeated */
	CHECK(PARSE("ns\0/n\0holder\0001 2 3\0bogus\0x\0") == -1);     /* unknown key */
	CHECK(PARSE("ns\0/n\0holder\0001 2 3\0env\0=x\0") == -1);      /* no name */
	CHECK(PARSE("ns\0/n\0holder\0001 2 3") == -1);                 /* not NUL-terminated */
	CHECK(PARSE("ns\0/n\0holder\0001 2 3\0entrypoint\0/bin/sh,\0") == -1); /* not asked for */
	opt.entrypoint = strdup("yes");
	CHECK(PARSE("ns\0/n\0holder\0001 2 3\0entrypoint\0/bin/sh,\0") == 0 && st.entrypoint != NULL);
	CHECK(PARSE("ns\0/n\0holder\0001 2 3\0entrypoint\0a b,\0") == -1); /* not the encoding */
	reset_opt();

	/* plugstack: booleans spelt as the contract spells them; defaults from the contract */
	CHECK(parse_args(3, args_ok) == 0 && cfg.record_job == 1 && cfg.allow_sqfs == 1 &&
	      strcmp(cfg.socket, OCI_DEFAULT_SOCKET) == 0 &&
	      strcmp(cfg.prefetch_socket, OCI_DEFAULT_PREFETCH_SOCKET) == 0 &&
	      strcmp(cfg.launcher, "/usr/bin/oci-image-launch") == 0);
	CHECK(parse_args(2, args_bad) == -1 && strstr(last_error, "allow_sqfs=maybe") != NULL);

	/* control characters (C0, DEL, C1) become '?' */
	{
		char out[64];
		sanitize(out, sizeof(out), "a\x1b[31mb\x7f\xc2\x9b" "c\td", 0);
		CHECK(strcmp(out, "a?[31mb??c\td") == 0);
	}

	/* spawn_detached: success only once the detached grandchild exists */
	forks = 0;
	fail_fork_at = -1;
	CHECK(spawn_detached(spawn_argv, clean_env) == 0);
	forks = 0;
	fail_fork_at = 1; /* the child's fork (the harness counter is per process: copied) */
	CHECK(spawn_detached(spawn_argv, clean_env) == -1);
	forks = 0;
	fail_fork_at = 0;
	CHECK(spawn_detached(spawn_argv, clean_env) == -1);

	printf("%s\n", failures ? "FAILED" : "PASSED");
	return failures ? 1 : 0;
}
