"""A real Docker Distribution registry (Debian's docker-registry) for tests.

Each instance runs on its own loopback port with its own storage directory.
The access log is kept so tests can count what the registry served (e.g. how
many times a blob was fetched).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import requests

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RegistryServer:
    """docker-registry on 127.0.0.1:<port>.

    auth: None, ("htpasswd", path_to_htpasswd) or
    ("token", {"realm": url, "service": name, "issuer": name, "rootcertbundle": path}).
    """

    def __init__(self, workdir: Optional[Path] = None, auth=None, port: Optional[int] = None):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="oci-registry-"))
        self.port = port or free_port()
        self.auth = auth
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.workdir / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: false",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.workdir / 'data'}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
        ]
        if self.auth:
            kind, params = self.auth
            lines.append("auth:")
            if kind == "htpasswd":
                lines += ["  htpasswd:", "    realm: test-realm", f"    path: {params}"]
            elif kind == "token":
                lines.append("  token:")
                lines += [f"    {k}: {v}" for k, v in params.items()]
            else:
                raise ValueError(kind)
        return "\n".join(lines) + "\n"

    def start(self) -> "RegistryServer":
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "config.yml"
        cfg.write_text(self._config())
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_path.read_text()[-2000:]}")
            try:
                requests.get(self.url + "/v2/", timeout=1)
                return self
            except requests.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def access_log(self) -> list:
        """(method, path, status) for every request the registry answered."""
        out = []
        pat = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[0-9.]+" (\d{3})')
        for line in self.log_path.read_text(errors="replace").splitlines():
            m = pat.search(line)
            if m:
                out.append((m.group(1), m.group(2), int(m.group(3))))
        return out

    def blob_fetches(self, digest: str) -> int:
        return sum(1 for meth, path, status in self.access_log()
                   if meth == "GET" and path.split("?")[0].endswith("/blobs/" + digest)
                   and status in (200, 206, 307))
