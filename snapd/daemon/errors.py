"""The daemon's API errors: an HTTP status and a one-line ``fault_message`` naming the problem.

They extend the VMM API's (vmm.api.errors), so the same HTTP handler code answers both."""
from vmm.api.errors import ApiError, BadRequest, GuestTimeout, MethodNotAllowed, NotFound

__all__ = ["ApiError", "BadRequest", "NotFound", "MethodNotAllowed", "GuestTimeout", "Conflict", "Unavailable",
           "CloneFailed"]


class Conflict(ApiError):
    """The resource is in a state that forbids the request (an image still used by clones, a full daemon)."""
    status = 409


class CloneFailed(ApiError):
    """The clone's VMM process died or its memory could no longer be served (502: the daemon is fine)."""
    status = 502


class Unavailable(ApiError):
    """No warm worker could be had in time (503: retry later)."""
    status = 503
