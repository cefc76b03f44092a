"""The plugin's plugstack.conf arguments (KEY=VALUE after its path), parsed once, here.

The plugin passes them raw to every step client call (--plugstack KEY=VALUE); it reads
only step_client (what to run) and pyxis_aliases (which names to register) itself.
A wrong one fails the step with a one-line message naming plugstack.conf, every time,
so an admin's typo cannot go unnoticed. The keys are contract.PLUGSTACK.
"""

from __future__ import annotations

import os
from collections import namedtuple

from . import contract
from .errors import InvalidArgument


#: the parsed arguments (prefetch_socket "": prefetch disabled); no typing: on every step
Plugstack = namedtuple("Plugstack", "step_client socket launcher allow_sqfs default_mounts "
                                    "batch_in_image prefetch_socket record_job pyxis_aliases "
                                    "allow_remap_root")


_PATHS = ("step_client", "socket", "launcher")
_BOOLS = ("allow_sqfs", "batch_in_image", "record_job", "pyxis_aliases", "allow_remap_root")
_KNOWN = frozenset(k.name for k in contract.PLUGSTACK)


def parse(args) -> Plugstack:
    """[KEY=VALUE, ...] -> Plugstack; InvalidArgument names the argument and what is wrong."""
    values = {"socket": contract.DEFAULT_SOCKET, "prefetch_socket": contract.DEFAULT_PREFETCH_SOCKET,
              "record_job": True, "allow_sqfs": False, "batch_in_image": False,
              "pyxis_aliases": False, "allow_remap_root": True, "default_mounts": "", "launcher": "", "step_client": ""}
    for arg in args or ():
        key, eq, value = arg.partition("=")
        if not eq or not value:
            raise InvalidArgument(f'plugstack.conf: argument "{arg}": expected key=value')
        if key not in _KNOWN:
            raise InvalidArgument(f'plugstack.conf: unknown argument "{key}"')
        if key in _PATHS and not value.startswith("/"):
            raise InvalidArgument(f"plugstack.conf: {key}={value}: must be an absolute path")
        if key == "prefetch_socket":
            if value in ("none", "off"):
                value = ""
            elif not value.startswith("/"):
                raise InvalidArgument(f"plugstack.conf: prefetch_socket={value}: must be an "
                                      f"absolute path or none")
        if key in _BOOLS:
            low = value.lower()
            if low not in contract.TRUE_WORDS + contract.FALSE_WORDS:
                raise InvalidArgument(f"plugstack.conf: {key}={value}: expected yes or no")
            value = low in contract.TRUE_WORDS
        if key == "default_mounts":  # checked as every node checks it
            from .stepargs import parse_mounts
            parse_mounts(value, "plugstack default_mounts")
        values[key] = value
    if not values["step_client"]:
        raise InvalidArgument("plugstack.conf: step_client=PATH is required")
    if not values["launcher"]:  # next to the step client, where the package installs it
        values["launcher"] = os.path.join(os.path.dirname(values["step_client"]),
                                          "oci-image-launch")
    return Plugstack(**values)


def socket_for(socket: str, node: str) -> str:
    """socket= with %n the node's name (several daemons on one host: a test cluster)."""
    return socket.replace("%n", node)


def job_marker(socket: str, node: str, job: str) -> str:
    """Made by prepare, removed by cleanup-job: a step of this job used an image here, so
    the job's end has something to release (every other job's end costs one stat)."""
    return os.path.join(os.path.dirname(socket_for(socket, node)), "jobs", job)
