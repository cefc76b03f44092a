"""The step socket: the per-step requests of the plugin's step client, root only.

Every step of every job runs the step client twice (prepare, then release), so its
start-up is the per-step cost. A gRPC client must import grpcio (tens of ms, more than
the daemon's whole work for a step in a cached image), so the step client speaks the
user socket's line protocol instead (usersock.py, userstream.py: one JSON request, then
progress lines and one answer) on a socket of its own: mode 0600 in root's runtime
directory, and every caller but uid 0 refused by SO_PEERCRED before a byte is read.

The messages are the ociimage.v1 contract's (proto/ociimage/v1/ociimage.proto) in
protobuf's canonical JSON mapping, so the .proto stays the one declaration of them:

    {"op": "prepare", "step": <PrepareStepRequest>}
        -> progress lines, then {"container": <StepContainer>}
    {"op": "release", "job": J, "step": S}        -> {"state": "released"}
    {"op": "release-job", "job": J}               -> {"state": "released", "steps": N, "leases": N}
    any failure -> {"error": "one line", "code": "<status name>"}

The client half (the bottom of this file) imports only what the step client needs.
"""

from __future__ import annotations

import os
from . import errors

#: The job's environment comes in the request, and the step client refuses a request
#: larger than this once encoded (an environment of control characters is six times
#: its size in JSON). A request is read whole and parsed under the GIL (3 MiB of JSON:
#: about half a second), so this stays small: the kernel lets no task start with more
#: than about 2 MiB of arguments and environment anyway.
MAX_STEP_REQUEST = 3 << 20
MAX_STEP_REPLY = 8 << 20
#: Every caller is root (slurmstepd, for all users' steps), so connections are not
#: counted per uid: a cap per caller would fail one user's step, or leak a release,
#: because of another's. What a step may wait for is bounded per job user, by the
#: request's uid ([daemon] max_requests_per_uid, max_pulls_per_uid, in ImageStore.pull);
#: this ceiling, far above the steps Slurm runs on a node, is for what threads cost.
MAX_STEP_CONNECTIONS = 4096
STEP_REQUEST_TIMEOUT = 30.0


def step_socket_path(main_socket) -> str:
    """Next to the daemon's gRPC socket: oci-imaged.sock -> oci-imaged-step.sock."""
    path = os.fspath(main_socket)
    head, name = os.path.split(path)
    name = name[:-5] + "-step.sock" if name.endswith(".sock") else name + ".step"
    return os.path.join(head, name)


# ---- the daemon's side ------------------------------------------------------------------

class StepRequests:
    """The step socket's ops, over the step runtime (runtime/steps.py)."""

    def __init__(self, steps, prepare_timeout: float):
        self.steps = steps
        self.prepare_timeout = prepare_timeout

    def __call__(self, caller, request: dict):
        from google.protobuf import json_format
        from .userstream import Streamed
        from .v1 import ociimage_pb2 as pb
        op = request["op"]
        if op == "prepare":
            try:
                req = json_format.ParseDict(request.get("step"), pb.PrepareStepRequest())
            except (json_format.ParseError, TypeError, ValueError) as e:
                raise errors.InvalidArgument(f"not a PrepareStepRequest: {str(e)[:200]}") from None
            steps = self.steps

            def run(report) -> dict:
                container = steps.prepare(req, report)
                return {"container": json_format.MessageToDict(
                    container, preserving_proto_field_name=True)}
            return Streamed(run, self.prepare_timeout, "twice [cache] convert_timeout",
                            "preparing the step"), None
        job, step = request.get("job"), request.get("step")
        if not isinstance(job, str) or (op == "release" and not isinstance(step, str)):
            raise errors.InvalidArgument(f"{op}: job (and step) must be strings")
        if op == "release":
            self.steps.release(job, step)
            return {"state": "released"}, None
        if op == "release-job":
            n_steps, n_leases = self.steps.release_job(job)
            return {"state": "released", "steps": n_steps, "leases": n_leases}, None
        raise errors.InvalidArgument(f"unknown op {op[:40]!r} (prepare, release, release-job)")


def serve(path, steps, config):
    """Start the step socket's server (usersock's, root only); returns it."""
    from .usersock import UserSocketServer
    server = UserSocketServer(
        path, StepRequests(steps, 2 * config.convert_timeout),
        request_timeout=STEP_REQUEST_TIMEOUT, max_connections=MAX_STEP_CONNECTIONS,
        max_per_uid=MAX_STEP_CONNECTIONS, max_request=MAX_STEP_REQUEST, mode=0o600,
        only_uid=0)
    server.start()
    return server


# ---- the step client's side --------------------------------------------------------------

def call(path: str, message: dict, on_progress=None,
         timeout: float = 60.0) -> dict:
    """One request on the step socket; progress events to on_progress; typed errors."""
    from .sockclient import connect, line, request_stream
    size = len(line(message))
    if size > MAX_STEP_REQUEST:
        raise errors.InvalidArgument(f"the step's request is {size} bytes encoded, more than "
                                     f"the {MAX_STEP_REQUEST} the daemon takes: the job's "
                                     f"environment is too large")
    return request_stream(lambda: connect(path, 10.0), message, on_progress,
                          timeout, path, max_line=MAX_STEP_REPLY)
