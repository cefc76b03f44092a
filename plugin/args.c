/* args.c - the users' options, kept raw, and the plugstack.conf arguments: both passed
 * on as they are, the step client checks them (ociimage/stepargs.py, plugstack.py) */
#include "oci.h"
#include "options_gen.h"

char *given[OCI_N_OPTIONS];
int plug_ac;
char **plug_av;

static int opt_cb(int val, const char *optarg, int remote)
{
	if (val < 0 || val >= OCI_N_OPTIONS)
		return -1;
	free(given[val]);
	/* a flag has no value, whatever Slurm passes: an srun in a batch job gets sbatch's
	 * options again from the job's environment, a flag's with a value there */
	if (!oci_options[val].has_arg)
		optarg = NULL;
	return (given[val] = strdup(optarg != NULL ? optarg : "")) != NULL ? 0 : -1;
}

int register_options(spank_t sp, int aliases)
{
	for (int i = 0; i < (aliases ? OCI_N_OPTIONS : OCI_N_OWN); i++) {
		spank_err_t e = spank_option_register(sp, &oci_options[i]);
		if (e != ESPANK_SUCCESS) {
			slurm_error(PFX "--%s: %s", oci_options[i].name, spank_strerror(e));
			return -1;
		}
	}
	return 0;
}

/* the value of plugstack argument KEY=VALUE (the last one), else dflt */
const char *plug_arg(const char *key, const char *dflt)
{
	for (int i = 0; i < plug_ac; i++)
		if (strncmp(plug_av[i], key, strlen(key)) == 0 && plug_av[i][strlen(key)] == '=')
			dflt = plug_av[i] + strlen(key) + 1;
	return dflt;
}

/* plugstack KEY=VALUE says yes (the contract's one spelling) */
int plug_true(const char *key)
{
	for (const char *const *w = oci_true_words; *w != NULL; w++)
		if (strcasecmp(plug_arg(key, ""), *w) == 0)
			return 1;
	return 0;
}

/* only the keys of the contract, as KEY=VALUE (their values: the step client checks them) */
int plug_check(void)
{
	for (int i = 0; i < plug_ac; i++) {
		const char *const *k = oci_plugstack_keys;
		while (*k != NULL && (strncmp(plug_av[i], *k, strlen(*k)) != 0 ||
				      plug_av[i][strlen(*k)] != '='))
			k++;
		if (*k == NULL) {
			slurm_error(PFX "plugstack.conf: unknown argument \"%.*s\"",
				    (int)strcspn(plug_av[i], "="), plug_av[i]);
			return -1;
		}
	}
	return 0;
}

/* an option given or one of their variables set in env: the step client has work to do */
int asked(char **env)
{
	for (int i = 0; i < OCI_N_OPTIONS; i++)
		if (given[i] != NULL)
			return 1;
	for (const char *const *v = oci_envs; *v != NULL; v++)
		for (char **e = env; e != NULL && *e != NULL; e++)
			if (strncmp(*e, *v, strlen(*v)) == 0 && (*e)[strlen(*v)] == '=' &&
			    (*e)[strlen(*v) + 1] != '\0')
				return 1;
	return 0;
}

/* argv += --plugstack ARG for each plugstack argument and, with options, --option NAME
 * VALUE for each option given; NULL-terminated.  The new count, -1 if too many. */
int add_args(char **argv, int ac, int options)
{
	for (int i = 0; i < plug_ac && ac < MAX_ARGS - 3; i++)
		argv[ac++] = SC_ARG_PLUGSTACK, argv[ac++] = plug_av[i];
	for (int i = 0; options && i < OCI_N_OPTIONS && ac < MAX_ARGS - 4; i++)
		if (given[i] != NULL)
			argv[ac++] = SC_ARG_OPTION, argv[ac++] = (char *)oci_options[i].name,
			argv[ac++] = given[i];
	argv[ac] = NULL;
	return ac < MAX_ARGS - 5 ? ac : -1;
}
