"""Turn a tar stream into a SquashFS image with a well-kept external writer.

The writer is `tar2sqfs` (squashfs-tools-ng) or, from version 4.6 on,
`sqfstar` (squashfs-tools); never a hand-written one. Its flags are chosen so
that the same tar gives a bit-identical image (timestamps come from the tar,
the superblock time is fixed, implicit directories get fixed attributes), at
any number of compressor jobs.

SquashFSWriter runs the writer with the tar on its stdin and maps its failure
to NoSpace or SquashError, never leaving a partial image behind.
squash_layers() glues flatten() to it.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Optional, Tuple, Union

from .errors import InvalidArgument, NoSpace, SquashError
from .flatten import FlattenLimits, FlattenStats, flatten

log = logging.getLogger("ociimage.squash")

#: compressor -> (lowest, highest) level, or None where it has no levels.
COMPRESSORS = {
    "zstd": (1, 22),
    "gzip": (1, 9),
    "xz": (0, 9),
    "lzma": (0, 9),
    "lzo": (1, 9),
    "lz4": None,
}

_INSTALL_HINT = ("install tar2sqfs (Debian/Ubuntu: apt install squashfs-tools-ng; "
                 "RHEL/Fedora: dnf install squashfs-tools-ng, from EPEL on RHEL) "
                 "or squashfs-tools >= 4.6 for sqfstar")
_NOSPACE = re.compile(r"no space left on device|ENOSPC|disk quota exceeded", re.I)
# tar2sqfs 1.2 reports a failed write as "<entry>: I/O error." without errno.
_IO_ERROR = re.compile(r"I/O error|\bwrit(e|ing)\b", re.I)
_SLACK = 1 << 20
_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20


@dataclass
class SquashOptions:
    compression: str = "zstd"
    #: compressor level; ignored for lz4, which has none.
    level: Optional[int] = 3
    block_size: int = 131072
    #: compressor threads; None: one per CPU (at most 16).
    jobs: Optional[int] = None
    #: umask the writer runs with (the shared cache: 0o077, so its output is never
    #: readable by others, even for an instant); None: the caller's.
    umask: Optional[int] = None

    def validate(self) -> None:
        if self.compression not in COMPRESSORS:
            raise InvalidArgument(f"unknown SquashFS compressor {self.compression!r}",
                                  hint="choose one of " + ", ".join(sorted(COMPRESSORS)))
        rng = COMPRESSORS[self.compression]
        if rng is not None and self.level is not None:
            if not isinstance(self.level, int) or not rng[0] <= self.level <= rng[1]:
                raise InvalidArgument(
                    f"{self.compression} level {self.level!r} is out of range",
                    hint=f"use {rng[0]}..{rng[1]}")
        bs = self.block_size
        if not isinstance(bs, int) or bs < 4096 or bs > 1 << 20 or bs & (bs - 1):
            raise InvalidArgument(f"SquashFS block size {bs!r} is invalid",
                                  hint="use a power of two from 4096 to 1048576")
        if self.jobs is not None and (not isinstance(self.jobs, int) or not
                                      1 <= self.jobs <= 1024):
            raise InvalidArgument(f"jobs {self.jobs!r} is invalid", hint="use 1..1024 or None")

    def effective_jobs(self) -> int:
        return self.jobs or min(os.cpu_count() or 1, 16)


@dataclass(frozen=True)
class Writer:
    name: str                 # tar2sqfs or sqfstar
    path: str
    version: Tuple[int, ...]
    version_text: str


def _version(path: str, flag: str) -> Tuple[Tuple[int, ...], str]:
    try:
        res = subprocess.run([path, flag], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return (), ""
    text = res.stdout.decode("utf-8", "replace")
    first = text.strip().splitlines()[0] if text.strip() else ""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", first)
    if not m:
        return (), first
    return tuple(int(g) for g in m.groups() if g is not None), first


def find_writer() -> Writer:
    """The SquashFS writer to use: tar2sqfs, else sqfstar >= 4.6."""
    path = shutil.which("tar2sqfs")
    if path:
        ver, text = _version(path, "--version")
        return Writer("tar2sqfs", path, ver, text or "tar2sqfs")
    path = shutil.which("sqfstar")
    if path:
        ver, text = _version(path, "-version")
        if ver >= (4, 6):
            return Writer("sqfstar", path, ver, text)
        raise SquashError(f"sqfstar {'.'.join(map(str, ver)) or '?'} is too old "
                          "(it crashes on some hardlinks before 4.6)", hint=_INSTALL_HINT)
    raise SquashError("no SquashFS writer found (tar2sqfs or sqfstar)", hint=_INSTALL_HINT)


def writer_version() -> str:
    """e.g. "tar2sqfs (squashfs-tools-ng) 1.2.0", for image metadata."""
    return find_writer().version_text


def writer_argv(writer: Writer, out_path: str, options: SquashOptions) -> list:
    options.validate()
    comp, level = options.compression, options.level
    has_level = COMPRESSORS[comp] is not None and level is not None
    jobs = str(options.effective_jobs())
    if writer.name == "tar2sqfs":
        argv = [writer.path, "--quiet", "--force", "--no-skip",
                "--compressor", comp, "--block-size", str(options.block_size),
                "--num-jobs", jobs,
                # Implicit directories (a/b with no a/ entry) get fixed
                # attributes, so the image depends on the tar alone.
                "--defaults", "uid=0,gid=0,mode=0755,mtime=0"]
        if has_level:
            argv += ["--comp-extra", f"level={level}"]
        return argv + [out_path]
    # sqfstar >= 4.6 (squashfs-tools): reproducible is its default; pin the
    # times it would otherwise take from the clock.
    argv = [writer.path, "-quiet", "-no-progress", "-comp", comp,
            "-b", str(options.block_size), "-processors", jobs,
            "-mkfs-time", "0", "-root-time", "0", "-root-mode", "0755",
            "-root-uid", "0", "-root-gid", "0"]
    if has_level and comp in ("zstd", "gzip", "lzo"):
        argv += ["-Xcompression-level", str(level)]
    return argv + [out_path]


class _CountingPipe:
    """The writer's stdin, counting what went in (to judge a later I/O error)."""

    def __init__(self, pipe: BinaryIO):
        self.pipe = pipe
        self.written = 0

    def write(self, data) -> int:
        n = self.pipe.write(data)
        self.written += len(data)
        return n

    def flush(self) -> None:
        self.pipe.flush()

    def close(self) -> None:
        self.pipe.close()


def _free_bytes(directory: Path) -> Optional[int]:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class SquashFSWriter:
    """Context manager: write a tar stream to .stdin, get a SquashFS at out_path.

    On failure the partial image is removed and NoSpace or SquashError is
    raised (any other exception from the block is re-raised unchanged).
    """

    def __init__(self, out_path: Union[str, os.PathLike], options: Optional[SquashOptions] = None,
                 writer: Optional[Writer] = None):
        self.out_path = Path(out_path)
        self.options = options or SquashOptions()
        self.options.validate()
        self.writer = writer
        self.proc: Optional[subprocess.Popen] = None
        self.stdin: Optional[BinaryIO] = None
        self._stderr = collections.deque(maxlen=50)
        self._thread: Optional[threading.Thread] = None
        self._free_at_start: Optional[int] = None

    def __enter__(self) -> "SquashFSWriter":
        writer = self.writer or find_writer()
        self._free_at_start = _free_bytes(self.out_path.parent)
        if writer.name == "sqfstar":
            self._remove()  # sqfstar would append to an existing image
        argv = writer_argv(writer, str(self.out_path), self.options)
        log.debug("starting squashfs writer", extra={"argv": argv})
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, close_fds=True,
                                         umask=-1 if self.options.umask is None
                                         else self.options.umask)
        except OSError as e:
            raise SquashError(f"cannot start {writer.name}: {e.strerror}",
                              hint=_INSTALL_HINT) from None
        self.writer = writer
        try:
            # A larger pipe lets the writer read on while this process parses headers
            # and the other way round (the default 64 KiB costs a switch per 64 KiB).
            fcntl.fcntl(self.proc.stdin.fileno(), _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass
        self.stdin = _CountingPipe(self.proc.stdin)
        self._thread = threading.Thread(target=self._read_stderr, name="squashfs-stderr",
                                        daemon=True)
        self._thread.start()
        return self

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self._stderr.append(text)
                log.debug("squashfs writer: %s", text)

    def _remove(self) -> None:
        try:
            self.out_path.unlink()
        except FileNotFoundError:
            pass

    def _finish_process(self, kill: bool) -> int:
        proc = self.proc
        if kill and proc.poll() is None:
            proc.kill()
        try:
            proc.stdin.close()
        except OSError:
            pass  # the writer is gone; its exit status tells why
        rc = proc.wait()
        self._thread.join(timeout=30)
        proc.stderr.close()
        return rc

    def _error(self, rc: int, pipe_error: Optional[BaseException]):
        lines = list(self._stderr)
        text = "\n".join(lines)
        last = lines[-1] if lines else f"exit status {rc}"
        name = self.writer.name
        nospace = _NOSPACE.search(text) or (isinstance(pipe_error, OSError) and
                                            pipe_error.errno in (errno.ENOSPC, errno.EDQUOT))
        # The tool removes its output and loses errno on a failed write, so
        # judge by what was fed: the image is never much larger than its tar.
        free = self._free_at_start
        if not nospace and _IO_ERROR.search(text) and free is not None and \
                self.stdin.written + _SLACK >= free:
            nospace = True
        if not nospace and _IO_ERROR.search(text):
            # Or something else filled the filesystem meanwhile (the layer downloads
            # spooled next to the image, another writer): it is full now.
            now = _free_bytes(self.out_path.parent)
            nospace = now is not None and now < _SLACK
        if nospace:
            return NoSpace(f"no space left for {self.out_path}: {name} stopped ({last}); "
                           f"{free if free is not None else '?'} bytes were free at the start",
                           hint="free space or set a smaller cache quota")
        if pipe_error is not None and rc == 0:
            return SquashError(f"{name} stopped reading its input: {pipe_error}")
        return SquashError(f"{name} failed (exit status {rc}): {last}")

    def __exit__(self, et, ev, tb) -> bool:
        pipe_error = None
        if et is None:
            try:
                self.stdin.flush()
            except OSError as e:
                pipe_error = e
            rc = self._finish_process(kill=False)
        elif isinstance(ev, (BrokenPipeError, ConnectionResetError)) or (
                isinstance(ev, OSError) and ev.errno in (errno.EPIPE, errno.ENOSPC)):
            # The writer died under us: its stderr says why.
            pipe_error = ev
            rc = self._finish_process(kill=False)
        else:
            self._finish_process(kill=True)
            self._remove()
            return False
        if rc == 0 and pipe_error is None:
            return False
        self._remove()
        raise self._error(rc, pipe_error) from None


def squash_layers(layers: Iterable[BinaryIO], out_path: Union[str, os.PathLike],
                  options: Optional[SquashOptions] = None,
                  limits: Optional[FlattenLimits] = None) -> FlattenStats:
    """Flatten decompressed layers (top-most first) into a SquashFS at out_path."""
    with SquashFSWriter(out_path, options) as w:
        stats = flatten(layers, w.stdin, limits=limits)
    return stats
