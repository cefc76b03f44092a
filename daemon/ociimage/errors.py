"""Typed errors raised by library code.

Library modules raise these and never print or exit; only entry points (the
CLI, the daemon's gRPC handlers, the step client) turn them into a one-line
message and an exit code or gRPC status. Each class names the gRPC status it
maps to, so the daemon and the CLI agree on what went wrong without string
matching. Messages must never contain credentials.
"""

from __future__ import annotations


class OciImageError(Exception):
    """Base class: a failure a user or admin can act on."""

    #: gRPC status code name (grpc.StatusCode member) this error maps to.
    status = "INTERNAL"
    #: process exit code used by the CLI.
    exit_code = 1

    def __init__(self, message: str, *, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InvalidReference(OciImageError):
    status = "INVALID_ARGUMENT"
    exit_code = 2


class InvalidArgument(OciImageError):
    status = "INVALID_ARGUMENT"
    exit_code = 2


class ConfigError(OciImageError):
    status = "FAILED_PRECONDITION"
    exit_code = 2


class NotFound(OciImageError):
    status = "NOT_FOUND"


class AuthenticationRequired(OciImageError):
    status = "UNAUTHENTICATED"


class AccessDenied(OciImageError):
    status = "PERMISSION_DENIED"


class RegistryUnavailable(OciImageError):
    """The registry could not be reached or kept failing after retries."""

    status = "UNAVAILABLE"


class RegistryProtocolError(OciImageError):
    """The registry answered something the Distribution Spec does not allow."""

    status = "FAILED_PRECONDITION"


class DigestMismatch(OciImageError):
    status = "DATA_LOSS"


class UnsupportedMediaType(OciImageError):
    status = "FAILED_PRECONDITION"


class PlatformNotFound(OciImageError):
    status = "NOT_FOUND"


class CorruptLayer(OciImageError):
    status = "DATA_LOSS"


class LimitExceeded(OciImageError):
    """An input exceeded a safety limit (manifest size, expansion ratio, entries)."""

    status = "RESOURCE_EXHAUSTED"


class NoSpace(OciImageError):
    status = "RESOURCE_EXHAUSTED"


class SquashError(OciImageError):
    """The SquashFS writer failed for a reason other than lack of space."""

    status = "INTERNAL"


class CacheError(OciImageError):
    status = "INTERNAL"


class LockTimeout(CacheError):
    """A cache lock stayed held past its deadline (a stuck or dead peer)."""

    status = "DEADLINE_EXCEEDED"


class InUse(OciImageError):
    """An operation would remove an image that a lease holds."""

    status = "FAILED_PRECONDITION"


class RuntimeSetupError(OciImageError):
    """Mounting an image or building a step's namespace failed."""

    status = "INTERNAL"


class DaemonUnavailable(OciImageError):
    status = "UNAVAILABLE"
    exit_code = 3


class Cancelled(OciImageError):
    status = "CANCELLED"


class NetworkPolicyError(OciImageError):
    """A registry, redirect or token realm points where the daemon must not go."""

    status = "PERMISSION_DENIED"
