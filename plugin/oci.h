/*
 * oci.h - what the parts of spank_oci_image.so share.  One file per SPANK context, as
 * pyxis does it: dispatch.c (the slurm_spank_* entry points, and the contract in words),
 * args.c (plugstack arguments; the users' options and their variables, raw), child.c
 * (running the step client, relaying its stderr), local.c (srun, sbatch, salloc),
 * remote.c (slurmstepd: prepare, release, the job epilog) and task.c (each task enters
 * the step's namespace).
 */
#ifndef OCI_H
#define OCI_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <link.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <slurm/spank.h>
#include <slurm/slurm.h> /* the hostlist API only: nothing else of libslurm is used */

/* slurm.h's hostlist_t is a pointer type up to 23.02 and the struct itself from 23.11 */
#if SLURM_VERSION_NUMBER >= SLURM_VERSION_NUM(23, 11, 0)
typedef hostlist_t *oci_hostlist;
#else
typedef hostlist_t oci_hostlist;
#endif

#define PFX "oci-image: "
#define STEP_BATCH 0xfffffffbU
#define STEP_EXTERN 0xfffffffcU
#define MAX_STDOUT (1024 * 1024)
#define MAX_LINE 4096
#define MAX_ARGS 48
#define MAX_DEFERRED 64
#define SAFE_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#include "contract_gen.h"

/* ---- plugstack configuration (args.c) ---- */

struct oci_cfg {
	char step_client[PATH_MAX];
	char socket[PATH_MAX];
	char default_mounts[4096];
	char launcher[PATH_MAX];
	char prefetch_socket[PATH_MAX]; /* "": prefetch disabled */
	int record_job;
	int allow_sqfs;
	int batch_in_image;
	int pyxis_aliases;
};
extern struct oci_cfg cfg;

/* ---- the users' options (args.c) ---- */

/*
 * The options' raw values, as given (or from their OCI_* variable): the step client
 * checks them (submit, then prepare on every node; ociimage/stepargs.py), the plugin
 * only passes them on.  A flag holds "1"/"0" when given, else its variable's value.
 */
struct oci_opt {
	char *image;
	char *c_image;   /* --container-image: pyxis' form, translated by the step client */
	char *mounts;
	char *workdir;
	char *env_names;
	char *writable;
	char *mount_home;
	char *entrypoint;
	int batch_in_image;
	int given;       /* an option was given on the command line */
};
extern struct oci_opt opt;

typedef const char *(*getter_f)(const char *name, void *ctx);
int parse_args(int ac, char **av);
int register_options(spank_t sp);
int env_fallbacks(getter_f get, void *ctx);
int have_image(void);
int add_option_args(char **argv, int ac);
const char *get_local(const char *name, void *ctx);
const char *get_jobenv(const char *name, void *ctx);

/* ---- the step client (child.c) ---- */

/* A step client started by child_start() and collected by child_finish(). */
struct child {
	pid_t pid;
	int out, err; /* read ends of its stdout and stderr; -1: closed */
	const char *name;
	const char *cmd;
};

struct child_out {
	char *buf;       /* stdout (NUL-terminated for convenience) */
	size_t len;
	int status;      /* wait status */
};

extern char *const clean_env[];
void sanitize(char *dst, size_t size, const char *line, int keep_redraw);
int spawn_detached(char *const argv[], char *const envp[]);
int child_start(char *const argv[], char *const envp[], int extra_fd, int ignore_term,
		struct child *ch);
void child_abandon(struct child *ch);
int child_finish(struct child *ch, size_t max_out, struct child_out *co);
int run_child(char *const argv[], char *const envp[], int extra_fd,
	      size_t max_out, struct child_out *co, int ignore_term);

/* ---- srun, sbatch, salloc (local.c) ---- */

int local_post_opt(void);
void record_job(void);

/* ---- slurmstepd (remote.c, task.c) ---- */

struct oci_step {
	int prepared;     /* prepare was run (release is due) */
	int active;       /* prepare succeeded: tasks enter the namespace */
	uint32_t jobid, stepid;
	char node[256];
	char *out;        /* prepare's stdout (owned) */
	size_t out_len;
	const char *ns, *cwd;
	/* the namespace's holder: entered only if the process at holder_pid still
	 * started at holder_start and its namespace has inode ns_inode */
	unsigned long holder_pid;
	unsigned long long holder_start, ns_inode;
	const char *entrypoint; /* encoded, see oci-image-launch.c; NULL: none */
	const char *env[1024];
	size_t n_env;
	const char *unset[256];
	size_t n_unset;
	struct child prep; /* prepare, from init_post_opt until user_init */
	/* messages that must reach the user once the step's I/O is connected */
	char *deferred[MAX_DEFERRED];
	size_t n_deferred;
	int failed;
};
extern struct oci_step st;

int remote_post_opt(spank_t sp);
int remote_user_init(spank_t sp, int ac, char **av);
int remote_exit(spank_t sp, int ac, char **av);
int remote_job_epilog(spank_t sp, int ac, char **av);
int task_init_privileged(spank_t sp, int ac, char **av);
int task_init(spank_t sp, int ac, char **av);

#endif
