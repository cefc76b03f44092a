/* remote.c - slurmstepd (root): prepare from init_post_opt to user_init, where what it
 * prints reaches srun as it comes; release at the step's end; cleanup-job in the epilog */
#include "oci.h"

#define STEP_BATCH 0xfffffffbU
#define STEP_EXTERN 0xfffffffcU

struct step st = { .nsfd = -1, .usernsfd = -1 };
static char s_job[16], s_step[16], s_uid[16], s_gid[16], s_node[16];
static int envfd = -1, errfd = -1;
static struct child prep = { -1, -1 };
static spank_t sp_now;

/* the step client's argv for CMD: the step; the job's environment on fd 3 */
static int step_argv(char **argv, const char *cmd, int options)
{
	char *head[] = { (char *)plug_arg(PS_STEP_CLIENT, ""), (char *)cmd, SC_ARG_JOB, s_job,
			 SC_ARG_STEP, s_step, SC_ARG_UID, s_uid, SC_ARG_GID, s_gid,
			 SC_ARG_NODE_ID, s_node, SC_ARG_JOB_ENV_FD, "3" };

	memcpy(argv, head, sizeof(head));
	return add_args(argv, sizeof(head) / sizeof(head[0]), options);
}

/* the job's environment as NAME=VALUE\0 records, not prepare's own environment */
static int env_memfd(char **env)
{
	int fd = memfd_create("oci-image-job-env", MFD_CLOEXEC);
	ssize_t w;

	for (; fd >= 0 && env != NULL && *env != NULL; env++)
		for (size_t o = 0, n = strlen(*env) + 1; o < n; o += (size_t)w)
			if ((w = write(fd, *env + o, n - o)) < 0 && errno != EINTR)
				return close(fd), -1;
			else if (w < 0)
				w = 0;
	return fd;
}

static int apply(const char *key, const char *val)
{
	const char *eq = strchr(val, '=');
	char *name = NULL;
	int rc = -1;

	if (strcmp(key, REC_ENV) == 0 && eq != NULL && eq != val &&
	    (name = strndup(val, (size_t)(eq - val))) != NULL)
		rc = spank_setenv(sp_now, name, eq + 1, 1) == ESPANK_SUCCESS ? 0 : -1;
	else if (strcmp(key, REC_UNSETENV) == 0)
		rc = spank_unsetenv(sp_now, val) == ESPANK_SUCCESS ? 0 : -1;
	else if (strcmp(key, REC_CWD) == 0 && val[0] == '/' && st.cwd == NULL)
		st.cwd = val, rc = 0;
	else if (strcmp(key, REC_ENTRYPOINT) == 0 && st.entrypoint == NULL)
		st.entrypoint = val, rc = 0;
	else if (strcmp(key, REC_LAUNCHER) == 0 && val[0] == '/' && st.launcher == NULL)
		st.launcher = val, rc = 0;
	return free(name), rc;
}

/* init_post_opt: prepare starts converting or mounting while slurmstepd sets the step
 * up; what it prints waits in a pipe until user_init */
int remote_post_opt(spank_t sp)
{
	char **env = NULL, *argv[MAX_ARGS];
	uint32_t job, step, nodeid;
	uid_t uid;
	gid_t gid;
	int p[2];

	if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS || !asked(env))
		return 0;
	if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_STEPID, &step) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_UID, &uid) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_GID, &gid) != ESPANK_SUCCESS ||
	    spank_get_item(sp, S_JOB_NODEID, &nodeid) != ESPANK_SUCCESS)
		return st.failed = 1, 0; /* shown in user_init: only from there does it reach srun */
	/* the batch script runs on the host (its sruns use the image), exactly as without us */
	if (step == STEP_EXTERN || (step == STEP_BATCH && !given[OCI_OPT_BATCH_IN_IMAGE] &&
				    !plug_true(PS_BATCH_IN_IMAGE)))
		return 0;
	snprintf(s_job, sizeof(s_job), "%u", job);
	snprintf(s_step, sizeof(s_step), "%u", step);
	snprintf(s_uid, sizeof(s_uid), "%u", (unsigned)uid);
	snprintf(s_gid, sizeof(s_gid), "%u", (unsigned)gid);
	snprintf(s_node, sizeof(s_node), "%u", nodeid);
	st.started = 1;
	st.batch = step == STEP_BATCH;
	if ((envfd = env_memfd(env)) < 0 || step_argv(argv, SC_PREPARE, 1) < 0 ||
	    pipe2(p, O_CLOEXEC) < 0)
		return st.failed = 1, 0;
	if (step_client_start(argv, 1, envfd, p[1], &prep) < 0)
		st.failed = 1, prep.pid = -1;
	close(p[1]);
	errfd = p[0];
	return 0;
}

void remote_user_init(spank_t sp)
{
	char buf[4096];
	ssize_t n, w = 0;

	if (prep.pid > 0) {
		/* prepare's progress and errors, to srun as they come (printable lines only);
		 * it closes its stderr before it sends its records */
		while ((n = read(errfd, buf, sizeof(buf))) != 0 && (n > 0 || errno == EINTR))
			for (ssize_t o = 0; o < n && w >= 0; o += w)
				if ((w = write(2, buf + o, (size_t)(n - o))) < 0 && errno == EINTR)
					w = 0;
		sp_now = sp;
		/* a prepare that exits 0 with nothing (no image asked for) leaves the step on
		 * the host; records without a namespace are a failure, never a step on the host */
		if (step_client_wait(&prep, &st.rec) == 0 && each_record(&st.rec, apply) == 0 &&
		    (st.entrypoint == NULL || st.launcher != NULL) && (st.rec.fd >= 0 || !st.rec.len))
			st.nsfd = st.rec.fd, st.usernsfd = st.rec.ufd;
		else if ((st.failed = 1) && st.rec.fd >= 0)
			close(st.rec.fd), close(st.rec.ufd); /* (EBADF for -1: harmless) */
		prep.pid = -1;
	}
	if (errfd >= 0)
		close(errfd);
	if (st.failed)
		slurm_error(PFX "could not start the step in the image");
}

void remote_exit(void)
{
	char *argv[MAX_ARGS];

	if (prep.pid > 0) { /* the step ended before user_init */
		kill(prep.pid, SIGKILL);
		while (waitpid(prep.pid, NULL, 0) < 0 && errno == EINTR)
			;
		st.failed = 1;
	}
	if (!st.started || (!st.failed && st.nsfd < 0))
		return; /* prepare made nothing to release */
	if (st.nsfd >= 0)
		close(st.nsfd); /* slurmstepd's own: the namespace must not outlive its release */
	if (st.usernsfd >= 0)
		close(st.usernsfd);
	if (step_argv(argv, SC_RELEASE, 0) < 0 || spawn_detached(argv, envfd) < 0)
		slurm_info(PFX "job %s step %s: release not started (its lease will expire)",
			   s_job, s_step);
}

/* where prepare marked that a step of the job used an image here: jobs/JOB next to the
 * socket (%n: the node), which cleanup-job removes */
static int marked(const char *node, uint32_t job)
{
	char path[PATH_MAX] = "", *slash;
	const char *p = plug_arg(PS_SOCKET, OCI_DEFAULT_SOCKET), *q;
	size_t o;

	for (; (q = strstr(p, "%n")) != NULL && (o = strlen(path)) < sizeof(path); p = q + 2)
		snprintf(path + o, sizeof(path) - o, "%.*s%s", (int)(q - p), p, node);
	o = strlen(path);
	snprintf(path + o, sizeof(path) - o, "%s", p);
	if ((slash = strrchr(path, '/')) == NULL || (o = (size_t)(slash - path)) + 32 > sizeof(path))
		return 0;
	snprintf(slash, sizeof(path) - o, "/jobs/%u", job);
	return access(path, F_OK) == 0;
}

/* The job ended on this node: cleanup-job releases what its steps left here (a slurmstepd
 * killed with SIGKILL never reached spank_exit); every other job ends as without us */
void job_epilog(spank_t sp)
{
	char node[256] = "", *argv[MAX_ARGS];
	const char *v = getenv("SLURMD_NODENAME");
	uint32_t job = 0;

	if (spank_get_item(sp, S_JOB_ID, &job) != ESPANK_SUCCESS && getenv("SLURM_JOB_ID"))
		job = (uint32_t)strtoul(getenv("SLURM_JOB_ID"), NULL, 10);
	if (v != NULL)
		snprintf(node, sizeof(node), "%s", v);
	else if (gethostname(node, sizeof(node) - 1) < 0)
		return;
	if (job == 0 || !marked(node, job))
		return;
	snprintf(s_job, sizeof(s_job), "%u", job);
	argv[0] = (char *)plug_arg(PS_STEP_CLIENT, ""), argv[1] = SC_CLEANUP_JOB;
	argv[2] = SC_ARG_JOB, argv[3] = s_job, argv[4] = SC_ARG_NODE, argv[5] = node;
	if (add_args(argv, 6, 0) < 0 || spawn_detached(argv, -1) < 0)
		slurm_info(PFX "job %s: cleanup not started (its leases will expire)", s_job);
}
