/* local.c - srun, sbatch, salloc (as the user): submit checks every option as the nodes
 * will, pins the image's digest and starts a prefetch; sbatch's exit records the job */
#include "oci.h"

static char *at_exit[MAX_ARGS]; /* a step client call for sbatch's exit (record-job) */
static int n_exit = 1;

static int apply(const char *key, const char *val)
{
	const char *eq = strchr(val, '=');
	char *name;
	int rc;

	if (strcmp(key, REC_ATEXIT) == 0 && n_exit < MAX_ARGS - 1)
		return (at_exit[n_exit++] = strdup(val)) != NULL ? 0 : -1;
	if (strcmp(key, REC_SETENV) != 0 || eq == NULL || eq == val ||
	    (name = strndup(val, (size_t)(eq - val))) == NULL)
		return -1;
	rc = setenv(name, eq + 1, 1); /* srun, sbatch and salloc pass it on */
	return free(name), rc;
}

static uint64_t fnv1a(uint64_t h, const char *p) /* the string and its NUL */
{
	for (;; p++)
		if ((h = (h ^ (unsigned char)*p) * 1099511628211ULL), *p == '\0')
			return h;
}

/* FNV-1a of what submit checks: an srun in a job whose sbatch had the same options and
 * variables need not run it again (40 ms); prepare checks them on every node anyway */
static void checksum(char **argv, char *out, size_t n)
{
	uint64_t h = 14695981039346656037ULL;

	for (char **a = argv + 1; *a != NULL; a++)
		h = fnv1a(h, *a);
	for (const char *const *e = oci_envs; *e != NULL; e++)
		h = fnv1a(h, getenv(*e) ? getenv(*e) : "");
	snprintf(out, n, "%016llx", (unsigned long long)h);
}

/* Whether srun's own command line may matter to submit (--multi-prog with an entrypoint,
 * -D/--chdir), which the checksum does not cover: then the shortcut below is not taken.
 * Only a rough look (an argument anywhere that may be -D or --chdir); submit parses it. */
static int srun_needs_submit(char **argv)
{
	const char *e = getenv("OCI_ENTRYPOINT");
	char buf[8192];
	ssize_t n;
	int fd;

	if (strcmp(program_invocation_short_name, "srun") != 0)
		return 0;
	for (char **a = argv; *a != NULL; a++)
		if (strcmp(*a, "oci-entrypoint") == 0 || strcmp(*a, "container-entrypoint") == 0)
			return 1;
	if ((e != NULL && *e != '\0') || getenv("SLURM_WORKING_DIR") != NULL)
		return 1; /* (srun's -D, from its environment) */
	if ((fd = open("/proc/self/cmdline", O_RDONLY | O_CLOEXEC)) < 0)
		return 1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0 || n == (ssize_t)sizeof(buf) - 1)
		return 1;
	buf[n] = '\0';
	for (char *p = buf; p < buf + n; p += strlen(p) + 1)
		if (strncmp(p, "--ch", 4) == 0 || (p[0] == '-' && p[1] != '-' && strchr(p, 'D')))
			return 1;
	return 0;
}

int local_post_opt(void)
{
	char *argv[MAX_ARGS], sum[20], wd[PATH_MAX], cols[16];
	const char *prev = getenv(OCI_CHECKED_VAR);
	int local = spank_context() == S_CTX_LOCAL, ac, rc;
	struct winsize ws;
	struct records r;

	if (!asked(environ))
		return 0;
	/* srun's directory and terminal, which slurmstepd cannot see */
	if (local && getcwd(wd, sizeof(wd)) != NULL)
		setenv("OCI_SUBMIT_CWD", wd, 1);
	unsetenv("OCI_SUBMIT_TTY");
	unsetenv("OCI_SUBMIT_CHDIR"); /* submit sets it again for this srun's --chdir */
	if (local && isatty(2)) {
		int known = ioctl(2, TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 20;
		snprintf(cols, sizeof(cols), "%u", known ? (unsigned)ws.ws_col : 0U);
		setenv("OCI_SUBMIT_TTY", cols, 1);
	}
	argv[0] = at_exit[0] = (char *)plug_arg(PS_STEP_CLIENT, "");
	argv[1] = SC_SUBMIT;
	if (argv[0][0] != '/' || (ac = add_args(argv, 2, 1)) < 0) {
		slurm_error(PFX "plugstack.conf: step_client=PATH (absolute) is required");
		return -1;
	}
	checksum(argv, sum, sizeof(sum));
	if (local && prev != NULL && strcmp(prev, sum) == 0 && !srun_needs_submit(argv))
		return 0; /* (an sbatch or salloc in a job: its own job needs its record, prefetch) */
	argv[ac++] = SC_ARG_CALLER;
	argv[ac++] = program_invocation_short_name;
	argv[ac] = NULL;
	rc = run_step_client(argv, 0, -1, &r) == 0 && each_record(&r, apply) == 0 ? 0 : -1;
	if (rc == 0)
		setenv(OCI_CHECKED_VAR, sum, 1);
	return free(r.buf), rc;
}

/* sbatch's exit, synchronously: a loop of sbatch calls records each job before the next */
void local_exit(void)
{
	struct records r;

	if (n_exit > 1) {
		(void)run_step_client(at_exit, 0, -1, &r);
		free(r.buf);
	}
}
