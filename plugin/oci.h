/* oci.h - what the parts of spank_oci_image.so share.  A shim: the step client parses and
 * checks every option and plugstack argument, the plugin passes them on raw, applies the
 * records it gets back and enters the step's namespace (docs/plugin.md says why).  One file
 * per SPANK context, as pyxis does it: dispatch.c (entry points), args.c (options,
 * plugstack), child.c (the step client), local.c (srun, sbatch, salloc), remote.c
 * (slurmstepd, slurmd's job epilog), task.c (each task). */
#ifndef OCI_H
#define OCI_H
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <slurm/spank.h>
#include "contract_gen.h"

#define PFX "oci-image: "
#define MAX_ARGS 128

/* args.c: the options as given (index: their val), the plugstack arguments */
extern char *given[OCI_N_OPTIONS];
extern int plug_ac;
extern char **plug_av;
const char *plug_arg(const char *key, const char *dflt);
int plug_check(void);
int plug_true(const char *key);
int asked(char **env);
int add_args(char **argv, int ac, int options);
int register_options(spank_t sp, int aliases);

/* child.c: the step client, with fd 3 = envfd, sends KEY\0VALUE\0 records on fd 4 */
struct records { char *buf; size_t len; int fd, ufd; }; /* fds: mount, user ns */
struct child { pid_t pid; int sock; };
int step_client_start(char **argv, int as_root, int envfd, int errfd, struct child *c);
int step_client_wait(struct child *c, struct records *r);
int run_step_client(char **argv, int as_root, int envfd, struct records *r);
int each_record(struct records *r, int (*apply)(const char *key, const char *val));
int spawn_detached(char **argv, int envfd);

/* remote.c: what prepare answered, for task.c (pointers into rec.buf) */
struct step {
	int started, failed; /* prepare was run; the tasks must fail */
	int batch;           /* the batch script's step (its script is slurmd's, on the host) */
	int nsfd;            /* the step's mount namespace; -1: the tasks run on the host */
	int usernsfd;        /* --oci-remap-root: the user namespace the tasks join */
	const char *cwd, *entrypoint, *launcher;
	struct records rec;
};
extern struct step st;

int local_post_opt(void);
void local_exit(void);
int remote_post_opt(spank_t sp);
void remote_user_init(spank_t sp);
void remote_exit(void);
void job_epilog(spank_t sp);
int task_privileged(spank_t sp);
int task_chdir(void);
#endif
