"""Run real oci-imaged processes for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from registry_server import free_port

BIN = Path(sys.executable).parent


class DaemonProcess:
    def __init__(self, base: Path, cache_dir: Path, node: str = "n1", extra: Optional[List[str]] = None,
                 metrics: bool = True, bin_dir: Optional[Path] = None):
        self.bin = Path(bin_dir) if bin_dir else BIN  # another install's (bench: a revision's)
        self.base = Path(base)
        self.node = node
        self.cache_dir = Path(cache_dir)
        self.socket = self.base / node / "oci-imaged.sock"
        self.runtime_dir = self.base / node / "run"
        self.metrics_port = free_port() if metrics else None
        self.log_path = self.base / f"{node}.log"
        self.extra = extra or []
        self.proc: Optional[subprocess.Popen] = None

    def argv(self) -> List[str]:
        argv = [str(self.bin / "oci-imaged"), "--socket", str(self.socket), "--runtime-dir",
                str(self.runtime_dir), "--cache-dir", str(self.cache_dir), "--node", self.node,
                "--log-level", "info"]
        if self.metrics_port:
            argv += ["--metrics", f"127.0.0.1:{self.metrics_port}"]
        return argv + self.extra

    def start(self, timeout: float = 20) -> "DaemonProcess":
        self.base.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OCI_IMAGE_CONFIG=str(self.base / "none.conf"))
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"oci-imaged exited {self.proc.returncode}: {self.log()[-3000:]}")
            if self.socket.exists() and self._accepts():
                return self
            time.sleep(0.05)
        self.proc.kill()  # never leave a half-started daemon behind
        self.proc.wait()
        raise RuntimeError(f"oci-imaged did not start: {self.log()[-3000:]}")

    def _accepts(self) -> bool:
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.socket))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 20) -> Optional[int]:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
        return self.proc.returncode if self.proc else None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def cli(self, *args: str, user: Optional[str] = None, check: bool = False,
            timeout: float = 120) -> subprocess.CompletedProcess:
        argv = [str(self.bin / "oci-image"), "--socket", str(self.socket), *args]
        if user:
            argv = ["runuser", "-u", user, "--"] + argv
        env = dict(os.environ, OCI_IMAGE_CONFIG=str(self.base / "none.conf"))
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if check and r.returncode != 0:
            raise AssertionError(f"{argv} failed {r.returncode}: {r.stderr}")
        return r
