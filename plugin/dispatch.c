/*
 * spank_oci_image.so - the thin SPANK shim of slurm-oci-image.
 *
 * All logic lives in the Python "step client" that this plugin execs; the
 * plugin only registers options, runs the step client, and per task enters
 * the step's pinned mount namespace (setns) and changes directory.
 *
 * The contract (options and their OCI_* variables, plugstack keys and defaults,
 * the step client's subcommands and arguments, prepare's records) is declared once,
 * in daemon/ociimage/contract.py; contract_gen.h and options_gen.h are generated from
 * it (make contract), and spank-oci-image(8) and the README show it.  The plugin
 * checks no option value itself: it passes them raw to the step client's submit (at
 * srun/sbatch/salloc, for every use of an option) and prepare (slurmstepd), which
 * run the same checks (daemon/ociimage/stepargs.py), so a value refused on the nodes
 * is refused at submit, once, with the same message.
 *
 * pyxis_aliases=yes also registers pyxis' option names (--container-image,
 * --container-mounts, ...) with our meanings, for sites moving from pyxis.
 * Refused (logged, aliases not registered) when a pyxis plugin is loaded in
 * the same process: SPANK cannot show a plugin another plugin's options, and
 * a name registered twice is silently disabled for whichever registers
 * second, so we look for a loaded shared object named *pyxis* instead.
 * launcher= is the static program that runs an image's Entrypoint for
 * --oci-entrypoint (plugin/oci-image-launch.c); default: oci-image-launch in
 * the step client's directory.  Only steps with --oci-entrypoint use it.
 *
 * prepare is started in init_post_opt and waited for in user_init, where its
 * stderr reaches srun: progress (the step's first node only), then errors.  The
 * step id is the decimal uint32 Slurm uses (batch step: 4294967291).  The job
 * epilog's cleanup-job writes to the slurmd log.
 *
 * Slurm-aware cache (issue 7):
 * - Prefetch: after pinning, the local context spawns "prefetch" detached
 *   (setsid, double fork): the login node's daemon starts converting while
 *   the job waits in the queue.  The daemon's main socket is root-only, so it
 *   listens on a second socket (prefetch_socket=, mode 0666), not gRPC: it
 *   knows each caller's uid (SO_PEERCRED) and pulls digest-pinned references
 *   with that user's own credentials only (daemon/ociimage/usersock.py).
 * - Recording the digest for the daemon: neither `squeue --json` (22.05) nor
 *   `scontrol show job` shows a job's environment (OCI_IMAGE_PINNED), and
 *   init_post_opt runs before sbatch builds the job description from its
 *   own options, so no shown field can be set before submission.  sbatch
 *   has no SPANK item for the job id either (allocator context: UID/GID
 *   only).  So at sbatch's exit (slurm_spank_exit, allocator context, after
 *   "Submitted batch job"), the plugin runs, synchronously and as the user,
 *     STEP_CLIENT record-job --image REF@sha256:<hex> --since T --sid SID
 *   which finds the job just submitted (this user's newest job from this
 *   session, submitted since init_post_opt, not tagged yet) with squeue and
 *   appends " oci-image=sha256:<hex>" (the digest only, never the name) to its
 *   Comment with scontrol: stable commands rather than libslurm structures
 *   that change between releases.  Done before sbatch returns, so a shell loop
 *   of sbatch calls tags each job before the next is submitted.
 *   record_job=no disables it.
 *   salloc/srun allocations start running when the plugin could tag them;
 *   their steps hold leases while they run.
 * - slurm_spank_job_epilog (slurmd's job epilog context, root, every node
 *   the job ran on, no slurm.conf Epilog needed) runs cleanup-job, which
 *   releases whatever the job's steps left on the node (a slurmstepd killed
 *   with SIGKILL never reaches spank_exit).  It always returns 0: a failing
 *   job_epilog of a required plugin drains the node.
 *
 * Messages to the user: the step client's stderr is read line by line and
 * relayed with slurm_spank_log() (error level, no "error: " prefix); on
 * failure the last line is repeated with slurm_error().  In srun these
 * reach the terminal directly.  In slurmstepd, messages logged in
 * init_post_opt (before the step's I/O is connected to srun) only reach the
 * slurmd log, and an init_post_opt failure shows the user nothing but "task
 * launch failed: Plugin initialization failed".  So prepare's stderr is kept
 * and replayed in slurm_spank_user_init (after I/O setup; all lines on
 * failure, on node 0 only on success), and a failed prepare fails the task in
 * task_init_privileged: a user_init failure makes srun exit 0 on 22.05, a
 * task_init_privileged failure makes it exit 1.
 *
 * The child of prepare/release gets a fixed environment (PATH, LC_ALL), never
 * the job's: LD_PRELOAD/PYTHONPATH from a user would otherwise run as root.
 * The job environment goes to prepare as a memfd on fd 3 (--job-env-fd 3).
 * The working directory passed as --cwd is srun's getcwd(), exported by the
 * local context as OCI_SUBMIT_CWD (else the job's PWD, else "/").
 *
 * --oci-entrypoint: SPANK cannot add arguments to a task, and exec'ing from
 * the plugin would skip what slurmstepd does after the SPANK task hooks
 * (TaskProlog, TMPDIR, the user's rlimits, PATH lookup).  So in
 * task_init_privileged the plugin opens the launcher (still in the host's
 * mount namespace, O_CLOEXEC), enters the step's namespace, and replaces the
 * task's argv[0] (S_JOB_ARGV; slurmstepd execs task->argv, which is the
 * step's argv outside --multi-prog) with "/proc/self/fd/N", passing the
 * original argv[0] and the encoded Entrypoint in OCI_IMAGE_ARGV0 and
 * OCI_IMAGE_ENTRYPOINT.  slurmstepd's own execve then runs the launcher from
 * the host through that descriptor: nothing is placed in the image or its
 * /tmp (which a user mount could hide), and the descriptor is gone once the
 * launcher runs.  The launcher unsets both variables and execvp()s
 * Entrypoint + [argv0] + argv[1:].  Without an Entrypoint in the image,
 * --oci-entrypoint changes nothing.  Not supported with srun --multi-prog
 * (its per-task argv is not the one SPANK sees).
 */


#include "oci.h"

SPANK_PLUGIN(oci_image, 1)

/* Is a pyxis plugin loaded in this process?  slurm dlopen()s every plugstack
 * plugin before calling any slurm_spank_init, so the order does not matter. */
static int find_pyxis(struct dl_phdr_info *info, size_t size, void *data)
{
	const char *name = info->dlpi_name, *base;

	(void)size;
	(void)data;
	if (name == NULL || *name == '\0')
		return 0;
	base = strrchr(name, '/');
	base = base ? base + 1 : name;
	return strstr(base, "pyxis") != NULL;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	spank_context_t ctx = spank_context();

	if (parse_args(ac, av) < 0)
		/* slurmd must keep running: it logs, steps then fail in slurmstepd */
		return ctx == S_CTX_SLURMD ? 0 : -1;
	if (cfg.pyxis_aliases && dl_iterate_phdr(find_pyxis, NULL) != 0) {
		cfg.pyxis_aliases = 0;
		if (ctx == S_CTX_SLURMD)
			slurm_error(PFX "pyxis_aliases=yes ignored: pyxis is loaded too "
				    "(its --container-* options stay pyxis')");
		else
			slurm_verbose(PFX "pyxis_aliases=yes ignored: pyxis is loaded too");
	}
	if (ctx != S_CTX_LOCAL && ctx != S_CTX_REMOTE && ctx != S_CTX_ALLOCATOR)
		return 0;
	return register_options(sp);
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	(void)ac;
	(void)av;
	switch (spank_context()) {
	case S_CTX_LOCAL:
	case S_CTX_ALLOCATOR:
		return local_post_opt();
	case S_CTX_REMOTE:
		return remote_post_opt(sp);
	default:
		return 0;
	}
}

int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	return remote_user_init(sp, ac, av);
}

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	return task_init_privileged(sp, ac, av);
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	return task_init(sp, ac, av);
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	return remote_exit(sp, ac, av);
}

int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
	return remote_job_epilog(sp, ac, av);
}
