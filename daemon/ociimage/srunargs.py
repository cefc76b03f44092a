"""What srun itself was asked, which SPANK does not show a plugin: `--multi-prog` and
`--chdir` among srun's own options (its command line, read at submit from the step
client's parent, the srun that runs it as the user).

srun stops at its first argument that is not an option (getopt's "+"): what follows is the
command, whose own `--multi-prog` is not srun's. Telling an option's separate value from
the command needs to know which options take one: srun's flags (no value, or only an
attached `=value`) are listed here from srun(1); any other option, this plugin's and other
plugins' value options included, takes the next argument when it has no `=`. A flag of
another SPANK plugin that is not listed is taken to swallow the next argument; the check
then misses a `--multi-prog` right after it (the step then fails on the nodes instead).
"""

from __future__ import annotations

from . import contract

#: srun(1)'s options without a separate value (flags, and optional values given with '=')
_FLAGS_SHORT = frozenset("EHhIKklOQsuVvXZ")
_OPTIONAL_SHORT = frozenset("IKk")  # -K1: the rest of the argument is its value
_FLAGS_LONG = frozenset((
    "bcast", "compress", "contiguous", "disable-status", "exact", "exclusive", "help", "hold",
    "immediate", "kill-on-bad-exit", "label", "multi-prog", "nice", "no-allocate", "no-kill",
    "overcommit", "overlap", "oversubscribe", "preserve-env", "propagate", "pty", "quiet",
    "quit-on-interrupt", "reboot", "resv-ports", "send-libs", "spread-job", "test-only",
    "unbuffered", "usage", "use-min-nodes", "verbose", "version", "x11", "jobid-only",
)) | frozenset(o.name for o in contract.OPTIONS if o.arginfo is None) \
   | frozenset(a.name for a in contract.ALIASES if a.arginfo is None)


def _is_multi_prog(name: str) -> bool:
    """--multi-prog, or the unambiguous abbreviation getopt_long accepts for it."""
    return len(name) >= 3 and "multi-prog".startswith(name)


def srun_options(argv):
    """srun's own options in argv (argv[0]: srun), up to its command: [(name, value)], a long
    option by its name as given (an abbreviation stays one), a short one by its letter;
    value None for a flag."""
    out, i = [], 1
    while i < len(argv):
        a = argv[i]
        if a == "--" or not a.startswith("-") or a == "-":
            break  # the command starts here
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            if not eq and name not in _FLAGS_LONG and not _is_multi_prog(name):
                i += 1  # its value
                value = argv[i] if i < len(argv) else ""
            out.append((name, value if eq or name not in _FLAGS_LONG else None))
        else:
            for j, c in enumerate(a[1:], 1):
                if c in _OPTIONAL_SHORT:
                    out.append((c, a[j + 1:] or None))
                    break
                if c not in _FLAGS_SHORT:
                    if j == len(a) - 1:  # -N 2: the value is the next argument
                        i += 1
                        out.append((c, argv[i] if i < len(argv) else ""))
                    else:                # -N2: the rest of this one
                        out.append((c, a[j + 1:]))
                    break
                out.append((c, None))
        i += 1
    return out


def asks_multi_prog(argv) -> bool:
    """Whether srun's argv has --multi-prog among srun's own options."""
    return any(len(n) > 1 and _is_multi_prog(n) for n, _v in srun_options(argv))


def chdir_of(argv):
    """srun's -D/--chdir DIR (the last one given), or None."""
    found = None
    for name, value in srun_options(argv):
        if name == "D" or (len(name) >= 2 and "chdir".startswith(name)):
            found = value
    return found


def parent_argv() -> list:
    """The command line of this process' parent ([] where it cannot be read)."""
    import os
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0")[:-1]]
