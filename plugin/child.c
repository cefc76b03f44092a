/* child.c - running the step client: fd 3 the job's environment, fd 4 a socket on which
 * it sends its KEY\0VALUE\0 records (and the step's namespace, SCM_RIGHTS); or detached. */
#include "oci.h"

#define MAX_RECORDS (1 << 20)

static char *const clean_env[] = { "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C.UTF-8", NULL };

/* In the child: stdin /dev/null, stdout its stderr, fd 3 envfd, fd 4 sock, and nothing
 * else of its parent's (a pipe of slurmstepd held open stalled the step's launch). */
static void child_fds(int envfd, int sock)
{
	int null = open("/dev/null", O_RDWR), e = -1, s = -1;
	int last = sock >= 0 ? 5 : 4;
	sigset_t none;

	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	if ((envfd >= 0 && (e = fcntl(envfd, F_DUPFD_CLOEXEC, 10)) < 0) ||
	    (sock >= 0 && (s = fcntl(sock, F_DUPFD_CLOEXEC, 10)) < 0) || null < 0 ||
	    dup2(null, 0) < 0 || dup2(2, 1) < 0 || dup2(e >= 0 ? e : null, 3) < 0 ||
	    (s >= 0 && dup2(s, 4) < 0))
		_exit(127);
	if (syscall(SYS_close_range, (unsigned)last, ~0U, 0) != 0)
		for (int fd = last; fd < 65536; fd++)
			close(fd);
}

/* Start argv; stderr: errfd (a pipe slurmstepd relays in user_init), or ours if -1.
 * as_root (slurmstepd): root's ids, no groups, /, a fixed environment (whatever state
 * slurmstepd is in; a user's LD_PRELOAD must not run as root). */
int step_client_start(char **argv, int as_root, int envfd, int errfd, struct child *c)
{
	int sv[2];

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		return -1;
	if ((c->pid = fork()) == 0) {
		if (errfd >= 0 && dup2(errfd, 2) < 0)
			_exit(127);
		child_fds(envfd, sv[1]);
		/* the pipe is its stderr alone: EOF there must come when it closes that */
		if (errfd >= 0 && dup2(0, 1) < 0)
			_exit(127);
		if (as_root && (setresuid(0, 0, 0) < 0 || setgroups(0, NULL) < 0 ||
				setresgid(0, 0, 0) < 0 || chdir("/") < 0))
			_exit(127);
		execve(argv[0], argv, as_root ? clean_env : environ);
		static const char msg[] = PFX "cannot run the step client\n";
		(void)!write(2, msg, sizeof(msg) - 1);
		_exit(127); /* (no stdio after a fork of a threaded slurmstepd) */
	}
	close(sv[1]);
	c->sock = sv[0];
	return c->pid > 0 ? 0 : (close(sv[0]), -1);
}

/* Read a started step client's records and at most two descriptors until EOF, then reap
 * it: 0 if it exited 0. */
int step_client_wait(struct child *ch, struct records *r)
{
	char cbuf[CMSG_SPACE(2 * sizeof(int))];
	int status = -1;
	ssize_t n = 1;

	*r = (struct records){ malloc(MAX_RECORDS), 0, -1, -1 };
	while (r->buf != NULL && n > 0 && r->len < MAX_RECORDS) {
		struct iovec iov = { r->buf + r->len, MAX_RECORDS - r->len };
		struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
				    .msg_controllen = sizeof(cbuf) };
		struct cmsghdr *c;

		if ((n = recvmsg(ch->sock, &m, MSG_CMSG_CLOEXEC)) < 0 && errno == EINTR) {
			n = 1; /* (cbuf was not written) */
			continue;
		}
		if (n > 0)
			r->len += (size_t)n;
		c = n > 0 ? CMSG_FIRSTHDR(&m) : NULL;
		for (size_t i = 0; c != NULL && c->cmsg_level == SOL_SOCKET &&
		     c->cmsg_type == SCM_RIGHTS && i < (c->cmsg_len - CMSG_LEN(0)) / sizeof(int); i++) {
			int fd, *to = r->fd < 0 ? &r->fd : r->ufd < 0 ? &r->ufd : NULL;

			memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
			if (to != NULL)
				*to = fd;
			else
				close(fd); /* the first two only: none leaks */
		}
		if (n > 0 && (m.msg_flags & MSG_CTRUNC))
			n = -1; /* a descriptor the kernel dropped (our limit): not a step on the host */
	}
	close(ch->sock);
	while (waitpid(ch->pid, &status, 0) < 0 && errno == EINTR)
		;
	if (r->buf == NULL || n != 0 || (r->len > 0 && r->buf[r->len - 1] != '\0') ||
	    !WIFEXITED(status) || WEXITSTATUS(status) != 0) { /* read error, too much, cut, failed */
		if (r->ufd >= 0)
			close(r->ufd);
		if (r->fd >= 0)
			close(r->fd);
		return r->fd = r->ufd = -1;
	}
	return 0;
}

/* Run argv to its end (stderr ours): its records in r; 0 if it exited 0. */
int run_step_client(char **argv, int as_root, int envfd, struct records *r)
{
	struct child c;

	*r = (struct records){ NULL, 0, -1, -1 };
	return step_client_start(argv, as_root, envfd, -1, &c) < 0 ? -1 : step_client_wait(&c, r);
}

/* apply(key, value) to each record; -1 at the first it refuses */
int each_record(struct records *r, int (*apply)(const char *key, const char *val))
{
	for (size_t i = 0, k; i < r->len; i = k + strlen(r->buf + k) + 1) {
		k = i + strlen(r->buf + i) + 1;
		if (k >= r->len || apply(r->buf + i, r->buf + k) < 0) {
			slurm_error(PFX "the step client's record \"%.40s\" refused", r->buf + i);
			return -1;
		}
	}
	return 0;
}

/* Run argv without waiting (a release, a job's cleanup): double fork and setsid, so it
 * outlives slurmstepd; nice 10, so the next step does not wait behind it. -1 unless the
 * grandchild was started. */
int spawn_detached(char **argv, int envfd)
{
	int status = -1;
	pid_t pid = fork(), grandchild;

	if (pid == 0) {
		if (setsid() < 0 || (grandchild = fork()) < 0)
			_exit(1);
		if (grandchild > 0)
			_exit(0);
		(void)setpriority(PRIO_PROCESS, 0, 10);
		signal(SIGTERM, SIG_IGN); /* slurmstepd's SIGTERM to what is left of the step */
		signal(SIGHUP, SIG_IGN);
		child_fds(envfd, -1);
		if (dup2(0, 1) < 0 || dup2(0, 2) < 0)
			_exit(127);
		execve(argv[0], argv, clean_env);
		_exit(127);
	}
	while (pid > 0 && waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	return pid > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -1;
}
