"""Run the step client as the plugin does: its records on a socket (--records-fd), the job's
environment on a memfd (--job-env-fd), and what it sends back decoded.

For tests that call `oci-image-step` directly (no cluster): the C side of the same contract
is plugin/child.c, tested by plugin/tests/harness.c.
"""
import array
import os
import socket
import subprocess
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple


class StepResult(NamedTuple):
    returncode: int
    stdout: str
    stderr: str
    records: List[Tuple[str, str]]
    fd: Optional[int]  # a descriptor it sent (prepare's namespace), ours to close

    def values(self, key: str) -> List[str]:
        return [v for k, v in self.records if k == key]

    @property
    def pinned(self) -> str:
        """submit's OCI_IMAGE_PINNED (empty: nothing pinned)."""
        for v in self.values("setenv"):
            if v.startswith("OCI_IMAGE_PINNED="):
                return v.split("=", 1)[1]
        return ""


def options(**given: str) -> List[str]:
    """--option NAME VALUE for each option (oci_image="x" -> --option oci-image x)."""
    out: List[str] = []
    for name, value in given.items():
        out += ["--option", name.replace("_", "-"), value]
    return out


def plugstack(*args: str) -> List[str]:
    out: List[str] = []
    for a in args:
        out += ["--plugstack", a]
    return out


def run_step(argv: Sequence[str], *, job_env: Optional[Dict[str, str]] = None,
             env: Optional[Dict[str, str]] = None, timeout: float = 120,
             cwd: str = "/", preexec=None) -> StepResult:
    """argv: the step client and its subcommand (submit, prepare, release) with its arguments
    (without --records-fd and
    --job-env-fd, which this adds). To run it as a user, prefix argv with cluster_fixture.as_user()."""
    argv = list(argv)
    cmd_at = next(i for i, a in enumerate(argv) if a in ("submit", "prepare", "release"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds = [theirs.fileno()]
    # release sends no records (its fd 4, the plugin's socket, is not read)
    extra = ["--records-fd", str(theirs.fileno())] if argv[cmd_at] != "release" else []
    memfd = None
    if job_env is not None:
        memfd = os.memfd_create("job-env", 0)
        os.write(memfd, b"".join(f"{k}={v}".encode() + b"\0" for k, v in job_env.items()))
        fds.append(memfd)
        extra += ["--job-env-fd", str(memfd)]
    argv[cmd_at + 1:cmd_at + 1] = extra
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            pass_fds=fds, cwd=cwd, preexec_fn=preexec)
    theirs.close()
    if memfd is not None:
        os.close(memfd)
    data, got = b"", None
    ours.settimeout(timeout)
    while True:
        msg, anc, _flags, _addr = ours.recvmsg(1 << 16, socket.CMSG_SPACE(4 * 4))
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds_in = array.array("i")
                fds_in.frombytes(payload[:len(payload) - len(payload) % 4])
                for fd in fds_in:
                    if got is not None:
                        os.close(got)
                    got = fd
        if not msg:
            break
        data += msg
    ours.close()
    out, err = proc.communicate(timeout=timeout)
    fields = data.split(b"\0")[:-1]
    records = [(fields[i].decode(), fields[i + 1].decode("utf-8", "surrogateescape"))
               for i in range(0, len(fields) - 1, 2)]
    return StepResult(proc.returncode, out.decode(errors="replace"),
                      err.decode(errors="replace"), records, got)
