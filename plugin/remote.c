/*
 * remote.c - slurmstepd (root): prepare started in init_post_opt with the options'
 * raw values, waited for in user_init (its progress relayed live), its records
 * parsed; release at the step's end, cleanup-job in the job epilog.
 * Part of spank_oci_image.so: what the parts share is in oci.h.
 */
#include "oci.h"

struct oci_step st;

static void defer(const char *line)
{
	if (st.n_deferred < MAX_DEFERRED) {
		char *d = strdup(line);
		if (d != NULL)
			st.deferred[st.n_deferred++] = d;
	}
}

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
		if (strcmp(key, REC_NS) == 0) {
			if (st.ns != NULL || val[0] != '/') {
				slurm_error(PFX "step client prepare: bad or repeated ns");
				return -1;
			}
			st.ns = val;
		} else if (strcmp(key, REC_HOLDER) == 0) {
			char tail;
			if (st.holder_pid != 0 ||
			    sscanf(val, "%lu %llu %llu%c", &st.holder_pid, &st.holder_start,
				   &st.ns_inode, &tail) != 3 || st.holder_pid == 0 || st.ns_inode == 0) {
				slurm_error(PFX "step client prepare: bad or repeated holder");
				return -1;
			}
		} else if (strcmp(key, REC_CWD) == 0) {
			if (st.cwd != NULL || val[0] != '/') {
				slurm_error(PFX "step client prepare: bad or repeated cwd");
				return -1;
			}
			st.cwd = val;
		} else if (strcmp(key, REC_ENV) == 0) {
			char *eq = strchr(val, '=');
			if (eq == NULL || eq == val || st.n_env >= sizeof(st.env) / sizeof(st.env[0])) {
				slurm_error(PFX "step client prepare: bad env record \"%.64s\"", val);
				return -1;
			}
			st.env[st.n_env++] = val;
		} else if (strcmp(key, REC_ENTRYPOINT) == 0) {
			/* only when asked for (the step client says whether "1"/"yes"/... means it) */
			if (st.entrypoint != NULL || opt.entrypoint == NULL || !entrypoint_ok(val)) {
				slurm_error(PFX "step client prepare: bad or unexpected entrypoint record");
				return -1;
			}
			st.entrypoint = val;
		} else if (strcmp(key, REC_UNSETENV) == 0) {
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

int remote_post_opt(spank_t sp)
{
	char **jobenv = NULL;
	uid_t uid;
	gid_t gid;
	char s_job[16], s_step[16], s_uid[16], s_gid[16], s_fd[] = "3";
	const char *pinned, *cwd;
	char *argv[MAX_ARGS];
	int ac = 0, fd = -1, rc = -1;
	uint32_t nodeid = 0;
	spank_err_t e;

	if (spank_get_item(sp, S_JOB_ENV, &jobenv) != ESPANK_SUCCESS)
		jobenv = NULL;
	if (env_fallbacks(get_jobenv, jobenv) < 0)
		return -1;
	if (!have_image())
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

	pinned = get_jobenv("OCI_IMAGE_PINNED", jobenv); /* the step client picks it if it matches */
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
	ac = add_option_args(argv, ac);
	if (pinned != NULL && *pinned != '\0') { ARG(SC_PREPARE_PINNED); ARG(pinned); }
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

/* Messages from init_post_opt, shown once the step's I/O reaches srun. */
static void relay_deferred(void)
{
	for (size_t i = 0; i < st.n_deferred; i++) {
		slurm_spank_log("%s", st.deferred[i]);
		free(st.deferred[i]);
	}
	st.n_deferred = 0;
}

int remote_user_init(spank_t sp, int ac, char **av)
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

int remote_exit(spank_t sp, int ac, char **av)
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
int remote_job_epilog(spank_t sp, int ac, char **av)
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
