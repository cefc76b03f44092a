"""A whole local site for end-to-end tests: one oci-imaged per node sharing one cache, and a
Slurm cluster whose plugstack loads the installed plugin (see install_fixture.py).

    site = start_site(installed, "oci-e2e-", nodes=3, plugstack_args="allow_sqfs=yes")
    ...
    stop_site(site)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from cluster_fixture import start_cluster, stop_cluster
from daemon_proc import DaemonProcess

DAEMON_CONF = "[daemon]\nmount_idle = 1\n[cache]\nlease_ttl = 60\n"


@dataclass
class Site:
    base: Path
    conf: Path
    daemons: List[DaemonProcess]
    cluster: object
    plugstack: str
    extra: dict = field(default_factory=dict)

    @property
    def cache(self) -> Path:
        return self.base / "cache"


def mounts_under(path: Path) -> List[str]:
    from ociimage.runtime.mounts import read_mountinfo
    prefix = os.path.realpath(path) + "/"
    return [e.mount_point for e in read_mountinfo() if e.mount_point.startswith(prefix)]


def unmount_under(path: Path) -> None:
    for m in sorted(mounts_under(path), reverse=True):
        subprocess.run(["umount", "-l", m], check=False)


def start_site(installed, prefix: str, nodes: int = 3, plugstack_args: str = "",
               daemon_conf=DAEMON_CONF, cluster_kw=None) -> Site:
    """daemon_conf: the daemons' config text, or a callable(base) returning it;
    cluster_kw: more arguments of start_cluster (extra_conf, node_conf, gres_conf)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(base, 0o755)
    conf = base / "oci-image.conf"
    conf.write_text(daemon_conf(base) if callable(daemon_conf) else daemon_conf)
    os.chmod(conf, 0o644)
    daemons: List[DaemonProcess] = []
    try:
        for i in range(1, nodes + 1):
            daemons.append(DaemonProcess(base, base / "cache", node=f"n{i}",
                                         extra=["--config", str(conf)]).start())
        plugstack = (f"required {installed.plugin} step_client={installed.step_client} "
                     f"socket={base}/%n/oci-imaged.sock {plugstack_args}".rstrip() + "\n")
        cluster = start_cluster(nodes=nodes, plugstack_text=plugstack, prefix=prefix + "slurm-",
                                **(cluster_kw or {}))
    except BaseException:
        for d in daemons:
            d.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise
    return Site(base, conf, daemons, cluster, plugstack)


def stop_site(site: Site) -> None:
    stop_cluster(site.cluster)
    for d in site.daemons:
        d.stop()
    # step namespaces and image mounts outlive a daemon on purpose; the test owns them
    unmount_under(site.base)
    if not os.environ.get("OCI_KEEP_CLUSTER"):
        shutil.rmtree(site.base, ignore_errors=True)
