#!/usr/bin/env python3
"""A local multi-node Slurm cluster on one machine, for tests and `make demo`.

Python 3 standard library only.  Everything lives under one state directory:

    STATE/slurm.conf            generated; point SLURM_CONF here (see env())
    STATE/plugstack.conf        empty unless the caller gave one
    STATE/munge/                own munge key, socket, pid, log, seed
    STATE/ctld/                 StateSaveLocation
    STATE/spool/<node>/         SlurmdSpoolDir (%n)
    STATE/log/                  slurmctld.log, slurmd-<node>.log, munged.log
    STATE/run/                  pid files
    STATE/cluster.json          what start() chose (ports, nodes, pids)

The daemons are independent of any system munge/slurm: own munge socket
(AuthInfo=socket=...), own ports, own config.  Nodes are n1..nN, all on this
host (NodeHostname=<hostname>, NodeAddr=127.0.0.1, one port each), started
as `slurmd -D -N nK -f STATE/slurm.conf`.

CLI:
    python3 scripts/localcluster.py start  --state-dir DIR [--nodes 3] [--plugstack FILE]
                                           [--prolog FILE] [--epilog FILE] [--user NAME]
    python3 scripts/localcluster.py status --state-dir DIR
    python3 scripts/localcluster.py stop   --state-dir DIR
    python3 scripts/localcluster.py env    --state-dir DIR   (prints `export SLURM_CONF=...`)

API:
    c = LocalCluster("/tmp/x", nodes=3, plugstack="/path/plugstack.conf")
    c.start()                        # idempotent; recovers from a crashed run
    subprocess.run(["srun", "-N3", "hostname"], env=c.env())
    c.run_as_user(["srun", "true"])  # as the unprivileged test user (runuser)
    c.user, c.uid, c.gid             # the test user (default "ocitest")
    c.node_log("n1"), c.ctld_log     # log paths
    c.stop()                         # kills only what it started; removes nothing

Must run as root (slurmd, SlurmUser=root).
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

DEFAULT_USER = "ocitest"
CLUSTER_NAME = "ocitest"
SLURMCTLD = shutil.which("slurmctld") or "/usr/sbin/slurmctld"
SLURMD = shutil.which("slurmd") or "/usr/sbin/slurmd"
MUNGED = shutil.which("munged") or "/usr/sbin/munged"


class ClusterError(RuntimeError):
    pass


def slurm_version(slurmd: str = SLURMD) -> tuple:
    """(major, minor) of the installed Slurm, from `slurmd -V` ("slurm 24.11.5",
    "slurm-wlm 22.05.8"); (0, 0) when it cannot be told."""
    import re
    try:
        out = subprocess.run([slurmd, "-V"], capture_output=True, text=True, timeout=15).stdout
    except (OSError, subprocess.SubprocessError):
        return (0, 0)
    m = re.search(r"(\d+)\.(\d+)\.\d+", out or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _free_port_range(count: int, start: int = 20000, stop: int = 60000) -> int:
    """First port P (pseudo-randomised start) such that P..P+count-1 are free."""
    span = stop - start
    offset = (os.getpid() * 7919 + int(time.time() * 1000)) % span
    for i in range(0, span, count + 1):
        base = start + (offset + i) % (span - count)
        if all(_port_free(base + k) for k in range(count)):
            return base
    raise ClusterError(f"no {count} consecutive free ports")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ensure_user(name: str = DEFAULT_USER) -> pwd.struct_passwd:
    """Create the unprivileged test user (useradd -m) unless it exists."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return pwd.getpwnam(name)


class LocalCluster:
    def __init__(self, state_dir, nodes: int = 3, plugstack: Optional[str] = None,
                 prolog: Optional[str] = None, epilog: Optional[str] = None,
                 user: str = DEFAULT_USER, cpus: int = 4,
                 extra_conf: Sequence[str] = (), node_conf: str = "", gres_conf: str = ""):
        self.state_dir = Path(state_dir).absolute()
        self.nodes = int(nodes)
        if self.nodes < 1:
            raise ValueError("nodes must be >= 1")
        self.plugstack_src = plugstack
        self.prolog = prolog
        self.epilog = epilog
        self.user = user
        self.cpus = cpus
        self.extra_conf = list(extra_conf)
        self.node_conf = node_conf  # appended to the NodeName line, e.g. "Gres=gpu:2"
        self.gres_conf = gres_conf  # gres.conf next to slurm.conf (when not empty)
        self.slurm_version = slurm_version()
        self.hostname = socket.gethostname()
        self.uid: Optional[int] = None
        self.gid: Optional[int] = None
        self.home: Optional[str] = None
        try:
            self._set_user(pwd.getpwnam(user))
        except KeyError:
            pass

    # ---- paths -----------------------------------------------------------
    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    @property
    def plugstack(self) -> Path:
        return self.state_dir / "plugstack.conf"

    @property
    def munge_dir(self) -> Path:
        return self.state_dir / "munge"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.socket"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def ctld_log(self) -> Path:
        return self.log_dir / "slurmctld.log"

    @property
    def info_file(self) -> Path:
        return self.state_dir / "cluster.json"

    @property
    def node_names(self) -> List[str]:
        return [f"n{i}" for i in range(1, self.nodes + 1)]

    def node_log(self, node: str) -> Path:
        return self.log_dir / f"slurmd-{node}.log"

    def spool_dir(self, node: str) -> Path:
        return self.state_dir / "spool" / node

    # ---- environment -----------------------------------------------------
    def env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """Environment for slurm client commands (srun, sbatch, sinfo, ...)."""
        e = dict(os.environ if base is None else base)
        # never let a surrounding job's settings leak into ours
        for k in list(e):
            if k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")):
                del e[k]
        e["SLURM_CONF"] = str(self.conf)
        return e

    def user_env(self) -> Dict[str, str]:
        """env() for the test user: HOME/USER/LOGNAME set to theirs."""
        e = self.env()
        e.update(HOME=self.home or "/", USER=self.user, LOGNAME=self.user)
        return e

    def user_cmd(self, argv: Sequence[str]) -> List[str]:
        """argv wrapped to run as the test user, keeping SLURM_CONF."""
        return ["runuser", "-u", self.user, "--", "env", f"SLURM_CONF={self.conf}",
                f"HOME={self.home}", f"USER={self.user}", f"LOGNAME={self.user}"] + list(argv)

    def run(self, argv: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("env", self.env())
        return subprocess.run(list(argv), timeout=timeout, **kw)

    def run_as_user(self, argv: Sequence[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("cwd", self.home or "/tmp")
        return self.run(self.user_cmd(argv), timeout=timeout, **kw)

    # ---- setup -----------------------------------------------------------
    def _set_user(self, pw: pwd.struct_passwd) -> None:
        self.uid, self.gid, self.home = pw.pw_uid, pw.pw_gid, pw.pw_dir

    def _load_info(self) -> dict:
        try:
            return json.loads(self.info_file.read_text())
        except (OSError, ValueError):
            return {}

    def _save_info(self, info: dict) -> None:
        tmp = self.info_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, self.info_file)

    def _write_munge_key(self) -> None:
        key = self.munge_dir / "munge.key"
        if key.exists() and key.stat().st_size >= 32:
            return
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
        try:
            os.write(fd, os.urandom(1024))
        finally:
            os.close(fd)
        os.chmod(key, 0o400)

    @property
    def cgroup_conf(self) -> Path:
        return self.state_dir / "cgroup.conf"

    def _release_lines(self) -> List[str]:
        """What differs between the releases we run on (22.05, 24.11, 26.05).

        - SwitchType=switch/none: 22.05's default spelled out; later releases dropped the
          "none" plugin (no SwitchType is the same thing), so it is left out everywhere.
        - cgroups: 22.05's slurmstepd only touches cgroups for cgroup plugins; from 23.02
          on it loads the cgroup plugin in any case ("autodetect" without a cgroup.conf).
          On a host or chroot where that cannot work (cgroup v1 remnants, no systemd,
          another slurmd's hierarchy) it fails or warns, and nothing here needs cgroups:
          proctrack/linuxproc and task/none. So from 24.11 (tested; it has "disabled") a
          cgroup.conf next to slurm.conf says CgroupPlugin=disabled.
        """
        v = self.slurm_version
        lines = ["MailProg=/bin/true"]          # no mail here: quiet "MailProg is invalid"
        if v >= (24, 11):
            self.cgroup_conf.write_text("# generated by scripts/localcluster.py\n"
                                        "CgroupPlugin=disabled\n")
            os.chmod(self.cgroup_conf, 0o644)
        return lines

    def _write_conf(self, ctld_port: int, node_base: int) -> None:
        sd = self.state_dir
        last = node_base + self.nodes - 1
        ports = f"{node_base}-{last}" if self.nodes > 1 else str(node_base)
        nodes = f"n[1-{self.nodes}]" if self.nodes > 1 else "n1"
        lines = [
            "# generated by scripts/localcluster.py -- do not edit",
            f"ClusterName={CLUSTER_NAME}",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={sd}/ctld",
            f"SlurmctldPidFile={self.run_dir}/slurmctld.pid",
            f"SlurmctldLogFile={self.ctld_log}",
            "SlurmctldDebug=info",
            f"SlurmdSpoolDir={sd}/spool/%n",
            f"SlurmdPidFile={self.run_dir}/slurmd-%n.pid",
            f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            "SlurmdDebug=info",
            "SlurmdParameters=config_overrides",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "MinJobAge=30",
            "KillWait=5",
            "MessageTimeout=10",
            "Waittime=0",
            "SchedulerParameters=sched_interval=2",
            f"PlugStackConfig={self.plugstack}",
        ] + self._release_lines()
        if self.prolog:
            lines.append(f"Prolog={self.prolog}")
        if self.epilog:
            lines.append(f"Epilog={self.epilog}")
        lines += self.extra_conf
        lines += [
            f"NodeName={nodes} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={ports} "
            f"CPUs={self.cpus} RealMemory=1000 State=UNKNOWN {self.node_conf}".rstrip(),
            f"PartitionName=debug Nodes={nodes} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
            "",
        ]
        if self.gres_conf:
            gres = self.conf.parent / "gres.conf"
            gres.write_text(self.gres_conf)
            os.chmod(gres, 0o644)
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text("\n".join(lines))
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.conf)

    def _write_plugstack(self) -> None:
        text = ""
        if self.plugstack_src:
            text = Path(self.plugstack_src).read_text()
        self.plugstack.write_text(text)
        os.chmod(self.plugstack, 0o644)

    def set_plugstack(self, text: str) -> None:
        """Replace STATE/plugstack.conf.  srun/sbatch read it at every call and
        slurmd hands it to each new slurmstepd, so no restart is needed for the
        plugin's own arguments (reconfigure() to be sure)."""
        tmp = self.plugstack.with_suffix(".tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.plugstack)

    def reconfigure(self) -> None:
        self.run(["scontrol", "reconfigure"], check=True)

    # ---- process management ----------------------------------------------
    def _spawn(self, argv: List[str], log: Path) -> int:
        with open(log, "ab") as out:
            p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                 start_new_session=True, close_fds=True,
                                 env=self.env(), cwd=str(self.state_dir))
        return p.pid

    def restart_slurmd(self, node: str, wrapper: Sequence[str] = (), timeout: float = 60) -> None:
        """Stop node's slurmd and start it again, under wrapper (argv before slurmd's; a test's
        fault injector), recorded as the node's so that stop() still ends it."""
        info = self._load_info()
        pid = info.get("pids", {}).get(node)
        if pid and self._ours(pid, str(self.conf)):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
        info["pids"][node] = self._spawn([*wrapper, SLURMD, "-D", "-N", node, "-f", str(self.conf)],
                                         self.log_dir / f"slurmd-{node}.out")
        self._save_info(info)
        port = info["ports"]["slurmd"] + self.node_names.index(node)
        deadline = time.monotonic() + timeout
        while _port_free(port):  # listening again: a step may go there
            if time.monotonic() > deadline or not _pid_alive(info["pids"][node]):
                raise ClusterError(f"slurmd of {node} did not start again; see {self.log_dir}")
            time.sleep(0.1)
        self.wait_idle(timeout)

    def _ours(self, pid: int, marker: str) -> bool:
        return bool(pid) and _pid_alive(pid) and marker in _cmdline(pid)

    def _running(self) -> Dict[str, int]:
        """Daemons from cluster.json that are still alive and still ours."""
        info = self._load_info()
        alive = {}
        for name, pid in info.get("pids", {}).items():
            marker = str(self.munge_socket) if name == "munged" else str(self.conf)
            if self._ours(pid, marker):
                alive[name] = pid
        return alive

    def _stray_stepds(self) -> List[int]:
        """slurmstepd processes that belong to this cluster (have a file open in our spool)."""
        spool = str(self.state_dir / "spool") + "/"
        found = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().strip() != "slurmstepd":
                        continue
                for fd in os.listdir(f"/proc/{d}/fd"):
                    try:
                        if os.readlink(f"/proc/{d}/fd/{fd}").startswith(spool):
                            found.append(int(d))
                            break
                    except OSError:
                        pass
            except OSError:
                continue
        return found

    def status(self) -> Dict[str, object]:
        info = self._load_info()
        alive = self._running()
        expected = ["munged", "slurmctld"] + self.node_names
        st = {"state_dir": str(self.state_dir), "conf": str(self.conf),
              "daemons": {n: alive.get(n) for n in expected},
              "ports": info.get("ports"), "user": self.user}
        if "slurmctld" in alive:
            r = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=15)
            st["nodes"] = dict(l.split(None, 1) for l in r.stdout.split("\n") if l.strip())
        return st

    def is_running(self) -> bool:
        alive = self._running()
        return all(n in alive for n in ["munged", "slurmctld"] + self.node_names)

    def _node_states(self) -> Dict[str, str]:
        r = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=15)
        if r.returncode != 0:
            return {}
        out = {}
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2:
                out[parts[0]] = parts[1]
        return out

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        states: Dict[str, str] = {}
        while time.monotonic() < deadline:
            states = self._node_states()
            if all(states.get(n, "").rstrip("*") in ("idle", "mixed", "allocated")
                   for n in self.node_names):
                return
            down = [n for n in self.node_names
                    if states.get(n, "").rstrip("*").startswith(("down", "drain"))]
            if down:
                # e.g. after an unclean restart: bring them back
                self.run(["scontrol", "update", f"NodeName={','.join(down)}", "State=RESUME"],
                         timeout=15)
            time.sleep(0.5)
        raise ClusterError(f"nodes not idle after {timeout}s: {states}; see {self.log_dir}")

    def _wait_munge(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.munge_socket.exists():
                r = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)],
                                   capture_output=True)
                if r.returncode == 0:
                    return
            time.sleep(0.1)
        raise ClusterError(f"munged did not come up; see {self.log_dir}/munged.log")

    def _wait_ctld(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        r = None
        while time.monotonic() < deadline:
            r = self.run(["scontrol", "ping"], timeout=15)
            if r.returncode == 0 and "UP" in r.stdout:
                return
            time.sleep(0.3)
        raise ClusterError(f"slurmctld did not answer: {r and r.stdout + r.stderr}; "
                           f"see {self.ctld_log}")

    def start(self, timeout: float = 60) -> "LocalCluster":
        if os.geteuid() != 0:
            raise ClusterError("the local cluster must be started as root")
        self._set_user(ensure_user(self.user))
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.is_running():
            self.wait_idle(timeout)
            return self
        # partial or crashed run: kill what is left, then start afresh
        self.stop(quiet=True)
        for d in (self.state_dir, self.munge_dir, self.log_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o755)
        (self.state_dir / "ctld").mkdir(exist_ok=True)
        for n in self.node_names:
            self.spool_dir(n).mkdir(parents=True, exist_ok=True)
        # the test user must reach slurm.conf, plugstack.conf and the munge socket
        p = self.state_dir
        while p != p.parent:
            if p.stat().st_mode & 0o005 != 0o005 and p.stat().st_uid == 0 and str(p).startswith("/tmp/"):
                os.chmod(p, p.stat().st_mode | 0o005)
            p = p.parent
        for stale in [self.munge_socket, Path(str(self.munge_socket) + ".lock"),
                      *self.run_dir.glob("*.pid")]:
            try:
                stale.unlink()
            except FileNotFoundError:
                pass
        self._write_munge_key()
        info = self._load_info()
        ctld_port = info.get("ports", {}).get("slurmctld")
        node_base = info.get("ports", {}).get("slurmd")
        if (not ctld_port or not node_base or info.get("nodes") != self.nodes
                or not _port_free(ctld_port)
                or not all(_port_free(node_base + k) for k in range(self.nodes))):
            node_base = _free_port_range(self.nodes + 1)
            ctld_port = node_base + self.nodes
        self._write_conf(ctld_port, node_base)
        if not self.plugstack.exists() or self.plugstack_src:
            self._write_plugstack()
        pids: Dict[str, int] = {}
        info = {"nodes": self.nodes, "ports": {"slurmctld": ctld_port, "slurmd": node_base},
                "hostname": self.hostname, "user": self.user, "pids": pids}
        self._save_info(info)
        pids["munged"] = self._spawn(
            [MUNGED, "-F", "-f", f"--socket={self.munge_socket}",
             f"--key-file={self.munge_dir / 'munge.key'}",
             f"--pid-file={self.munge_dir / 'munged.pid'}",
             f"--log-file={self.log_dir / 'munged.log'}",
             f"--seed-file={self.munge_dir / 'munged.seed'}"],
            self.log_dir / "munged.out")
        self._save_info(info)
        self._wait_munge()
        pids["slurmctld"] = self._spawn([SLURMCTLD, "-D", "-i", "-f", str(self.conf)],
                                        self.log_dir / "slurmctld.out")
        self._save_info(info)
        self._wait_ctld()
        for n in self.node_names:
            pids[n] = self._spawn([SLURMD, "-D", "-N", n, "-f", str(self.conf)],
                                  self.log_dir / f"slurmd-{n}.out")
        self._save_info(info)
        try:
            self.wait_idle(timeout)
        except ClusterError:
            dead = [n for n, pid in pids.items() if not _pid_alive(pid)]
            raise ClusterError(f"cluster did not come up (dead: {dead}); logs in {self.log_dir}")
        return self

    def stop(self, quiet: bool = False, timeout: float = 15) -> None:
        info = self._load_info()
        alive = self._running()
        if "slurmctld" in alive:
            # end jobs first so slurmstepds exit cleanly
            self.run(["scancel", "--full", "--quiet", "-u", "root"], timeout=10)
            if self.user:
                self.run(["scancel", "--full", "--quiet", "-u", self.user], timeout=10)
            r = self.run(["squeue", "-h", "-o", "%i"], timeout=10)
            if r.returncode == 0 and r.stdout.strip():
                self.run(["scancel", "--full", "--quiet"] + r.stdout.split(), timeout=10)
        order = [n for n in self.node_names if n in alive] + \
                [n for n in alive if n not in self.node_names + ["slurmctld", "munged"]]
        order += [n for n in ("slurmctld", "munged") if n in alive]
        # slurmds first, then slurmctld, then munged
        def kill_wait(pids: List[int]) -> None:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
                time.sleep(0.1)
            for pid in pids:
                if _pid_alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        kill_wait([alive[n] for n in order if n not in ("slurmctld", "munged")])
        kill_wait(self._stray_stepds())
        kill_wait([alive[n] for n in order if n == "slurmctld"])
        kill_wait([alive[n] for n in order if n == "munged"])
        if info.get("pids"):
            info["pids"] = {}
            self._save_info(info)
        if not quiet and not alive:
            print(f"localcluster: nothing running in {self.state_dir}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["start", "stop", "status", "env"])
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--nodes", type=int, default=None)
    ap.add_argument("--plugstack", default=None, help="plugstack.conf to copy in")
    ap.add_argument("--prolog", default=None)
    ap.add_argument("--epilog", default=None)
    ap.add_argument("--user", default=DEFAULT_USER)
    a = ap.parse_args(argv)
    nodes = a.nodes
    if nodes is None:
        try:
            nodes = json.loads((Path(a.state_dir) / "cluster.json").read_text())["nodes"]
        except (OSError, ValueError, KeyError):
            nodes = 3
    c = LocalCluster(a.state_dir, nodes=nodes, plugstack=a.plugstack,
                     prolog=a.prolog, epilog=a.epilog, user=a.user)
    try:
        if a.command == "start":
            c.start()
            print(f"localcluster: {c.nodes} nodes up; export SLURM_CONF={c.conf}")
        elif a.command == "stop":
            c.stop()
        elif a.command == "env":
            print(f"export SLURM_CONF={c.conf}")
        else:
            st = c.status()
            print(json.dumps(st, indent=1))
            return 0 if c.is_running() else 3
    except ClusterError as e:
        print(f"localcluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
