"""What slurmstepd's step client reads from the job: its environment (fd 3), this node's
name, the tasks' directory, how to show progress; and the step's namespace, opened and
checked. Standard library only: this is on every step's path.

The job environment is the user's to set (srun --export, the Slurm API): nothing read from
it is trusted beyond what the user may choose anyway. The ids come from Slurm itself
(spank items, as arguments), never from it.
"""

from __future__ import annotations

import os

#: the most of a job environment read (the plugin writes it whole)
MAX_JOB_ENV = 4 << 20
_NODE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def read_job_env(fd: int) -> dict:
    """The job's environment, NAME=VALUE\\0 records the plugin wrote to a memfd on fd (from
    its start: a release reads the same descriptor prepare read). Never this process's own
    environment: we run as root, and a user's LD_PRELOAD or PYTHONPATH must not."""
    if fd < 0:
        return {}
    os.lseek(fd, 0, os.SEEK_SET)
    chunks, size = [], 0
    while size <= MAX_JOB_ENV:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    os.close(fd)
    if size > MAX_JOB_ENV:  # cut, a variable could be lost: refuse rather than guess
        raise ValueError(f"the job's environment is larger than {MAX_JOB_ENV >> 20} MiB")
    env = {}
    for rec in b"".join(chunks)[:MAX_JOB_ENV].split(b"\0"):
        name, sep, value = rec.partition(b"=")
        if sep and name:
            env[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return env


def expand_hostlist(text: str) -> "list[str]":
    """Slurm's host list syntax: 'n[1-3,7],gpu05' -> ['n1', 'n2', 'n3', 'n7', 'gpu05']
    (one bracket per name, as SLURM_STEP_NODELIST has it; zero padding kept)."""
    out, rest = [], text
    while rest:
        comma, bracket = rest.find(","), rest.find("[")
        if bracket < 0 or (0 <= comma < bracket):  # a plain name
            name, _sep, rest = rest.partition(",")
            out.append(name)
            continue
        close = rest.find("]", bracket)
        if close < 0:
            raise ValueError(f"host list {text!r}")
        head, ranges = rest[:bracket], rest[bracket + 1:close]
        tail, _sep, rest = rest[close + 1:].partition(",")
        for part in ranges.split(","):
            lo, _dash, hi = part.partition("-")
            hi = hi or lo
            if not (lo.isdigit() and hi.isdigit()) or int(hi) - int(lo) > 100000:
                raise ValueError(f"host list {text!r}")
            for i in range(int(lo), int(hi) + 1):
                out.append(f"{head}{i:0{len(lo)}d}{tail}")
    return out


def node_name(env: dict, step: int, node_id: int, batch_step: int) -> str:
    """This node's Slurm name: entry node_id of the step's node list (the batch step runs on
    the job's first node). SLURMD_NODENAME is not set yet for a step, and an srun inside a
    batch script inherits the batch step's. Falls back to the host's name."""
    text = env.get("SLURM_JOB_NODELIST" if step == batch_step else "SLURM_STEP_NODELIST", "")
    try:
        names = expand_hostlist(text) if text else []
    except ValueError:
        names = []
    name = names[node_id] if 0 <= node_id < len(names) else os.uname().nodename.split(".")[0]
    if not (0 < len(name) <= 64 and name[0].isalnum() and set(name) <= _NODE_CHARS):
        # it becomes part of a socket's path (%n)
        raise ValueError(f"node name {name[:80]!r}")
    return name


def submit_cwd(env: dict) -> str:
    """srun --chdir's directory (submit's OCI_SUBMIT_CHDIR), else srun's (the plugin's
    OCI_SUBMIT_CWD), else the submitting command's (SLURM_SUBMIT_DIR: sbatch's, salloc's),
    else the job's PWD, else /."""
    for name in ("OCI_SUBMIT_CHDIR", "OCI_SUBMIT_CWD", "SLURM_SUBMIT_DIR", "PWD"):
        if env.get(name, "").startswith("/"):
            return env[name]
    return "/"


def progress_mode(env: dict, step: int, node_id: int, batch_step: int) -> "tuple[str, int]":
    """One node of a step shows the wait (its first); redrawn in place when srun's stderr is
    a terminal and really goes there (not -l, -o, -e, nor a batch step)."""
    if node_id != 0:
        return "none", 0
    cols = env.get("OCI_SUBMIT_TTY", "")
    if cols.isascii() and cols.isdigit() and len(cols) <= 5 and step != batch_step and not any(
            n in env for n in ("SLURM_LABELIO", "SLURM_STDERRMODE", "SLURM_STDOUTMODE")):
        return "tty", int(cols)
    return "plain", 0


def process_start(pid: int) -> int:
    """A process's start time (field 22 of /proc/PID/stat): with the pid, names it for good.
    (Here, not in runtime/nsholder.py, which uses it too: this module is on every step's
    path and imports nothing beyond os.)"""
    with open(f"/proc/{pid}/stat", "rb") as f:
        line = f.read()
    return int(line[line.rindex(b")") + 2:].split()[19])


def _open_checked(path: str, pid: int, start: int, inode: int) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_ino != inode or process_start(pid) != start:
            raise ValueError(f"the namespace holder {pid} is not the one the daemon made")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_user_namespace(container: dict) -> int:
    """--oci-remap-root: the step's user namespace, which its holder keeps open on a
    descriptor (it never joins it: a root process in it could be ptraced by the user),
    checked like the mount namespace."""
    pid, fd = int(container.get("holder_pid", 0)), int(container.get("userns_fd", -1))
    start, inode = int(container.get("holder_start", 0)), int(container.get("userns_inode", 0))
    if pid <= 0 or fd < 0 or inode <= 0:
        raise ValueError("the daemon named no user namespace for --oci-remap-root")
    return _open_checked(f"/proc/{pid}/fd/{fd}", pid, start, inode)


def open_namespace(container: dict) -> int:
    """The step's mount namespace, opened through its holder and checked after the open: a
    holder that died and whose pid was reused (by any process, in a namespace of its own
    making) must never be entered as root. OSError/ValueError if it is not the daemon's."""
    pid = int(container.get("holder_pid", 0))
    start, inode = int(container.get("holder_start", 0)), int(container.get("ns_inode", 0))
    if pid <= 0 or inode <= 0:
        raise ValueError("the daemon named no namespace holder")
    return _open_checked(f"/proc/{pid}/ns/mnt", pid, start, inode)
