/* task.c - each task: the Entrypoint's launcher, the step's namespace (still root, before
 * slurmstepd drops to the user); then, as the user, the directory prepare chose */
#include "oci.h"

/* slurmstepd execs the launcher (oci-image-launch.c), opened on the host, instead of the
 * task's argv[0]: nothing is placed in the image, the descriptor is gone once it runs */
static int use_launcher(spank_t sp)
{
	static char path[64];
	struct stat sb;
	int fd = open(st.launcher, O_RDONLY | O_CLOEXEC | O_NONBLOCK), argc = 0; /* no FIFO */
	char **argv = NULL;

	if (fd < 0 || fstat(fd, &sb) < 0 || !S_ISREG(sb.st_mode) || !(sb.st_mode & S_IXOTH) ||
	    spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1 ||
	    spank_setenv(sp, "OCI_IMAGE_ARGV0", argv[0], 1) != ESPANK_SUCCESS ||
	    spank_setenv(sp, "OCI_IMAGE_ENTRYPOINT", st.entrypoint, 1) != ESPANK_SUCCESS) {
		slurm_error(PFX "--oci-entrypoint: cannot run the launcher %s", st.launcher);
		return -1;
	}
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	argv[0] = path; /* this task's copy, which slurmstepd execs as it is */
	return 0;
}

/* A batch script in the image: slurmd wrote it to its spool on the host, which the
 * container does not have; slurmstepd execs it from a descriptor opened here, before the
 * namespace (left open across the exec: the kernel hands the interpreter that path) */
static int script_from_host(spank_t sp)
{
	static char path[64];
	struct stat sb;
	int argc = 0, fd = -1;
	char **argv = NULL;

	if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1 ||
	    (fd = open(argv[0], O_RDONLY | O_NOFOLLOW | O_NONBLOCK)) < 0 || fstat(fd, &sb) < 0 ||
	    !S_ISREG(sb.st_mode)) {
		if (fd >= 0)
			close(fd);
		slurm_error(PFX "cannot open the batch script to run it in the image");
		return -1;
	}
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	argv[0] = path;
	return 0;
}

int task_privileged(spank_t sp)
{
	if (st.failed || (st.nsfd >= 0 && st.batch && script_from_host(sp) < 0) ||
	    (st.nsfd >= 0 && st.entrypoint != NULL && use_launcher(sp) < 0))
		return -1;
	if (st.nsfd < 0)
		return 0;
	/* no exec in the container gains privileges, whatever a mount's flags say */
	if (setns(st.nsfd, CLONE_NEWNS) < 0 || prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
		slurm_error(PFX "cannot enter the step's namespace: %s", strerror(errno));
		return -1;
	}
	return close(st.nsfd), 0;
}

/* --oci-remap-root: the daemon made the user namespace, so only the limits that follow the
 * uid were the user's; their own context (an LSM label, a seccomp filter on the job) must
 * allow them one too, with capabilities in it: a child of this task tries. 0 or an errno */
static int userns_allowed(void)
{
	int status = -1;
	pid_t pid = fork();

	if (pid == 0)
		_exit(unshare(CLONE_NEWUSER) < 0 || unshare(CLONE_NEWUTS) < 0 ? errno & 0xff : 0);
	while (pid > 0 && waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	return pid > 0 && WIFEXITED(status) ? WEXITSTATUS(status) : ECHILD;
}

/* slurmstepd chdirs after task_init_privileged, as the user, inside the image, and goes to
 * /tmp where the job's directory is missing there: prepare's choice again. Then, with
 * --oci-remap-root, the user namespace the user owns (joined as the user: setuid by
 * slurmstepd after it would fail in there, where only the user is mapped, as 0) */
int task_chdir(void)
{
	if (st.nsfd >= 0 && st.cwd != NULL && chdir(st.cwd) < 0) {
		slurm_error(PFX "cannot change to the step's directory in the image: %s",
			    strerror(errno)); /* (not the name: a user's, with any bytes in it) */
		return -1;
	}
	if (st.nsfd >= 0 && st.usernsfd >= 0 && (errno = userns_allowed()) != 0) {
		slurm_error(PFX "--oci-remap-root: you may not have user namespaces here (%s): run "
			    "without it", strerror(errno));
		return -1;
	}
	if (st.nsfd >= 0 && st.usernsfd >= 0 && setns(st.usernsfd, CLONE_NEWUSER) < 0) {
		slurm_error(PFX "--oci-remap-root: cannot enter the step's user namespace: %s",
			    strerror(errno));
		return -1;
	}
	return st.usernsfd >= 0 ? close(st.usernsfd), 0 : 0;
}
