/*
 * child.c - running the step client: stdout collected, stderr relayed to the user
 * line by line as it comes (control characters shown as '?'); detached runs.
 * Part of spank_oci_image.so: what the parts share is in oci.h.
 */
#include "oci.h"

char *const clean_env[] = { "PATH=" SAFE_PATH, "LC_ALL=C.UTF-8", NULL };

#define REDRAW "\x1b[1A\x1b[2K" /* a terminal line that replaces the one before it */

/*
 * line with its control characters (C0, DEL, C1) shown as '?': it holds paths and
 * references a user chose, and goes to terminals and the slurmd log.  Only the
 * step client's own redraw prefix, at the very start, is kept when keep_redraw.
 */
void sanitize(char *dst, size_t size, const char *line, int keep_redraw)
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
int spawn_detached(char *const argv[], char *const envp[])
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

		pid_t grandchild;

		/* exit 0 only once the grandchild exists: a failed fork is a failure */
		if (setsid() < 0 || (grandchild = fork()) < 0)
			_exit(1);
		if (grandchild > 0)
			_exit(0);
		/* background work (a release, a prefetch, a job's cleanup): the next step's
		 * start must not wait behind it; nice 10, not 19, so that a release on a node
		 * whose CPUs the job keeps busy does not hold its lease for seconds */
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
int child_start(char *const argv[], char *const envp[], int extra_fd, int ignore_term,
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
void child_abandon(struct child *ch)
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
int child_finish(struct child *ch, size_t max_out, struct child_out *co)
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

int run_child(char *const argv[], char *const envp[], int extra_fd,
		     size_t max_out, struct child_out *co, int ignore_term)
{
	struct child ch;

	if (child_start(argv, envp, extra_fd, ignore_term, &ch) < 0) {
		memset(co, 0, sizeof(*co));
		return -1;
	}
	return child_finish(&ch, max_out, co);
}
