/*
 * task.c - each task (slurmstepd's task process): enter the step's verified namespace,
 * set its environment, run the image's Entrypoint through the launcher, chdir.
 * Part of spank_oci_image.so: what the parts share is in oci.h.
 */
#include "oci.h"

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

int task_init_privileged(spank_t sp, int ac, char **av)
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
int task_init(spank_t sp, int ac, char **av)
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
