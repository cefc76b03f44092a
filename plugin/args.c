/*
 * args.c - plugstack.conf arguments, and the users' options: taken raw (from the
 * command line, else their OCI_* variables) and passed to the step client, which
 * checks them (ociimage/stepargs.py: at submit as on every node).
 * Part of spank_oci_image.so: what the parts share is in oci.h.
 */
#include "oci.h"

/* the option tables: generated from daemon/ociimage/contract.py (scripts/gencontract.py) */
#include "options_gen.h"

struct oci_cfg cfg;
struct oci_opt opt;

static int set_str(char **dst, const char *name, const char *val)
{
	char *dup;

	if (val == NULL || *val == '\0') {
		slurm_error(PFX "--%s needs a value", name);
		return -1;
	}
	dup = strdup(val);
	if (dup == NULL) {
		slurm_error(PFX "out of memory");
		return -1;
	}
	free(*dst);
	*dst = dup;
	return 0;
}

static int opt_cb(int val, const char *optarg, int remote)
{
	(void)remote;
	opt.given = 1;
	switch (val) {
	case O_IMAGE: return set_str(&opt.image, "oci-image", optarg);
	case O_C_IMAGE: return set_str(&opt.c_image, "container-image", optarg);
	case O_MOUNTS: return set_str(&opt.mounts, "oci-mounts", optarg);
	case O_WORKDIR: return set_str(&opt.workdir, "oci-workdir", optarg);
	case O_ENV: return set_str(&opt.env_names, "oci-env", optarg);
	case O_WRITABLE: return set_str(&opt.writable, "oci-writable", "1");
	case O_READONLY: return set_str(&opt.writable, "container-readonly", "0");
	case O_MOUNT_HOME:
	case O_NO_MOUNT_HOME: {
		const char *v = val == O_MOUNT_HOME ? "1" : "0";
		if (opt.mount_home != NULL && strcmp(opt.mount_home, v) != 0) {
			slurm_error(PFX "both --oci-mount-home and --no-oci-mount-home given");
			return -1;
		}
		return set_str(&opt.mount_home, "oci-mount-home", v);
	}
	case O_ENTRYPOINT: return set_str(&opt.entrypoint, "oci-entrypoint", "1");
	case O_NO_ENTRYPOINT: return set_str(&opt.entrypoint, "no-container-entrypoint", "0");
	case O_BATCH: opt.batch_in_image = 1; return 0;
	default: return -1;
	}
}

static char **opt_slot(int code)
{
	switch (code) {
	case O_IMAGE: return &opt.image;
	case O_MOUNTS: return &opt.mounts;
	case O_WORKDIR: return &opt.workdir;
	case O_ENV: return &opt.env_names;
	case O_WRITABLE: return &opt.writable;
	case O_MOUNT_HOME: case O_NO_MOUNT_HOME: return &opt.mount_home;
	case O_ENTRYPOINT: return &opt.entrypoint;
	default: return NULL;
	}
}

int env_fallbacks(getter_f get, void *ctx)
{
	for (const struct oci_opt_env *e = oci_opt_env; e->env != NULL; e++) {
		char **slot = opt_slot(e->code);
		const char *v = get(e->env, ctx);

		if (slot == NULL || *slot != NULL || v == NULL || *v == '\0')
			continue;
		if (e->code == O_IMAGE && opt.c_image != NULL)
			continue;
		if (e->code == O_NO_MOUNT_HOME)
			continue; /* the same variable as O_MOUNT_HOME, taken once */
		if (set_str(slot, e->env, v) < 0)
			return -1;
	}
	return 0;
}

/* an image was asked for (either option, or OCI_IMAGE) */
int have_image(void)
{
	return opt.image != NULL || opt.c_image != NULL;
}

/* argv += the options' raw values, as the step client's NAME (submit or prepare) takes them */
int add_option_args(char **argv, int ac)
{
#define OPTARG(flag, v) do { if ((v) != NULL) { argv[ac++] = (char *)(flag); argv[ac++] = (v); } } while (0)
	OPTARG(SC_PREPARE_IMAGE, opt.image);
	OPTARG(SC_PREPARE_CONTAINER_IMAGE, opt.c_image);
	OPTARG(SC_PREPARE_MOUNTS, opt.mounts);
	OPTARG(SC_PREPARE_WORKDIR, opt.workdir);
	OPTARG(SC_PREPARE_WRITABLE, opt.writable);
	OPTARG(SC_PREPARE_MOUNT_HOME, opt.mount_home);
	OPTARG(SC_PREPARE_ENTRYPOINT, opt.entrypoint);
	OPTARG(SC_PREPARE_ENV_NAMES, opt.env_names);
#undef OPTARG
	return ac;
}

const char *get_local(const char *name, void *ctx)
{
	(void)ctx;
	return getenv(name);
}

/* Look NAME up in the job environment array (no copy, no syscall). */
const char *get_jobenv(const char *name, void *ctx)
{
	char **env = ctx;
	size_t n = strlen(name);

	for (; env != NULL && *env != NULL; env++)
		if (strncmp(*env, name, n) == 0 && (*env)[n] == '=')
			return *env + n + 1;
	return NULL;
}

static int copy_val(char *dst, size_t size, const char *key, const char *val)
{
	int n = snprintf(dst, size, "%s", val);

	if (n < 0 || (size_t)n >= size) {
		slurm_error(PFX "plugstack.conf: %s: value too long", key);
		return -1;
	}
	return 0;
}

static int word_in(const char *v, const char *const *words)
{
	for (; *words != NULL; words++)
		if (strcasecmp(v, *words) == 0)
			return 1;
	return 0;
}

/* a plugstack boolean, spelt as every boolean of the contract (contract.TRUE_WORDS) */
static int yes_no(const char *key, const char *val, int *dst)
{
	if (word_in(val, oci_true_words))
		*dst = 1;
	else if (word_in(val, oci_false_words))
		*dst = 0;
	else {
		slurm_error(PFX "plugstack.conf: %s=%s: expected yes or no", key, val);
		return -1;
	}
	return 0;
}

int parse_args(int ac, char **av)
{
	int have_client = 0;

	memset(&cfg, 0, sizeof(cfg));
	if (copy_val(cfg.socket, sizeof(cfg.socket), "socket",
		     OCI_DEFAULT_SOCKET) < 0 ||
	    copy_val(cfg.prefetch_socket, sizeof(cfg.prefetch_socket), "prefetch_socket",
		     OCI_DEFAULT_PREFETCH_SOCKET) < 0)
		return -1;
	cfg.record_job = 1;
	for (int i = 0; i < ac; i++) {
		const char *a = av[i];
		const char *eq = strchr(a, '=');
		size_t klen = eq ? (size_t)(eq - a) : strlen(a);
		const char *v = eq ? eq + 1 : NULL;

#define KEY(k) (klen == sizeof(k) - 1 && strncmp(a, k, klen) == 0)
		if (v == NULL || *v == '\0') {
			slurm_error(PFX "plugstack.conf: argument \"%s\": expected key=value", a);
			return -1;
		}
		if (KEY(PS_STEP_CLIENT)) {
			if (v[0] != '/') {
				slurm_error(PFX "plugstack.conf: step_client=%s: must be an absolute path", v);
				return -1;
			}
			if (copy_val(cfg.step_client, sizeof(cfg.step_client), "step_client", v) < 0)
				return -1;
			have_client = 1;
		} else if (KEY(PS_LAUNCHER)) {
			if (v[0] != '/') {
				slurm_error(PFX "plugstack.conf: launcher=%s: must be an absolute path", v);
				return -1;
			}
			if (copy_val(cfg.launcher, sizeof(cfg.launcher), "launcher", v) < 0)
				return -1;
		} else if (KEY(PS_SOCKET)) {
			if (v[0] != '/') {
				slurm_error(PFX "plugstack.conf: socket=%s: must be an absolute path", v);
				return -1;
			}
			if (copy_val(cfg.socket, sizeof(cfg.socket), "socket", v) < 0)
				return -1;
		} else if (KEY(PS_PREFETCH_SOCKET)) {
			if (strcmp(v, "none") == 0 || strcmp(v, "off") == 0) {
				cfg.prefetch_socket[0] = '\0';
			} else if (v[0] != '/') {
				slurm_error(PFX "plugstack.conf: prefetch_socket=%s: must be an absolute "
					    "path or none", v);
				return -1;
			} else if (copy_val(cfg.prefetch_socket, sizeof(cfg.prefetch_socket),
					    "prefetch_socket", v) < 0) {
				return -1;
			}
		} else if (KEY(PS_RECORD_JOB)) {
			if (yes_no("record_job", v, &cfg.record_job) < 0)
				return -1;
		} else if (KEY(PS_ALLOW_SQFS)) {
			if (yes_no("allow_sqfs", v, &cfg.allow_sqfs) < 0)
				return -1;
		} else if (KEY(PS_BATCH_IN_IMAGE)) {
			if (yes_no("batch_in_image", v, &cfg.batch_in_image) < 0)
				return -1;
		} else if (KEY(PS_PYXIS_ALIASES)) {
			if (yes_no("pyxis_aliases", v, &cfg.pyxis_aliases) < 0)
				return -1;
		} else if (KEY(PS_DEFAULT_MOUNTS)) {
			/* checked by the step client, at submit and on every node */
			if (copy_val(cfg.default_mounts, sizeof(cfg.default_mounts),
				     "default_mounts", v) < 0)
				return -1;
		} else {
			slurm_error(PFX "plugstack.conf: unknown argument \"%.*s\"", (int)klen, a);
			return -1;
		}
#undef KEY
	}
	if (!have_client) {
		slurm_error(PFX "plugstack.conf: step_client=PATH is required");
		return -1;
	}
	if (cfg.launcher[0] == '\0') { /* default: next to the step client */
		const char *slash = strrchr(cfg.step_client, '/');
		int n = snprintf(cfg.launcher, sizeof(cfg.launcher), "%.*s/oci-image-launch",
				 (int)(slash - cfg.step_client), cfg.step_client);
		if (n < 0 || (size_t)n >= sizeof(cfg.launcher)) {
			slurm_error(PFX "plugstack.conf: step_client: path too long");
			return -1;
		}
	}
	return 0;
}

/* what srun --help shows; pyxis' names only where asked for and pyxis is not loaded */
int register_options(spank_t sp)
{
	struct spank_option *tables[] = { options, cfg.pyxis_aliases ? pyxis_aliases : NULL };

	for (size_t t = 0; t < sizeof(tables) / sizeof(tables[0]) && tables[t] != NULL; t++) {
		for (struct spank_option *o = tables[t]; o->name != NULL; o++) {
			spank_err_t e = spank_option_register(sp, o);
			if (e != ESPANK_SUCCESS) {
				slurm_error(PFX "cannot register --%s: %s", o->name, spank_strerror(e));
				return -1;
			}
		}
	}
	return 0;
}
