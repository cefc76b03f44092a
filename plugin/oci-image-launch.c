/*
 * oci-image-launch - runs an OCI image's Entrypoint for `srun --oci-entrypoint`.
 *
 * SPANK cannot add arguments to a task, and exec'ing from the plugin would
 * skip what slurmstepd still does before its own execve (TaskProlog, TMPDIR,
 * user rlimits).  So for a step with --oci-entrypoint the plugin only
 * replaces the task's argv[0] with this program and passes, in the task's
 * environment:
 *
 *   OCI_IMAGE_ENTRYPOINT  the Entrypoint, encoded as below
 *   OCI_IMAGE_ARGV0       the task's original argv[0] (raw)
 *
 * This program removes both variables and execvp()s
 *
 *   Entrypoint[0..n-1], OCI_IMAGE_ARGV0, argv[1], argv[2], ...
 *
 * i.e. `docker run IMAGE CMD...` with the image's ENTRYPOINT: the step's
 * command becomes the entrypoint's arguments.  Entrypoint[0] without a '/'
 * is looked up in the task's PATH (the image's, by default), like slurmstepd
 * looks up a plain command.
 *
 * Encoding of OCI_IMAGE_ENTRYPOINT: every element, in order, is written as
 * its bytes followed by a ','; bytes other than A-Z a-z 0-9 and / . _ - + : = @
 * are written as %XX (two hex digits, either case).  So ["/opt/app/run.sh"]
 * is "/opt/app/run.sh," and ["sh", "-c", "echo $0"] is "sh,-c,echo%20%240,".
 * Any byte except NUL round-trips; %00, an empty list, a missing final ','
 * or any other character is an error.
 *
 * Errors: one line on stderr, exit 127 (bad use, or the entrypoint is not
 * found) or 126 (found but cannot be executed), like a shell.
 *
 * Built static (plugin/Makefile) because it runs inside the image, which may
 * have any C library or none.  The plugin executes it from the host through a
 * close-on-exec descriptor (/proc/self/fd/N), so it never has to exist in the
 * image.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PFX "oci-image: entrypoint: "
#define ENV_EP "OCI_IMAGE_ENTRYPOINT"
#define ENV_ARGV0 "OCI_IMAGE_ARGV0"

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int plain(char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
	       strchr("/._-+:=@", c) != NULL;
}

/*
 * Decode s into a NULL-terminated array of strings (decoded in place into a
 * copy).  Returns the number of elements, or -1 with *why set.
 */
static long decode(const char *s, char ***out, const char **why)
{
	size_t len = strlen(s), n = 0, cap;
	char *buf, *w, **v;
	const char *p;

	*why = NULL;
	if (len == 0 || s[len - 1] != ',') {
		*why = len == 0 ? "it is empty" : "it does not end with ','";
		return -1;
	}
	for (p = s; *p != '\0'; p++)
		if (*p == ',')
			n++;
	cap = n + 1;
	buf = malloc(len + 1);
	v = calloc(cap, sizeof(*v));
	if (buf == NULL || v == NULL) {
		*why = "out of memory";
		return -1;
	}
	n = 0;
	w = buf;
	v[n] = w;
	for (p = s; *p != '\0'; p++) {
		if (*p == ',') {
			*w++ = '\0';
			if (++n < cap)
				v[n] = w;
		} else if (*p == '%') {
			int hi = hexval(p[1]), lo = hi < 0 ? -1 : hexval(p[2]);
			if (hi < 0 || lo < 0) {
				*why = "a '%' is not followed by two hex digits";
				return -1;
			}
			if (hi == 0 && lo == 0) {
				*why = "it contains a NUL byte (%00)";
				return -1;
			}
			*w++ = (char)(hi << 4 | lo);
			p += 2;
		} else if (plain(*p)) {
			*w++ = *p;
		} else {
			*why = "it contains a character that must be %-encoded";
			return -1;
		}
	}
	v[n] = NULL;
	*out = v;
	return (long)n;
}

int main(int argc, char **argv)
{
	const char *enc = getenv(ENV_EP), *argv0 = getenv(ENV_ARGV0), *why;
	char **ep = NULL, **nargv, *a0;
	long n;
	int i, k = 0, err;

	if (enc == NULL || argv0 == NULL) {
		fprintf(stderr, PFX "%s and %s must be set (this program is run by the "
			"oci-image SPANK plugin for srun --oci-entrypoint)\n", ENV_EP, ENV_ARGV0);
		return 127;
	}
	n = decode(enc, &ep, &why);
	if (n < 0) {
		fprintf(stderr, PFX "invalid %s: %s\n", ENV_EP, why);
		return 127;
	}
	if (ep[0][0] == '\0') {
		fprintf(stderr, PFX "the image's Entrypoint has an empty program name\n");
		return 127;
	}
	a0 = strdup(argv0);
	nargv = calloc((size_t)n + (size_t)(argc > 1 ? argc : 1) + 1, sizeof(*nargv));
	if (a0 == NULL || nargv == NULL) {
		fprintf(stderr, PFX "out of memory\n");
		return 127;
	}
	/* the task must not see them (nor pass them to its own children) */
	unsetenv(ENV_EP);
	unsetenv(ENV_ARGV0);
	for (i = 0; i < n; i++)
		nargv[k++] = ep[i];
	nargv[k++] = a0;
	for (i = 1; i < argc; i++)
		nargv[k++] = argv[i];
	nargv[k] = NULL;
	execvp(ep[0], nargv);
	err = errno;
	fprintf(stderr, PFX "cannot run the image's Entrypoint %s: %s\n", ep[0], strerror(err));
	return (err == ENOENT || err == ENOTDIR || err == ELOOP || err == ENAMETOOLONG) ? 127 : 126;
}
