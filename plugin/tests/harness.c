/*
 * A test harness for the plugin's C, without a cluster: the option callback and its
 * registration, the plugstack arguments, asked(), the step client's argv, the record
 * reader (run_step_client, with real children), each_record, the records' apply of
 * local.c and remote.c, local.c's checksum, spawn_detached and the job epilog's
 * cleanup-job, against stubs of the few slurm_* / spank_* functions they call.
 * The plugin's parts are included so that their static functions are reachable (local.c
 * and remote.c both have a static apply: renamed on the way in); fork() goes through
 * harness_fork, which can be told to fail (a failed fork cannot be provoked otherwise as
 * root).  Run by `make -C plugin check` (tests/test_plugin_harness.py): it prints
 * "ok WHAT" or "FAIL WHAT" per check, PASSED last and exits 0 when all passed.
 */
#define _GNU_SOURCE
#include <sys/types.h>
#define fork harness_fork
static pid_t harness_fork(void);
#include "../dispatch.c"
#include "../args.c"
#include "../child.c"
#define apply local_apply
#include "../local.c"
#undef apply
#define apply remote_apply
#include "../remote.c"
#undef apply
#include "../task.c"
#undef fork
pid_t fork(void); /* <unistd.h> declared it under the macro's name */

#include <dirent.h>
#include <stdarg.h>
#include <time.h>

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

/* the stubs, and what they were called with */
static spank_context_t stub_ctx = S_CTX_LOCAL;
static int n_registered, register_fail_at = -1;
static struct spank_option *registered[64];
static uint32_t stub_job; /* S_JOB_ID: 0 = not available */
static char setenv_log[1024], unsetenv_log[1024];
static spank_t setenv_sp;
static int setenv_fail;

spank_context_t spank_context(void) { return stub_ctx; }
const char *spank_strerror(spank_err_t e) { return "stub"; }
spank_err_t spank_option_register(spank_t s, struct spank_option *o)
{
	if (n_registered == register_fail_at)
		return ESPANK_ERROR;
	if (n_registered < 64)
		registered[n_registered] = o;
	n_registered++;
	return ESPANK_SUCCESS;
}
spank_err_t spank_get_item(spank_t s, spank_item_t i, ...)
{
	va_list ap;
	spank_err_t rc = ESPANK_ERROR;

	va_start(ap, i);
	if (i == S_JOB_ID && stub_job != 0)
		*va_arg(ap, uint32_t *) = stub_job, rc = ESPANK_SUCCESS;
	va_end(ap);
	return rc;
}
spank_err_t spank_setenv(spank_t s, const char *n, const char *v, int o)
{
	size_t l = strlen(setenv_log);
	setenv_sp = s;
	snprintf(setenv_log + l, sizeof(setenv_log) - l, "%s=%s/%d;", n, v, o);
	return setenv_fail ? ESPANK_ERROR : ESPANK_SUCCESS;
}
spank_err_t spank_unsetenv(spank_t s, const char *n)
{
	size_t l = strlen(unsetenv_log);
	snprintf(unsetenv_log + l, sizeof(unsetenv_log) - l, "%s;", n);
	return ESPANK_SUCCESS;
}

static int failures;
#define CHECK(cond) do { if (!(cond)) { failures++; printf("FAIL %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, #cond, last_error); } else printf("ok %s\n", #cond); } while (0)

static void clear_given(void)
{
	for (int i = 0; i < OCI_N_OPTIONS; i++)
		free(given[i]), given[i] = NULL;
}

static void set_plug(int ac, char **av) { plug_ac = ac, plug_av = av; }

/* the calls each_record made to record_apply */
static char applied[256];
static int refuse_key_b;
static int record_apply(const char *key, const char *val)
{
	size_t l = strlen(applied);
	if (refuse_key_b && strcmp(key, "b") == 0)
		return -1;
	snprintf(applied + l, sizeof(applied) - l, "%s=%s;", key, val);
	return 0;
}
static int each(const char *buf, size_t len)
{
	static char copy[256];
	struct records r = { copy, len, -1, -1 };
	memcpy(copy, buf, len);
	applied[0] = '\0';
	return each_record(&r, record_apply);
}
#define EACH(lit) each(lit, sizeof(lit) - 1)

static int count_fds(void)
{
	DIR *d = opendir("/proc/self/fd");
	int n = 0;
	for (struct dirent *e; d != NULL && (e = readdir(d)) != NULL;)
		n += e->d_name[0] != '.';
	if (d != NULL)
		closedir(d);
	return n;
}

/* run /bin/sh -c script as the step client */
static int sh(const char *script, int as_root, int envfd, struct records *r)
{
	char *argv[] = { "/bin/sh", "-c", (char *)script, NULL };
	return run_step_client(argv, as_root, envfd, r);
}
#define RECS(r, lit) ((r).len == sizeof(lit) - 1 && memcmp((r).buf, lit, sizeof(lit) - 1) == 0)

static int memfd_with(const char *s, size_t len)
{
	int fd = memfd_create("harness", MFD_CLOEXEC);
	if (fd < 0 || write(fd, s, len) != (ssize_t)len || lseek(fd, 0, SEEK_SET) != 0)
		return -1;
	return fd;
}

/* wait (5 s at most) for path to exist, then its content */
static char *wait_file(const char *path)
{
	static char buf[4096];
	for (int i = 0; i < 500; i++) {
		int fd = open(path, O_RDONLY);
		if (fd >= 0) {
			ssize_t n = read(fd, buf, sizeof(buf) - 1);
			close(fd);
			buf[n > 0 ? n : 0] = '\0';
			return buf;
		}
		nanosleep(&(struct timespec){ 0, 10000000 }, NULL);
	}
	return NULL;
}

static int same_dev(int fd, const char *path)
{
	struct stat a, b;
	return fstat(fd, &a) == 0 && stat(path, &b) == 0 && S_ISCHR(a.st_mode) &&
	       a.st_rdev == b.st_rdev;
}

static void test_options(void)
{
	/* opt_cb: the raw value at its index; a flag is ""; the last call wins */
	clear_given();
	CHECK(opt_cb(1, "/a:/b:bogus", 0) == 0 && given[1] != NULL && strcmp(given[1], "/a:/b:bogus") == 0);
	int ci = 0; /* a value option of the aliases, wherever the table puts it */
	while (strcmp(oci_options[ci].name, "container-image") != 0)
		ci++;
	CHECK(opt_cb(ci, "u@reg#img", 1) == 0 && strcmp(given[ci], "u@reg#img") == 0);
	CHECK(opt_cb(3, NULL, 0) == 0 && given[3] != NULL && strcmp(given[3], "") == 0);
	/* a flag keeps no value (an sbatch flag reaches its job's srun with one) */
	CHECK(oci_options[3].has_arg == 0 && opt_cb(3, "1", 1) == 0 && strcmp(given[3], "") == 0);
	CHECK(opt_cb(1, "/c:/d", 0) == 0 && strcmp(given[1], "/c:/d") == 0);
	CHECK(given[0] == NULL && given[2] == NULL);
	CHECK(opt_cb(OCI_N_OPTIONS, "x", 0) == -1 && opt_cb(-1, "x", 0) == -1);
	CHECK(opt_cb(OCI_N_OPTIONS - 1, NULL, 0) == 0 && given[OCI_N_OPTIONS - 1] != NULL);
	clear_given();
	/* each option's val is its index, and each calls opt_cb */
	{
		int ok = 1;
		for (int i = 0; i < OCI_N_OPTIONS; i++)
			ok &= oci_options[i].val == i && oci_options[i].cb == opt_cb;
		CHECK(ok && oci_options[OCI_N_OPTIONS].name == NULL);
	}

	/* register_options: ours, or ours and pyxis' names */
	n_registered = 0;
	CHECK(register_options(NULL, 0) == 0 && n_registered == OCI_N_OWN &&
	      registered[0] == &oci_options[0] && registered[OCI_N_OWN - 1] == &oci_options[OCI_N_OWN - 1]);
	n_registered = 0;
	CHECK(register_options(NULL, 1) == 0 && n_registered == OCI_N_OPTIONS &&
	      registered[OCI_N_OPTIONS - 1] == &oci_options[OCI_N_OPTIONS - 1]);
	n_registered = 0;
	register_fail_at = 2;
	CHECK(register_options(NULL, 1) == -1 && n_registered == 2 && strstr(last_error, "--oci-workdir") != NULL);
	register_fail_at = -1;

	/* slurm_spank_init: pyxis_aliases spelt as the contract spells true (pyxis is not loaded here) */
	{
		char *yes[] = { "step_client=/x", "pyxis_aliases=YES" }, *no[] = { "pyxis_aliases=maybe" };
		n_registered = 0;
		stub_ctx = S_CTX_REMOTE;
		CHECK(slurm_spank_init(NULL, 2, yes) == 0 && n_registered == OCI_N_OPTIONS);
		n_registered = 0;
		CHECK(slurm_spank_init(NULL, 1, no) == 0 && n_registered == OCI_N_OWN);
		n_registered = 0;
		stub_ctx = S_CTX_SLURMD;
		CHECK(slurm_spank_init(NULL, 2, yes) == 0 && n_registered == 0);
		stub_ctx = S_CTX_LOCAL;
		set_plug(0, NULL);
	}
}

static void test_plugstack(void)
{
	char *av[] = { "socket=/a", "socket_x=/b", "sock=/s", "socket=/c" };
	char *only_x[] = { "socket_x=/b" };

	set_plug(4, av);
	CHECK(strcmp(plug_arg("socket", "d"), "/c") == 0);
	CHECK(strcmp(plug_arg("socket_x", "d"), "/b") == 0);
	CHECK(strcmp(plug_arg("sock", "d"), "/s") == 0);
	CHECK(strcmp(plug_arg("missing", "d"), "d") == 0);
	set_plug(1, only_x);
	CHECK(strcmp(plug_arg("socket", "d"), "d") == 0);
	set_plug(0, NULL);
	CHECK(plug_arg("socket", NULL) == NULL);
}

static void test_asked(void)
{
	char *none[] = { "PATH=/bin", "OCI_IMAGEX=1", "XOCI_IMAGE=1", "OCI_IMAGE_CHECKED=1", NULL };
	char *empty[] = { "OCI_IMAGE=", "OCI_MOUNTS=", NULL };
	char *image[] = { "PATH=/bin", "OCI_IMAGE=x", NULL };
	char *env_last[] = { "OCI_ENV=A", NULL };

	clear_given();
	CHECK(asked(NULL) == 0);
	CHECK(asked(none) == 0);
	CHECK(asked(empty) == 0);
	CHECK(asked(image) == 1);
	CHECK(asked(env_last) == 1);
	CHECK(opt_cb(4, NULL, 0) == 0 && asked(NULL) == 1 && asked(none) == 1);
	clear_given();
}

static void test_add_args(void)
{
	char *av[] = { "step_client=/sc", "socket=/s" }, *many[100], *argv[MAX_ARGS];
	int ac;

	set_plug(2, av);
	clear_given();
	opt_cb(0, "img", 0);
	opt_cb(3, NULL, 0);
	argv[0] = "x";
	ac = add_args(argv, 1, 1);
	CHECK(ac == 11 && strcmp(argv[1], "--plugstack") == 0 && strcmp(argv[2], "step_client=/sc") == 0 &&
	      strcmp(argv[3], "--plugstack") == 0 && strcmp(argv[4], "socket=/s") == 0);
	CHECK(ac == 11 && strcmp(argv[5], "--option") == 0 && strcmp(argv[6], "oci-image") == 0 &&
	      strcmp(argv[7], "img") == 0 && strcmp(argv[8], "--option") == 0 &&
	      strcmp(argv[9], "oci-writable") == 0 && strcmp(argv[10], "") == 0 && argv[11] == NULL);
	argv[5] = "junk";
	ac = add_args(argv, 1, 0);
	CHECK(ac == 5 && argv[5] == NULL);
	for (int i = 0; i < 100; i++)
		many[i] = "k=v";
	set_plug(100, many);
	CHECK(add_args(argv, 1, 0) == -1);
	set_plug(50, many);
	CHECK(add_args(argv, 20, 1) == -1); /* the options no longer fit */
	set_plug(0, NULL);
	clear_given();
}

static void test_each_record(void)
{
	CHECK(EACH("a\0" "1\0" "b\0" "2\0" "c\0" "\0") == 0 && strcmp(applied, "a=1;b=2;c=;") == 0);
	CHECK(each("", 0) == 0 && applied[0] == '\0');
	CHECK(EACH("a\0" "1\0" "b\0") == -1 && strcmp(applied, "a=1;") == 0);
	refuse_key_b = 1;
	CHECK(EACH("a\0" "1\0" "b\0" "2\0" "c\0" "3\0") == -1 && strcmp(applied, "a=1;") == 0);
	refuse_key_b = 0;
}

static void test_step_client(void)
{
	struct records r;
	int fd, before;

	/* started and collected apart (slurmstepd: init_post_opt, user_init), its stderr
	 * in a pipe of ours: what it wrote there, then its records */
	{
		char *argv[] = { "/bin/sh", "-c", "echo progress >&2; exec 2>&-; "
				 "printf 'cwd\\0/x\\0' >&4", NULL };
		struct child ch;
		char buf[64] = "";
		int p[2];
		ssize_t n;

		CHECK(pipe(p) == 0 && step_client_start(argv, 0, -1, p[1], &ch) == 0);
		close(p[1]);
		n = read(p[0], buf, sizeof(buf) - 1);
		CHECK(n == 9 && strcmp(buf, "progress\n") == 0 && read(p[0], buf, 1) == 0);
		close(p[0]);
		CHECK(step_client_wait(&ch, &r) == 0 && RECS(r, "cwd\0/x\0") && r.fd == -1);
		free(r.buf);
	}

	/* records larger than the socket's buffer, from a child that keeps its stdout open
	 * after closing its stderr: the pipe still ends (its stdout is not the pipe) */
	{
		char *argv[] = { "/bin/sh", "-c", "exec 2>&-; printf 'env\\0A=' >&4; "
				 "head -c 600000 /dev/zero | tr '\\0' a >&4; printf '\\0' >&4", NULL };
		struct child ch;
		char buf[64];
		int p[2];

		alarm(20); /* a deadlock fails the harness instead of hanging it */
		CHECK(pipe(p) == 0 && step_client_start(argv, 0, -1, p[1], &ch) == 0);
		close(p[1]);
		CHECK(read(p[0], buf, sizeof(buf)) == 0);
		close(p[0]);
		CHECK(step_client_wait(&ch, &r) == 0 && r.len == 4 + 2 + 600000 + 1);
		alarm(0);
		free(r.buf);
	}

	/* the records, as written on fd 4 */
	CHECK(sh("printf 'setenv\\0A=1\\0' >&4; printf 'atexit\\0x\\0' >&4", 0, -1, &r) == 0 &&
	      RECS(r, "setenv\0A=1\0atexit\0x\0") && r.fd == -1);
	free(r.buf);
	CHECK(sh("true", 0, -1, &r) == 0 && r.len == 0);
	free(r.buf);
	CHECK(sh("printf 'setenv\\0A=1\\0' >&4; exit 3", 0, -1, &r) == -1 && r.fd == -1);
	free(r.buf);
	CHECK(sh("kill -9 $$", 0, -1, &r) == -1);
	free(r.buf);
	CHECK(sh("printf 'setenv\\0A=1' >&4", 0, -1, &r) == -1);
	free(r.buf);
	{
		char *argv[] = { "/nonexistent/step-client", NULL };
		CHECK(run_step_client(argv, 0, -1, &r) == -1);
		free(r.buf);
	}
	forks = 0, fail_fork_at = 0;
	before = count_fds();
	CHECK(sh("true", 0, -1, &r) == -1 && count_fds() == before);
	free(r.buf);
	fail_fork_at = -1;

	/* fd 3 is envfd (else /dev/null), stdin /dev/null */
	fd = memfd_with("cwd\0/from-envfd\0", 16);
	CHECK(fd >= 0 && sh("cat <&3 >&4", 0, fd, &r) == 0 && RECS(r, "cwd\0/from-envfd\0"));
	free(r.buf);
	close(fd);
	CHECK(sh("cat <&3 >&4; cat >&4", 0, -1, &r) == 0 && r.len == 0);
	free(r.buf);

	/* nothing else of the parent's: a descriptor without CLOEXEC stays behind */
	fd = open("/dev/null", O_RDONLY);
	CHECK(fd >= 0 && dup2(fd, 57) == 57);
	close(fd);
	CHECK(sh("ls /proc/self/fd | tr '\\n' '\\0' >&4", 0, -1, &r) == 0);
	{
		int n = 0, high = 0;
		for (size_t i = 0; i < r.len; i += strlen(r.buf + i) + 1, n++)
			high += atoi(r.buf + i) >= 5; /* ls's own directory, once */
		CHECK(high <= 1);
		CHECK(r.len > 0 && memmem(r.buf, r.len, "\0" "57\0", 4) == NULL);
		CHECK(n >= 5 && memmem(r.buf, r.len, "3\0", 2) != NULL && memmem(r.buf, r.len, "4\0", 2) != NULL);
	}
	free(r.buf);
	CHECK(sh("for f in 5 6 7 8 9 10 11 12 57; do [ -e /proc/self/fd/$f ] && exit 1; done; exit 0", 0, -1, &r) == 0);
	free(r.buf);
	close(57);

	/* as_root: root, in /, with the fixed environment */
	setenv("HARNESS_SECRET", "1", 1);
	CHECK(sh("printf 'cwd\\0%s\\0env\\0%s\\0' \"$(pwd)\" \"${HARNESS_SECRET-unset}:$PATH\" >&4", 1, -1, &r) == 0 &&
	      RECS(r, "cwd\0/\0env\0unset:/usr/sbin:/usr/bin:/sbin:/bin\0"));
	free(r.buf);
	CHECK(sh("printf 'env\\0%s\\0' \"${HARNESS_SECRET-unset}\" >&4", 0, -1, &r) == 0 && RECS(r, "env\0" "1\0"));
	free(r.buf);
	unsetenv("HARNESS_SECRET");

	/* a descriptor sent with SCM_RIGHTS */
	if (access("/usr/bin/python3", X_OK) != 0) {
		printf("ok skipped: SCM_RIGHTS (no /usr/bin/python3)\n");
		return;
	}
	{
		char *one[] = { "/usr/bin/python3", "-c",
			"import os, socket\n"
			"s = socket.socket(fileno=4)\n"
			"socket.send_fds(s, [b'cwd\\0/x\\0'], [os.open('/dev/null', os.O_RDONLY)])\n", NULL };
		char *two[] = { "/usr/bin/python3", "-c",
			"import os, socket\n"
			"s = socket.socket(fileno=4)\n"
			"socket.send_fds(s, [b'cwd\\0/x\\0'], [os.open('/dev/null', os.O_RDONLY)])\n"
			"socket.send_fds(s, [b'env\\0A=B\\0'], [os.open('/dev/zero', os.O_RDONLY)])\n", NULL };
		char *pair[] = { "/usr/bin/python3", "-c",
			"import os, socket\n"
			"s = socket.socket(fileno=4)\n"
			"socket.send_fds(s, [b'cwd\\0/x\\0'], [os.open('/dev/null', os.O_RDONLY), os.open('/dev/zero', os.O_RDONLY)])\n", NULL };
		char *three[] = { "/usr/bin/python3", "-c",
			"import os, socket\n"
			"s = socket.socket(fileno=4)\n"
			"socket.send_fds(s, [b'cwd\\0/x\\0'], [os.open('/dev/null', os.O_RDONLY), os.open('/dev/zero', os.O_RDONLY)])\n"
			"socket.send_fds(s, [b'env\\0A=B\\0'], [os.open('/dev/full', os.O_RDONLY)])\n", NULL };
		char *fails[] = { "/usr/bin/python3", "-c",
			"import os, socket, sys\n"
			"s = socket.socket(fileno=4)\n"
			"socket.send_fds(s, [b'cwd\\0/x\\0'], [os.open('/dev/null', os.O_RDONLY)])\n"
			"sys.exit(2)\n", NULL };

		before = count_fds();
		CHECK(run_step_client(one, 0, -1, &r) == 0 && RECS(r, "cwd\0/x\0") && r.fd >= 0 &&
		      same_dev(r.fd, "/dev/null") && (fcntl(r.fd, F_GETFD) & FD_CLOEXEC));
		CHECK(count_fds() == before + 1);
		if (r.fd >= 0)
			close(r.fd);
		free(r.buf);
		CHECK(count_fds() == before);

		/* the mount namespace, then (--oci-remap-root) the user namespace: the first two,
		 * in order, in one message or two */
		CHECK(run_step_client(two, 0, -1, &r) == 0 && RECS(r, "cwd\0/x\0env\0A=B\0") && r.fd >= 0 &&
		      same_dev(r.fd, "/dev/null") && r.ufd >= 0 && same_dev(r.ufd, "/dev/zero") &&
		      (fcntl(r.ufd, F_GETFD) & FD_CLOEXEC));
		CHECK(count_fds() == before + 2);
		close(r.fd), close(r.ufd);
		free(r.buf);

		CHECK(run_step_client(pair, 0, -1, &r) == 0 && r.fd >= 0 && same_dev(r.fd, "/dev/null") &&
		      r.ufd >= 0 && same_dev(r.ufd, "/dev/zero"));
		close(r.fd), close(r.ufd);
		free(r.buf);
		CHECK(count_fds() == before);

		/* a third is closed: none may stay open here */
		CHECK(run_step_client(three, 0, -1, &r) == 0 && same_dev(r.fd, "/dev/null") &&
		      same_dev(r.ufd, "/dev/zero") && count_fds() == before + 2);
		close(r.fd), close(r.ufd);
		free(r.buf);
		CHECK(count_fds() == before);

		CHECK(run_step_client(fails, 0, -1, &r) == -1 && r.fd == -1 && r.ufd == -1 &&
		      count_fds() == before);
		free(r.buf);
	}
}

static void test_local(void)
{
	char *argv1[] = { "/sc", "submit", "--option", "oci-image", "a", NULL };
	char *argv2[] = { "/other", "submit", "--option", "oci-image", "a", NULL };
	char *argv3[] = { "/sc", "submit", "--option", "oci-image", "ab", NULL };
	char s1[20], s2[20], s3[20];

	unsetenv("HARNESS_X");
	CHECK(local_apply("setenv", "HARNESS_X=1=2") == 0 && getenv("HARNESS_X") != NULL &&
	      strcmp(getenv("HARNESS_X"), "1=2") == 0);
	CHECK(local_apply("setenv", "HARNESS_X=") == 0 && strcmp(getenv("HARNESS_X"), "") == 0);
	unsetenv("HARNESS_X");
	CHECK(local_apply("setenv", "HARNESS_X") == -1 && getenv("HARNESS_X") == NULL);
	CHECK(local_apply("setenv", "=x") == -1);
	CHECK(local_apply("bogus", "A=1") == -1 && local_apply("env", "A=1") == -1);
	n_exit = 1;
	CHECK(local_apply("atexit", "record-job") == 0 && local_apply("atexit", "--job") == 0 &&
	      n_exit == 3 && strcmp(at_exit[1], "record-job") == 0 && strcmp(at_exit[2], "--job") == 0 &&
	      at_exit[3] == NULL);
	free(at_exit[1]), free(at_exit[2]);
	at_exit[1] = at_exit[2] = NULL;
	n_exit = 1;

	/* checksum: argv (not argv[0]) and the OCI_* variables */
	unsetenv("OCI_MOUNTS");
	checksum(argv1, s1, sizeof(s1));
	checksum(argv2, s2, sizeof(s2));
	CHECK(strlen(s1) == 16 && strcmp(s1, s2) == 0);
	checksum(argv3, s3, sizeof(s3));
	CHECK(strcmp(s1, s3) != 0);
	argv3[4] = "b";
	checksum(argv3, s3, sizeof(s3));
	CHECK(strcmp(s1, s3) != 0);
	setenv("OCI_MOUNTS", "/a:/b", 1);
	checksum(argv1, s2, sizeof(s2));
	CHECK(strcmp(s1, s2) != 0);
	setenv("OCI_MOUNTS", "/a:/c", 1);
	checksum(argv1, s3, sizeof(s3));
	CHECK(strcmp(s2, s3) != 0);
	setenv("OCI_MOUNTS", "", 1); /* an empty variable is no variable */
	checksum(argv1, s3, sizeof(s3));
	CHECK(strcmp(s1, s3) == 0);
	unsetenv("OCI_MOUNTS");
	checksum(argv1, s3, sizeof(s3));
	CHECK(strcmp(s1, s3) == 0);
}

static void test_remote(void)
{
	spank_t fake = (spank_t)&st;

	memset(&st, 0, sizeof(st));
	st.nsfd = -1;
	sp_now = fake;
	setenv_log[0] = unsetenv_log[0] = '\0';
	CHECK(remote_apply("env", "A=1=2") == 0 && strcmp(setenv_log, "A=1=2/1;") == 0 && setenv_sp == fake);
	CHECK(remote_apply("env", "B=") == 0 && strcmp(setenv_log, "A=1=2/1;B=/1;") == 0);
	CHECK(remote_apply("env", "=x") == -1 && remote_apply("env", "noeq") == -1 &&
	      strcmp(setenv_log, "A=1=2/1;B=/1;") == 0);
	setenv_fail = 1;
	CHECK(remote_apply("env", "C=1") == -1);
	setenv_fail = 0;
	CHECK(remote_apply("unsetenv", "LD_PRELOAD") == 0 && strcmp(unsetenv_log, "LD_PRELOAD;") == 0);
	CHECK(remote_apply("cwd", "/work") == 0 && st.cwd != NULL && strcmp(st.cwd, "/work") == 0);
	CHECK(remote_apply("cwd", "relative") == -1 && strcmp(st.cwd, "/work") == 0);
	/* a record once: a second one (a value that smuggled a NUL) is refused */
	CHECK(remote_apply("cwd", "/etc") == -1 && strcmp(st.cwd, "/work") == 0);
	CHECK(remote_apply("launcher", "/usr/bin/oci-image-launch") == 0 && st.launcher != NULL);
	CHECK(remote_apply("launcher", "/dev/watchdog") == -1 &&
	      strcmp(st.launcher, "/usr/bin/oci-image-launch") == 0);
	st.launcher = NULL;
	CHECK(remote_apply("launcher", "oci-image-launch") == -1 && st.launcher == NULL);
	CHECK(remote_apply("entrypoint", "/bin/sh,-c") == 0 && strcmp(st.entrypoint, "/bin/sh,-c") == 0);
	CHECK(remote_apply("entrypoint", "/bin/x,") == -1 && strcmp(st.entrypoint, "/bin/sh,-c") == 0);
	CHECK(remote_apply("bogus", "x") == -1 && remote_apply("setenv", "A=1") == -1);
	memset(&st, 0, sizeof(st));
	st.nsfd = -1;
	sp_now = NULL;

	/* env_memfd: the job's environment as NAME=VALUE\0 */
	{
		char *env[] = { "A=1", "B=", NULL }, buf[16];
		int fd = env_memfd(env);
		CHECK(fd >= 0 && pread(fd, buf, sizeof(buf), 0) == 7 && memcmp(buf, "A=1\0B=\0", 7) == 0);
		if (fd >= 0)
			close(fd);
	}
	/* the tasks: nothing to do without a namespace, fail after a failed prepare */
	CHECK(task_privileged(NULL) == 0 && task_chdir() == 0);
	st.failed = 1;
	CHECK(task_privileged(NULL) == -1);
	st.failed = 0;
}

static void test_spawn(const char *dir)
{
	char out[256], tmp[256], cmd[1024], stat_line[512];
	char *argv[] = { "/bin/sh", "-c", cmd, NULL };
	char *never[] = { "/bin/sh", "-c", "exit 0", NULL };
	int fd;

	forks = 0, fail_fork_at = 0;
	CHECK(spawn_detached(never, -1) == -1);
	forks = 0, fail_fork_at = 1; /* the child's fork: its counter is a copy, at 1 */
	CHECK(spawn_detached(never, -1) == -1);
	forks = 0, fail_fork_at = -1;

	snprintf(out, sizeof(out), "%s/spawned", dir);
	snprintf(tmp, sizeof(tmp), "%s/spawned.tmp", dir);
	snprintf(cmd, sizeof(cmd), "{ cat <&3; echo; cat /proc/self/stat; } > %s && mv %s %s", tmp, tmp, out);
	fd = memfd_with("from-envfd", 10);
	CHECK(fd >= 0 && spawn_detached(argv, fd) == 0);
	close(fd);
	{
		char *got = wait_file(out), *p;
		int sid = -1, nice = -100;
		CHECK(got != NULL && strncmp(got, "from-envfd\n", 11) == 0);
		snprintf(stat_line, sizeof(stat_line), "%s", got != NULL ? got : "");
		/* after "(cat) ": state ppid pgrp session ... priority(18) nice(19) */
		if ((p = strrchr(stat_line, ')')) != NULL)
			sscanf(p + 2, "%*c %*d %*d %d %*d %*d %*u %*u %*u %*u %*u %*u %*u %*d %*d %*d %d",
			       &sid, &nice);
		CHECK(sid > 0 && sid != getsid(0)); /* its own session */
		CHECK(nice == 10);
	}
}

static void test_epilog(const char *dir)
{
	char script[256], out[256], ps[300], sock[300], jobs[320], mark[340], expect[1024];
	char *av[2] = { ps, sock };
	FILE *f;

	snprintf(script, sizeof(script), "%s/step-client", dir);
	snprintf(out, sizeof(out), "%s/argv", dir);
	snprintf(ps, sizeof(ps), "step_client=%s", script);
	/* %n: several daemons on one host; the marker is jobs/JOB next to the node's socket */
	snprintf(sock, sizeof(sock), "socket=%s/%%n/oci.sock", dir);
	snprintf(jobs, sizeof(jobs), "%s/node7", dir);
	mkdir(jobs, 0700);
	snprintf(jobs, sizeof(jobs), "%s/node7/jobs", dir);
	mkdir(jobs, 0700);
	f = fopen(script, "w");
	fprintf(f, "#!/bin/sh\nprintf '%%s\\n' \"$0\" \"$@\" > %s.tmp && mv %s.tmp %s\n", out, out, out);
	fclose(f);
	chmod(script, 0755);

	/* no job id: nothing run */
	stub_job = 0;
	unsetenv("SLURM_JOB_ID");
	setenv("SLURMD_NODENAME", "node7", 1);
	CHECK(slurm_spank_job_epilog(NULL, 2, av) == 0);
	/* a job no step of which used an image here: nothing run either */
	stub_job = 42;
	CHECK(slurm_spank_job_epilog(NULL, 2, av) == 0);
	nanosleep(&(struct timespec){ 0, 300000000 }, NULL);
	CHECK(access(out, F_OK) != 0);

	snprintf(mark, sizeof(mark), "%s/42", jobs);
	close(open(mark, O_WRONLY | O_CREAT, 0600));
	CHECK(slurm_spank_job_epilog(NULL, 2, av) == 0);
	snprintf(expect, sizeof(expect), "%s\ncleanup-job\n--job\n42\n--node\nnode7\n--plugstack\n%s\n"
		 "--plugstack\n%s\n", script, ps, sock);
	{
		char *got = wait_file(out);
		CHECK(got != NULL && strcmp(got, expect) == 0);
		if (got != NULL && strcmp(got, expect) != 0)
			printf("# got: %s\n# expected: %s\n", got, expect);
	}
	unlink(out);
	/* no S_JOB_ID: SLURM_JOB_ID; the marker of the default socket's directory */
	stub_job = 0;
	setenv("SLURM_JOB_ID", "43", 1);
	snprintf(mark, sizeof(mark), "%s/43", jobs);
	close(open(mark, O_WRONLY | O_CREAT, 0600));
	CHECK(slurm_spank_job_epilog(NULL, 2, av) == 0);
	{
		char *got = wait_file(out);
		CHECK(got != NULL && strstr(got, "\n--job\n43\n--node\nnode7\n--plugstack\n") != NULL);
	}
	unlink(out);
	unsetenv("SLURM_JOB_ID");
	unsetenv("SLURMD_NODENAME");
	set_plug(0, NULL);
}

int main(void)
{
	char dir[] = "/tmp/oci-harness-XXXXXX", cmd[64];

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (mkdtemp(dir) == NULL)
		return perror("mkdtemp"), 2;
	test_options();
	test_plugstack();
	test_asked();
	test_add_args();
	test_each_record();
	test_step_client();
	test_local();
	test_remote();
	test_spawn(dir);
	test_epilog(dir);

	snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
	if (system(cmd) != 0)
		printf("# could not remove %s\n", dir);
	printf("%s\n", failures ? "FAILED" : "PASSED");
	return failures ? 1 : 0;
}
