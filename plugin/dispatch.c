/* dispatch.c - the slurm_spank_* entry points: each hands its context to its part */
#include "oci.h"
#include <link.h>

SPANK_PLUGIN(oci_image, 1)

/* SPANK disables an option name registered twice: pyxis' names stay pyxis' where it is
 * loaded too (slurm dlopen()s every plugin before any spank_init) */
static int is_pyxis(struct dl_phdr_info *info, size_t size, void *data)
{
	const char *base = info->dlpi_name ? strrchr(info->dlpi_name, '/') : NULL;
	return base != NULL && strstr(base, "pyxis") != NULL;
}

int slurm_spank_init(spank_t sp, int ac, char **av)
{
	spank_context_t ctx = spank_context();
	int aliases;

	plug_ac = ac, plug_av = av;
	if (plug_check() < 0) /* slurmd keeps running (it logged it); its steps fail */
		return ctx == S_CTX_SLURMD ? 0 : -1;
	if ((aliases = plug_true(PS_PYXIS_ALIASES)) && dl_iterate_phdr(is_pyxis, NULL) != 0) {
		aliases = 0;
		slurm_info(PFX "pyxis_aliases=yes ignored: pyxis is loaded too");
	}
	if (ctx != S_CTX_LOCAL && ctx != S_CTX_REMOTE && ctx != S_CTX_ALLOCATOR)
		return 0;
	return register_options(sp, aliases);
}

int slurm_spank_init_post_opt(spank_t sp, int ac, char **av)
{
	spank_context_t ctx = spank_context();

	if (ctx == S_CTX_REMOTE)
		return remote_post_opt(sp);
	return ctx == S_CTX_LOCAL || ctx == S_CTX_ALLOCATOR ? local_post_opt() : 0;
}

/* never fails: srun 22.05 exits 0 after a user_init failure; the tasks fail instead */
int slurm_spank_user_init(spank_t sp, int ac, char **av)
{
	if (spank_context() == S_CTX_REMOTE)
		remote_user_init(sp);
	return 0;
}

int slurm_spank_task_init_privileged(spank_t sp, int ac, char **av)
{
	return task_privileged(sp);
}

int slurm_spank_task_init(spank_t sp, int ac, char **av)
{
	return task_chdir();
}

int slurm_spank_exit(spank_t sp, int ac, char **av)
{
	if (spank_context() == S_CTX_ALLOCATOR)
		local_exit();
	else if (spank_context() == S_CTX_REMOTE)
		remote_exit();
	return 0;
}

/* slurmd, root, each node of the job (no slurm_spank_init before it); never fails, as a
 * failure would drain the node */
int slurm_spank_job_epilog(spank_t sp, int ac, char **av)
{
	plug_ac = ac, plug_av = av;
	job_epilog(sp);
	return 0;
}
