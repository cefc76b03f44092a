/*
 * local.c - srun, sbatch and salloc (as the user): the options checked and the image
 * pinned by the step client's submit, prefetch, and the job's record at sbatch's exit.
 * Part of spank_oci_image.so: what the parts share is in oci.h.
 */
#include "oci.h"

static struct {
	char pinned[4096]; /* what this process pinned ("": nothing) */
	time_t since;      /* when (for finding the submitted job) */
} sub;

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

int local_post_opt(void)
{
	const char *pinned;
	char *argv[MAX_ARGS];
	struct child_out co;
	char *nl;
	int ac = 0, rc = -1;

	if (env_fallbacks(get_local, NULL) < 0)
		return -1;
	if (!have_image() && !opt.given)
		return 0; /* no option given: nothing to check, nothing to pin */
	if (have_image()) {
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
	}

	/* Every value is checked by the step client, as every node will check it
	 * (one grammar: ociimage/stepargs.py), and the tag pinned to its digest. */
	argv[ac++] = cfg.step_client;
	argv[ac++] = SC_SUBMIT;
	ac = add_option_args(argv, ac);
	if (cfg.default_mounts[0]) {
		argv[ac++] = SC_SUBMIT_DEFAULT_MOUNTS;
		argv[ac++] = cfg.default_mounts;
	}
	if (cfg.prefetch_socket[0] != '\0') { /* this host's daemon resolves a tag fastest */
		argv[ac++] = SC_SUBMIT_SOCKET;
		argv[ac++] = cfg.prefetch_socket;
	}
	pinned = getenv("OCI_IMAGE_PINNED");
	if (pinned != NULL && *pinned != '\0') { /* srun inside a job that pinned it already */
		argv[ac++] = SC_SUBMIT_PINNED;
		argv[ac++] = (char *)pinned;
	}
	argv[ac] = NULL;
	if (run_child(argv, NULL, -1, 4096, &co, 0) < 0)
		goto out;
	if (co.len == 0) {
		rc = 0; /* nothing (new) to pin */
		goto out;
	}
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

/*
 * sbatch, at exit: have the step client record the pinned image's digest in
 * the comment of the job just submitted (see the header comment).  Synchronous
 * (done before sbatch returns), best effort: the job runs the same without it.
 */
void record_job(void)
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
